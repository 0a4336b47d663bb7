"""Canary statistics on synthetic rating streams: promote the better, roll back the worse, rarely err."""

from __future__ import annotations

import random

from feedback.stats import Tally
from tuning.canary import decide
from tuning.settings import TuningSettings

SETTINGS = TuningSettings(
    canary_min_ratings=20,
    canary_max_ratings=300,
    canary_margin=0.05,
    canary_confidence=0.95,
    canary_rollback_confidence=0.99,
)


def _stream(p_canary: float, p_incumbent: float, seed: int, limit: int = 300) -> tuple[str, int]:
    """Rate both arms one answer at a time (like live traffic) and decide after every rating."""
    rng = random.Random(seed)
    c_up = c_down = i_up = i_down = 0
    for n in range(1, limit + 1):
        if rng.random() < p_canary:
            c_up += 1
        else:
            c_down += 1
        if rng.random() < p_incumbent:
            i_up += 1
        else:
            i_down += 1
        decision = decide(Tally(c_up, c_down), Tally(i_up, i_down), SETTINGS)
        if decision.action != "continue":
            return decision.action, n
    return "continue", limit


def test_no_decision_before_enough_ratings() -> None:
    decision = decide(Tally(10, 0), Tally(0, 10), SETTINGS)
    assert decision.action == "continue" and "10/20" in decision.reason


def test_clearly_better_is_promoted_and_clearly_worse_rolled_back() -> None:
    better = decide(Tally(40, 10), Tally(15, 35), SETTINGS)
    assert better.action == "promote" and better.evidence["p_not_worse"] > 0.95
    worse = decide(Tally(10, 40), Tally(35, 15), SETTINGS)
    assert worse.action == "rollback" and worse.evidence["p_drop"] > 0.99


def test_sequential_streams() -> None:
    better = [_stream(0.7, 0.4, seed) for seed in range(20)]
    assert all(action == "promote" for action, _ in better)
    worse = [_stream(0.3, 0.6, seed) for seed in range(20)]
    assert all(action == "rollback" for action, _ in worse)
    same = [_stream(0.5, 0.5, seed) for seed in range(40)]
    wrong_rollbacks = sum(action == "rollback" for action, _ in same)
    assert wrong_rollbacks <= 4  # an equal canary is rarely thrown away…
    assert sum(action == "promote" for action, _ in same) >= 30  # …and "not worse" gets it promoted
