"""A distributed launch runs one round in several processes: the main process alone touches the database, the
round publishes exactly once, and the followers train on the same rows in lockstep.

On GPUs that is `accelerate launch --multi_gpu`; accelerate's CPU launcher needs MPI, so here two CPU
processes start with `torchrun` (gloo), which sets the same WORLD_SIZE / RANK environment that
accelerate's PartialState and TRL's trainers read."""

from __future__ import annotations

import json
import subprocess
import sys

from sqlalchemy import select

from feedback.db import make_sync_engine, session_scope
from feedback.models import AdapterVersion, TuningRun
from serving.settings import Settings
from tests.tuning.test_round import FAST, _rate_answers
from tuning.schedule import round_command


def test_distributed_round_publishes_once(settings: Settings) -> None:
    _rate_answers(settings, 12)
    command, env = round_command(settings, FAST.model_copy(update={"device": "cpu"}), "default")
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    result = subprocess.run([*launch, "-m", *command[2:]], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    outcomes = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert sorted(o["status"] for o in outcomes) == ["follower", "promoted"], outcomes

    engine = make_sync_engine(settings.database_url)
    with session_scope(engine) as session:
        [run] = session.scalars(select(TuningRun)).all()
        [version] = session.scalars(select(AdapterVersion)).all()
        assert version.tuning_run_id == run.id and version.label == "default@1"
    engine.dispose()
