"""The canary decision: does the candidate's live up-rate hold up against the incumbent's?

A passing candidate first serves a share of the alias's traffic. Both arms are rated by the same
users over the same period; each arm's up-rate gets a Beta(1 + up, 1 + down) posterior, and
P(canary > incumbent − margin) follows in closed form. The canary is

- rolled back as soon as P(canary < incumbent − margin) ≥ rollback confidence (a drop beyond the tolerance),
- promoted as soon as P(canary > incumbent − margin) ≥ confidence (better, or not worse),
- otherwise kept running; after `canary_max_ratings` the posterior means decide.

The decision is re-checked after every rating (a sequential test, like SPRT). Because both
boundaries sit at "incumbent − margin", an equally good canary drifts towards promotion, and only a
real drop collects enough evidence to be rolled back (tests/tuning/test_canary.py measures both).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from feedback.stats import Tally
from tuning.settings import TuningSettings

Action = Literal["promote", "rollback", "continue"]


@dataclass(frozen=True)
class CanaryDecision:
    action: Action
    reason: str
    evidence: dict[str, float | int]


def _posterior(tally: Tally) -> tuple[float, float]:
    """Mean and variance of the Beta(1 + up, 1 + down) posterior of an up-rate."""
    a, b = 1 + tally.up, 1 + tally.down
    return a / (a + b), a * b / ((a + b) ** 2 * (a + b + 1))


def _p_not_worse(canary: Tally, incumbent: Tally, margin: float) -> float:
    """P(canary > incumbent − margin) under independent Beta posteriors.

    The difference of two Betas is close to normal once each arm has `canary_min_ratings`; the closed form
    is exact enough for a decision and cheap enough to re-check after every rating."""
    mean_c, var_c = _posterior(canary)
    mean_i, var_i = _posterior(incumbent)
    z = (mean_c - mean_i + margin) / math.sqrt(var_c + var_i)
    return 0.5 * (1 + math.erf(z / math.sqrt(2)))


def decide(canary: Tally, incumbent: Tally, settings: TuningSettings) -> CanaryDecision:
    evidence: dict[str, float | int] = {
        "canary_up": canary.up,
        "canary_down": canary.down,
        "incumbent_up": incumbent.up,
        "incumbent_down": incumbent.down,
    }
    if canary.total < settings.canary_min_ratings:
        return CanaryDecision("continue", f"{canary.total}/{settings.canary_min_ratings} canary ratings", evidence)
    p_not_worse = _p_not_worse(canary, incumbent, settings.canary_margin)
    p_drop = 1.0 - p_not_worse  # P(canary < incumbent − margin): worse by more than the tolerance
    mean_c, _ = _posterior(canary)
    mean_i, _ = _posterior(incumbent)
    evidence |= {
        "p_not_worse": round(p_not_worse, 4),
        "p_drop": round(p_drop, 4),
        "canary_mean": round(mean_c, 4),
        "incumbent_mean": round(mean_i, 4),
    }
    if p_drop >= settings.canary_rollback_confidence:
        return CanaryDecision("rollback", f"up-rate dropped (P={p_drop:.3f})", evidence)
    if p_not_worse >= settings.canary_confidence:
        return CanaryDecision("promote", f"better or not worse (P={p_not_worse:.3f})", evidence)
    if canary.total >= settings.canary_max_ratings:
        if mean_c >= mean_i - settings.canary_margin:
            return CanaryDecision("promote", "enough ratings; not worse on the posterior means", evidence)
        return CanaryDecision("rollback", "enough ratings; worse on the posterior means", evidence)
    return CanaryDecision("continue", "not enough evidence yet", evidence)
