"""`POST /v1/feedback` and `POST /v1/comparisons`: a 2xx means the row is committed to disk."""

from __future__ import annotations

from litestar import Controller, post
from litestar.datastructures import State
from sqlalchemy.ext.asyncio import AsyncSession

from feedback.callers import Caller
from feedback.comparisons import ComparisonInput, submit_comparison
from feedback.errors import InvalidFeedback
from feedback.models import ComparisonOutcome
from feedback.ratings import RatingInput
from feedback.schemas import ComparisonRequest, ComparisonResponse, FeedbackRequest, FeedbackResponse


def _comparison_input(data: ComparisonRequest) -> ComparisonInput:
    pair_form = data.chosen_id is not None or data.rejected_id is not None
    outcome_form = data.a is not None or data.b is not None or data.outcome is not None
    if pair_form and outcome_form:
        raise InvalidFeedback("give either chosen_id/rejected_id or a/b/outcome, not both", param="chosen_id")
    if pair_form:
        if data.chosen_id is None or data.rejected_id is None:
            missing = "chosen_id" if data.chosen_id is None else "rejected_id"
            raise InvalidFeedback(f"{missing} is required with the chosen/rejected form", param=missing)
        a, b, outcome = data.chosen_id, data.rejected_id, ComparisonOutcome.A
    else:
        for name in ("a", "b", "outcome"):
            if getattr(data, name) is None:
                raise InvalidFeedback(f"{name} is required (or use chosen_id/rejected_id)", param=name)
        a, b, outcome = data.a, data.b, ComparisonOutcome(data.outcome)  # type: ignore[assignment]
    return ComparisonInput(a=a, b=b, outcome=outcome, comparison_id=data.comparison_id, end_user=data.user or "")  # type: ignore[arg-type]


class FeedbackController(Controller):
    tags = ["feedback"]

    @post("/v1/feedback", summary="Rate a completion (1 up, -1 down, 0 retract)", status_code=200)
    async def rate(self, data: FeedbackRequest, caller: Caller, state: State) -> FeedbackResponse:
        # One dependency only (caller): Litestar resolves two or more through an anyio task group per
        # request, which cost more CPU than the rest of this handler. The writer comes from the app state.
        rating = RatingInput(
            completion_id=data.completion_id,
            rating=data.rating,
            reasons=tuple(dict.fromkeys(data.reasons)),
            comment=data.comment,
            correction=data.correction,
            feedback_id=data.feedback_id,
            end_user=data.user or "",
        )
        # Answers after the shared transaction holding this rating committed (group commit).
        row = await state.rating_writer.submit(caller, rating)
        return FeedbackResponse(
            id=row.id,
            completion_id=row.completion_id,
            rating=row.rating,
            reasons=row.reasons,
            status=row.status,
            revision=row.revision,
            created_at=row.created_at,
            updated_at=row.updated_at,
        )

    @post("/v1/comparisons", summary="Record which of two answers to the same prompt is better", status_code=200)
    async def compare(self, data: ComparisonRequest, db_session: AsyncSession, caller: Caller) -> ComparisonResponse:
        comparison = _comparison_input(data)
        async with db_session.begin():
            row = await db_session.run_sync(submit_comparison, caller, comparison)
        return ComparisonResponse(
            id=row.id, a=row.completion_a_id, b=row.completion_b_id, outcome=row.outcome, created_at=row.created_at
        )
