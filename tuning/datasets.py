"""From exported feedback to TRL datasets: KTO rows from thumbs, DPO pairs from comparisons and corrections.

Rows are conversational (`prompt` = the served messages), so TRL renders them with the same chat
template and generation prompt the server used.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from datasets import Dataset

from feedback.models import ComparisonOutcome
from feedback.training_data import ComparedAnswers, RatedAnswer


def _assistant(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


@dataclass(frozen=True)
class KTOData:
    dataset: Dataset
    desirable: int
    undesirable: int
    desirable_weight: float
    undesirable_weight: float


def balance_weights(desirable: int, undesirable: int) -> tuple[float, float]:
    """KTO's rule (paper eq. 8, TRL docs): weight ONE side so that w_D·n_D : w_U·n_U lies in [1, 4/3].

    We aim at the middle of that band, 7:6; a one-sided round keeps weights 1.
    """
    if desirable == 0 or undesirable == 0:
        return 1.0, 1.0
    target = 7 / 6
    ratio = desirable / undesirable
    if ratio < 1:  # fewer thumbs-up: weigh them up
        return round(target / ratio, 4), 1.0
    if ratio > 4 / 3:  # many more thumbs-up: weigh the thumbs-down up
        return 1.0, round(ratio / target, 4)
    return 1.0, 1.0


def kto_dataset(
    ratings: list[RatedAnswer],
    comparisons: list[ComparedAnswers] = (),
    *,
    seed: int = 0,  # type: ignore[assignment]
) -> KTOData:
    """Thumbs as KTO rows; a both-bad comparison adds two undesirable rows.

    Shuffled here because TRL's KTO reads in order (its KL estimate pairs neighbours): in
    chronological order a burst of thumbs-down would fill whole batches.
    """
    rows: list[dict[str, Any]] = [
        {"prompt": r.prompt, "completion": _assistant(r.answer), "label": r.rating > 0} for r in ratings
    ]
    for c in comparisons:
        if c.outcome == ComparisonOutcome.BOTH_BAD:
            rows += [{"prompt": c.prompt, "completion": _assistant(t), "label": False} for t in (c.a, c.b)]
    random.Random(seed).shuffle(rows)
    desirable = sum(1 for row in rows if row["label"])
    undesirable = len(rows) - desirable
    w_d, w_u = balance_weights(desirable, undesirable)
    return KTOData(Dataset.from_list(rows), desirable, undesirable, w_d, w_u)


def dpo_dataset(ratings: list[RatedAnswer], comparisons: list[ComparedAnswers], *, seed: int = 0) -> Dataset | None:
    """Pairs: the preferred answer of a comparison, and a user's correction over the original answer."""
    rows: list[dict[str, Any]] = []
    for c in comparisons:
        if c.outcome in (ComparisonOutcome.A, ComparisonOutcome.B):
            chosen, rejected = (c.a, c.b) if c.outcome == ComparisonOutcome.A else (c.b, c.a)
            rows.append({"prompt": c.prompt, "chosen": _assistant(chosen), "rejected": _assistant(rejected)})
    for r in ratings:
        if r.correction and r.correction.strip() != r.answer.strip():
            rows.append({"prompt": r.prompt, "chosen": _assistant(r.correction), "rejected": _assistant(r.answer)})
    if not rows:
        return None
    random.Random(seed).shuffle(rows)
    return Dataset.from_list(rows)
