"""The gate's greedy probe answers, kept per model, so a round generates only the candidate's.

Every gate asks the incumbent and the candidate the same probes greedily, and generation is a third
of the gate's time. The incumbent is always a model an earlier gate already asked: the base model, or
an earlier round's candidate, whose answers that round generated. An entry is keyed by everything that
decides greedy answers: the weights (base model, plus the adapter's content hash), the probes' prompt
tokens, the answer length, the batch size (left padding), and the dtype, device and library versions
that computed them. A miss (another machine, a new probe set, a cleared cache) just generates them.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import structlog
import torch
import transformers

log = structlog.get_logger(__name__)

KEEP_ENTRIES = 64  # ~15 KB each; the newest are the ones a next round can use


@dataclass(frozen=True)
class GreedyConditions:
    """What besides the weights decides a model's greedy answers to the probes."""

    prompts: list[list[int]]  # rendered prompt token ids, in order
    max_new_tokens: int
    batch_size: int
    dtype: torch.dtype
    device: torch.device

    def key(self, model: str) -> str:
        described = {
            "model": model,
            "prompts": self.prompts,
            "max_new_tokens": self.max_new_tokens,
            "batch_size": self.batch_size,
            "dtype": str(self.dtype),
            "device": self.device.type,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        }
        return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class ProbeAnswerStore:
    directory: Path

    def load(self, model: str, conditions: GreedyConditions) -> list[list[int]] | None:
        path = self.directory / f"{conditions.key(model)}.json"
        try:
            answers = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        valid = (
            isinstance(answers, list)
            and len(answers) == len(conditions.prompts)
            and all(isinstance(a, list) and all(isinstance(t, int) for t in a) for a in answers)
        )
        if not valid:
            log.warning("ignored a malformed probe-answer entry", path=str(path))
            return None
        return answers

    def save(self, model: str, conditions: GreedyConditions, answers: list[list[int]]) -> None:
        """Atomically (a reader never sees half an entry); a failure to write only costs the next round time."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd, staging = tempfile.mkstemp(dir=self.directory, prefix=".entry-", suffix=".tmp")
            with os.fdopen(fd, "w") as handle:
                json.dump(answers, handle)
            os.replace(staging, self.directory / f"{conditions.key(model)}.json")
            self._prune()
        except OSError as exc:
            log.warning("could not keep probe answers", directory=str(self.directory), error=str(exc))

    def _prune(self) -> None:
        entries = sorted(self.directory.glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True)
        for stale in entries[KEEP_ENTRIES:]:
            stale.unlink(missing_ok=True)


@dataclass(frozen=True)
class KnownAnswers:
    """A gate's access to kept answers: the store and the names of the two contenders' weights."""

    store: ProbeAnswerStore
    incumbent: str
    candidate: str
