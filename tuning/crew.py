"""Several training processes for one round: `accelerate launch … loraloop tune` on a multi-GPU machine.

The round stays a plain TRL run: accelerate starts one process per GPU and TRL's trainers do the data
parallelism. Only the main process talks to the database (lock, export, gate, publish); it hands the
round's training rows to the others once, right before training, so every process trains on exactly
the same data. A plain `loraloop tune` is a crew of one and none of this does anything.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from feedback.training_data import ComparedAnswers, RatedAnswer


@dataclass(frozen=True)
class TrainingOrders:
    """What the main process decided to train: everything a follower needs, nothing from the database."""

    run_id: int
    train_ratings: list[RatedAnswer]
    train_comparisons: list[ComparedAnswers]
    parent_dir: Path | None


class Crew:
    def __init__(self, *, cpu: bool) -> None:
        self.size = int(os.environ.get("WORLD_SIZE", "1"))
        self._state: Any = None
        self._sent = False
        if self.size > 1:
            from accelerate import PartialState  # joins the process group the launcher prepared

            # On CPU accelerate only goes multi-process when told it is a CPU run (gloo), as TRL's use_cpu does.
            self._state = PartialState(cpu=cpu)

    @property
    def is_main(self) -> bool:
        return self._state is None or self._state.is_main_process

    def send(self, orders: TrainingOrders | None) -> None:
        """Main process: hand the orders to the followers (None: no training this round). Once per round."""
        if self._state is None or self._sent:
            return
        self._sent = True
        from accelerate.utils import broadcast_object_list

        broadcast_object_list([orders], from_process=0)

    def receive(self) -> TrainingOrders | None:
        """Follower: wait for the main process's orders."""
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([None], from_process=0)[0]
