"""The fixed probe set the gate checks every candidate on: short factual questions with expected answers.

`probes/factual.jsonl` holds only questions the bundled base model answers correctly (greedy, 32
tokens), so a drop is the candidate's doing. Its prompts also serve as the drift probes (KL).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from importlib.resources import files


@dataclass(frozen=True)
class FactualProbe:
    question: str
    answers: tuple[str, ...]  # any of them, as a whole word, case-insensitive

    @property
    def messages(self) -> list[dict[str, str]]:
        return [{"role": "user", "content": self.question}]

    def is_answered_by(self, text: str) -> bool:
        return any(re.search(rf"(?<![\w.]){re.escape(a)}(?!\w|\.[1-9])", text, re.IGNORECASE) for a in self.answers)


def factual_probes() -> list[FactualProbe]:
    lines = files("tuning").joinpath("probes/factual.jsonl").read_text(encoding="utf-8").splitlines()
    return [FactualProbe(row["question"], tuple(row["answers"])) for row in map(json.loads, filter(None, lines))]
