"""Where a rating goes: thumbs up/down on one completion, one current rating per rater.

Re-rating updates the row and bumps its revision (training pins revisions, so a changed mind is
trained on again); a rating of 0 retracts. A client `feedback_id` makes retries idempotent.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from feedback.callers import Caller
from feedback.completions import get_completion_for
from feedback.errors import ConflictingFeedback
from feedback.models import Completion, Feedback, FeedbackStatus, new_uuid


@dataclass(frozen=True)
class RatingInput:
    completion_id: str
    rating: int  # 1 up, -1 down, 0 retract
    reasons: tuple[str, ...] = ()
    comment: str | None = None
    correction: str | None = None
    feedback_id: str | None = None
    end_user: str = ""


def _apply(row: Feedback, rating: RatingInput) -> bool:
    """Copy the rating onto the row; True when anything changed."""
    status = FeedbackStatus.RETRACTED if rating.rating == 0 else FeedbackStatus.ACTIVE
    new = (rating.rating, list(rating.reasons), rating.comment, rating.correction, status)
    old = (row.rating, list(row.reasons or []), row.comment, row.correction, row.status)
    if row.status == FeedbackStatus.QUARANTINED or new == old:
        return False  # quarantine is an operator's decision; a rater cannot lift it by re-rating
    row.rating, row.reasons, row.comment, row.correction, row.status = new
    return True


def submit_rating(session: Session, caller: Caller, rating: RatingInput) -> tuple[Feedback, Completion]:
    """Insert or update the caller's rating of one completion; the caller commits."""
    completion = get_completion_for(session, rating.completion_id, caller, param="completion_id")
    row: Feedback | None = None
    if rating.feedback_id is not None:
        row = session.get(Feedback, rating.feedback_id)
        if row is not None and (row.completion_id != rating.completion_id or row.caller != caller.id):
            raise ConflictingFeedback(
                f"feedback_id {rating.feedback_id!r} already belongs to another rating", param="feedback_id"
            )
    if row is None:
        row = session.scalars(
            select(Feedback).where(
                Feedback.completion_id == rating.completion_id,
                Feedback.caller == caller.id,
                Feedback.end_user == rating.end_user,
            )
        ).one_or_none()
    if row is None:
        row = Feedback(
            id=rating.feedback_id or new_uuid(),
            completion_id=rating.completion_id,
            caller=caller.id,
            end_user=rating.end_user,
            rating=rating.rating,
            reasons=list(rating.reasons),
            comment=rating.comment,
            correction=rating.correction,
            status=FeedbackStatus.RETRACTED if rating.rating == 0 else FeedbackStatus.ACTIVE,
            revision=1,
        )
        session.add(row)
    elif _apply(row, rating):
        row.revision += 1
    session.flush()
    return row, completion
