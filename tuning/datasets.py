"""From exported feedback to TRL datasets: KTO rows from thumbs, DPO pairs from comparisons and corrections.

Rows are conversational (`prompt` = the served messages), so TRL renders them with the same chat
template and generation prompt the server used. The row shapes come from `feedback.training_data`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from datasets import Dataset

from feedback.training_data import ComparedAnswers, RatedAnswer, dpo_rows, kto_rows


@dataclass(frozen=True)
class KTOData:
    dataset: Dataset
    desirable: int
    undesirable: int
    desirable_weight: float
    undesirable_weight: float


def balance_weights(desirable: int, undesirable: int) -> tuple[float, float]:
    """KTO's rule (paper eq. 8, TRL docs): weight ONE side so that w_D·n_D : w_U·n_U lies in [1, 4/3].

    We aim at 7:6, inside that band; a one-sided round keeps weights 1.
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
    comparisons: list[ComparedAnswers] = (),  # type: ignore[assignment]
    *,
    seed: int = 0,
) -> KTOData:
    """Shuffled here because TRL's KTO reads in order (its KL estimate pairs neighbours): in
    chronological order a burst of thumbs-down would fill whole batches."""
    rows = kto_rows(ratings, comparisons)
    random.Random(seed).shuffle(rows)
    desirable = sum(1 for row in rows if row["label"])
    undesirable = len(rows) - desirable
    w_d, w_u = balance_weights(desirable, undesirable)
    return KTOData(Dataset.from_list(rows), desirable, undesirable, w_d, w_u)


def dpo_dataset(ratings: list[RatedAnswer], comparisons: list[ComparedAnswers], *, seed: int = 0) -> Dataset | None:
    rows = dpo_rows(ratings, comparisons)
    if not rows:
        return None
    random.Random(seed).shuffle(rows)
    return Dataset.from_list(rows)
