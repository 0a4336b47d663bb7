"""Wire format of the feedback API (msgspec structs: validated on the way in, documented in OpenAPI)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from msgspec import Meta, Struct

Id = Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._:-]+$")]
Reason = Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[a-z0-9_]+$")]

MAX_COMMENT_CHARS = 4_000
MAX_CORRECTION_CHARS = 32_000


class FeedbackRequest(Struct, forbid_unknown_fields=True):
    """A thumbs up (1) or down (-1) on a completion; 0 retracts. Re-posting updates your rating."""

    completion_id: Id
    rating: Literal[-1, 0, 1]
    reasons: Annotated[list[Reason], Meta(max_length=16)] = []
    comment: Annotated[str, Meta(max_length=MAX_COMMENT_CHARS)] | None = None
    correction: Annotated[str, Meta(min_length=1, max_length=MAX_CORRECTION_CHARS)] | None = None
    feedback_id: Id | None = None
    user: Annotated[str, Meta(max_length=256)] | None = None


class FeedbackResponse(Struct):
    id: str
    completion_id: str
    rating: int
    reasons: list[str]
    status: str
    revision: int
    created_at: datetime
    updated_at: datetime
    object: Literal["feedback"] = "feedback"


class ComparisonRequest(Struct, forbid_unknown_fields=True):
    """Either `{chosen_id, rejected_id}` or `{a, b, outcome}` with outcome a | b | tie | both_bad."""

    chosen_id: Id | None = None
    rejected_id: Id | None = None
    a: Id | None = None
    b: Id | None = None
    outcome: Literal["a", "b", "tie", "both_bad"] | None = None
    comparison_id: Id | None = None
    user: Annotated[str, Meta(max_length=256)] | None = None


class ComparisonResponse(Struct):
    id: str
    a: str
    b: str
    outcome: str
    created_at: datetime
    object: Literal["comparison"] = "comparison"
