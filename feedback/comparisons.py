"""Pairwise choices between two answers to the same prompt (regenerate, side by side)."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.orm import Session

from feedback.callers import Caller
from feedback.completions import get_completion_for
from feedback.errors import ConflictingFeedback, InvalidFeedback
from feedback.models import Comparison, ComparisonOutcome, new_uuid


@dataclass(frozen=True)
class ComparisonInput:
    a: str
    b: str
    outcome: ComparisonOutcome
    comparison_id: str | None = None
    end_user: str = ""


def submit_comparison(session: Session, caller: Caller, comparison: ComparisonInput) -> Comparison:
    """Store one comparison; resubmitting the same `comparison_id` returns the stored one."""
    if comparison.a == comparison.b:
        raise InvalidFeedback("a comparison needs two different completions", param="b")
    if comparison.comparison_id is not None:
        existing = session.get(Comparison, comparison.comparison_id)
        if existing is not None:
            same = (existing.completion_a_id, existing.completion_b_id, existing.outcome, existing.caller) == (
                comparison.a,
                comparison.b,
                comparison.outcome,
                caller.id,
            )
            if not same:
                raise ConflictingFeedback(
                    f"comparison_id {comparison.comparison_id!r} already names a different comparison",
                    param="comparison_id",
                )
            return existing
    first = get_completion_for(session, comparison.a, caller, param="a")
    second = get_completion_for(session, comparison.b, caller, param="b")
    if first.prompt_messages != second.prompt_messages:
        raise InvalidFeedback("the two completions answer different prompts", param="b")
    row = Comparison(
        id=comparison.comparison_id or new_uuid(),
        completion_a_id=comparison.a,
        completion_b_id=comparison.b,
        outcome=comparison.outcome,
        caller=caller.id,
        end_user=comparison.end_user,
    )
    session.add(row)
    session.flush()
    return row
