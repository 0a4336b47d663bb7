"""The fixed probe sets the gate checks every candidate on.

`probes/factual.jsonl`: short factual questions with expected answers, only ones the bundled base
model answers correctly (greedy, 32 tokens), so a drop is the candidate's doing. Its prompts also
serve as the drift probes (KL).
`probes/everyday.jsonl`: everyday requests with no one right answer (written for the gate, apart from
the benchmark's prompts), where a candidate must go on answering rather than deflecting or switching
language (`answer_checks`); the bundled base model's greedy answers to all 86 probes have none of either.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from importlib.resources import files
from typing import Any


@dataclass(frozen=True)
class FactualProbe:
    question: str
    answers: tuple[str, ...]  # any of them, as a whole word, case-insensitive

    @property
    def messages(self) -> list[dict[str, str]]:
        return [{"role": "user", "content": self.question}]

    def is_answered_by(self, text: str) -> bool:
        return any(re.search(rf"(?<![\w.]){re.escape(a)}(?!\w|\.[1-9])", text, re.IGNORECASE) for a in self.answers)


def _rows(name: str) -> list[dict[str, Any]]:
    """The rows of one shipped probe file, `probes/<name>.jsonl`."""
    lines = files("tuning").joinpath(f"probes/{name}.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line]


def factual_probes() -> list[FactualProbe]:
    return [FactualProbe(row["question"], tuple(row["answers"])) for row in _rows("factual")]


def everyday_probes() -> list[list[dict[str, str]]]:
    """The everyday requests, as chat messages."""
    return [[{"role": "user", "content": row["question"]}] for row in _rows("everyday")]
