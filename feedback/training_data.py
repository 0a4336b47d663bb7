"""Export: the feedback not yet trained on, as plain rows the tuner turns into TRL datasets.

Rows carry the exact prompt messages the server rendered and the exact answer it gave, so the
training prompt is the served prompt. Retracted and quarantined feedback never leaves here;
comparisons that are ties carry no preference and are dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, exists, func, select, true
from sqlalchemy.orm import Session, aliased

from feedback.models import (
    Comparison,
    ComparisonOutcome,
    ComparisonUse,
    Completion,
    Feedback,
    FeedbackStatus,
    FeedbackUse,
    UseRole,
)


@dataclass(frozen=True)
class RatedAnswer:
    feedback_id: str
    revision: int
    prompt: list[dict[str, Any]]
    answer: str
    rating: int  # 1 or -1
    correction: str | None
    served_by: str
    # False when the answer was cut at max_tokens: the model never ended its turn, so training and the
    # gate score it without the end-of-turn token the chat template would add.
    finished: bool = True


@dataclass(frozen=True)
class ComparedAnswers:
    comparison_id: str
    prompt: list[dict[str, Any]]
    a: str
    b: str
    outcome: ComparisonOutcome


def rated_answers(session: Session, alias: str, *, unused_only: bool = True) -> list[RatedAnswer]:
    """Active thumbs on this alias's answers (by default only those whose current revision no run has used)."""
    used = exists().where(FeedbackUse.feedback_id == Feedback.id, FeedbackUse.revision == Feedback.revision)
    rows = session.execute(
        select(Feedback, Completion)
        .join(Completion, Completion.id == Feedback.completion_id)
        .where(
            Completion.adapter_alias == alias,
            Feedback.status == FeedbackStatus.ACTIVE,
            Feedback.rating != 0,
            ~used if unused_only else true(),
        )
        .order_by(Feedback.updated_at, Feedback.id)
    ).all()
    return [
        RatedAnswer(
            feedback_id=fb.id,
            revision=fb.revision,
            prompt=list(c.prompt_messages),
            answer=c.answer,
            rating=fb.rating,
            correction=fb.correction,
            served_by=c.served_by,
            finished=c.finish_reason != "length",
        )
        for fb, c in rows
    ]


def compared_answers(session: Session, alias: str, *, unused_only: bool = True) -> list[ComparedAnswers]:
    """Active, non-tie comparisons between two of this alias's answers (by default only unused ones)."""
    first, second = aliased(Completion), aliased(Completion)
    used = exists().where(ComparisonUse.comparison_id == Comparison.id)
    rows = session.execute(
        select(Comparison, first, second)
        .join(first, first.id == Comparison.completion_a_id)
        .join(second, second.id == Comparison.completion_b_id)
        .where(
            and_(first.adapter_alias == alias, second.adapter_alias == alias),
            Comparison.status == FeedbackStatus.ACTIVE,
            Comparison.outcome != ComparisonOutcome.TIE,
            ~used if unused_only else true(),
        )
        .order_by(Comparison.created_at, Comparison.id)
    ).all()
    return [
        ComparedAnswers(cmp.id, list(a.prompt_messages), a.answer, b.answer, ComparisonOutcome(cmp.outcome))
        for cmp, a, b in rows
    ]


def mark_used(
    session: Session,
    run_id: int,
    *,
    ratings: list[RatedAnswer],
    comparisons: list[ComparedAnswers],
    role: UseRole,
) -> None:
    """Record what a run used; done in the same transaction that registers its outcome."""
    session.add_all(
        FeedbackUse(feedback_id=r.feedback_id, tuning_run_id=run_id, revision=r.revision, role=role) for r in ratings
    )
    session.add_all(ComparisonUse(comparison_id=c.comparison_id, tuning_run_id=run_id, role=role) for c in comparisons)
    session.flush()


def _assistant(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


def kto_rows(ratings: list[RatedAnswer], comparisons: list[ComparedAnswers] = ()) -> list[dict[str, Any]]:  # type: ignore[assignment]
    """TRL's unpaired format: thumbs as labelled rows; a both-bad comparison gives two undesirable rows."""
    rows: list[dict[str, Any]] = [
        {"prompt": r.prompt, "completion": _assistant(r.answer), "label": r.rating > 0, "finished": r.finished}
        for r in ratings
    ]
    for c in comparisons:
        if c.outcome == ComparisonOutcome.BOTH_BAD:
            rows += [
                {"prompt": c.prompt, "completion": _assistant(t), "label": False, "finished": True} for t in (c.a, c.b)
            ]
    return rows


def dpo_rows(ratings: list[RatedAnswer], comparisons: list[ComparedAnswers]) -> list[dict[str, Any]]:
    """TRL's preference format: the preferred answer of a comparison, a user's correction over the original."""
    rows: list[dict[str, Any]] = []
    for c in comparisons:
        if c.outcome in (ComparisonOutcome.A, ComparisonOutcome.B):
            chosen, rejected = (c.a, c.b) if c.outcome == ComparisonOutcome.A else (c.b, c.a)
            rows.append({"prompt": c.prompt, "chosen": _assistant(chosen), "rejected": _assistant(rejected)})
    for r in ratings:
        if r.correction and r.correction.strip() != r.answer.strip():
            rows.append({"prompt": r.prompt, "chosen": _assistant(r.correction), "rejected": _assistant(r.answer)})
    return rows


def count_unused(session: Session, alias: str) -> int:
    """How much new feedback an alias has (what the schedule waits for): ratings plus comparisons."""
    ratings = session.scalar(
        select(func.count())
        .select_from(Feedback)
        .join(Completion, Completion.id == Feedback.completion_id)
        .where(
            Completion.adapter_alias == alias,
            Feedback.status == FeedbackStatus.ACTIVE,
            Feedback.rating != 0,
            ~exists().where(FeedbackUse.feedback_id == Feedback.id, FeedbackUse.revision == Feedback.revision),
        )
    )
    first = aliased(Completion)
    comparisons = session.scalar(
        select(func.count())
        .select_from(Comparison)
        .join(first, first.id == Comparison.completion_a_id)
        .where(
            first.adapter_alias == alias,
            Comparison.status == FeedbackStatus.ACTIVE,
            Comparison.outcome != ComparisonOutcome.TIE,
            ~exists().where(ComparisonUse.comparison_id == Comparison.id),
        )
    )
    return int(ratings or 0) + int(comparisons or 0)
