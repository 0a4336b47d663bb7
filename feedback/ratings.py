"""Where a rating goes: thumbs up/down on one completion, one current rating per rater.

Re-rating updates the row and bumps its revision (training pins revisions, so a changed mind is
trained on again); a rating of 0 retracts. A client `feedback_id` makes retries idempotent.

Ratings arriving together are committed together (`RatingWriter`, group commit): each request is
answered only after the transaction holding its row has committed, so a 200 still means "on disk",
but many raters share one fsync and a handful of statements instead of a transaction each.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import structlog
from sqlalchemy import insert, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker
from sqlalchemy.orm import Session, load_only

from feedback.callers import Caller
from feedback.completions import get_completion_for
from feedback.errors import ConflictingFeedback, FeedbackError
from feedback.models import Completion, Feedback, FeedbackStatus, new_uuid, utcnow

log = structlog.get_logger(__name__)

MAX_BATCH = 256  # ratings per transaction: bounds the statement size and the time the loop spends per batch

RaterKey = tuple[str, str, str]  # (completion_id, caller, end_user): one current rating each


@dataclass(frozen=True)
class RatingInput:
    completion_id: str
    rating: int  # 1 up, -1 down, 0 retract
    reasons: tuple[str, ...] = ()
    comment: str | None = None
    correction: str | None = None
    feedback_id: str | None = None
    end_user: str = ""


@dataclass(frozen=True)
class StoredRating:
    """A rating as committed, and what its completion was served by (for the per-version counters)."""

    id: str
    completion_id: str
    rating: int
    reasons: list[str]
    status: str
    revision: int
    created_at: datetime
    updated_at: datetime
    served_by: str
    adapter_alias: str | None


_CHANGEABLE = ("rating", "reasons", "comment", "correction", "status")


def _wanted(rating: RatingInput) -> dict[str, Any]:
    status = FeedbackStatus.RETRACTED if rating.rating == 0 else FeedbackStatus.ACTIVE
    return {
        "rating": rating.rating,
        "reasons": list(rating.reasons),
        "comment": rating.comment,
        "correction": rating.correction,
        "status": status,
    }


def _apply(row: dict[str, Any], rating: RatingInput) -> bool:
    """Copy the rating onto the row; True when anything changed."""
    new = _wanted(rating)
    old = {name: row[name] for name in _CHANGEABLE} | {"reasons": list(row["reasons"] or [])}
    if row["status"] == FeedbackStatus.QUARANTINED or new == old:
        return False  # quarantine is an operator's decision; a rater cannot lift it by re-rating
    row.update(new)
    return True


@dataclass
class _Batch:
    """The rows one batch can touch, read with two queries up front and kept current as ratings apply.

    Plain column dicts, not ORM objects: the ORM's unit of work costs more CPU per rating than the rest
    of the request, and one multi-row INSERT plus one executemany UPDATE write the whole batch.
    """

    by_id: dict[str, dict[str, Any]]
    by_rater: dict[RaterKey, dict[str, Any]]
    completions: list[Completion]  # held here because the identity map only holds objects weakly
    inserted: dict[str, dict[str, Any]] = field(default_factory=dict)
    updated: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def load(cls, session: Session, batch: Sequence[tuple[Caller, RatingInput]]) -> _Batch:
        completion_ids = {rating.completion_id for _, rating in batch}
        # Into the identity map: get_completion_for's session.get then answers without a query.
        completions = session.scalars(
            select(Completion)
            .options(load_only(Completion.caller, Completion.tenant, Completion.served_by, Completion.adapter_alias))
            .where(Completion.id.in_(completion_ids))
        ).all()
        feedback_ids = {rating.feedback_id for _, rating in batch if rating.feedback_id is not None}
        # By completion (indexed), not by (completion, caller, user) row values, which SQLite answers with a
        # full scan; a completion has few raters, so the extra rows are few.
        rows = [
            dict(row)
            for row in session.execute(
                select(*Feedback.__table__.columns).where(
                    or_(Feedback.id.in_(feedback_ids), Feedback.completion_id.in_(completion_ids))
                )
            ).mappings()
        ]
        by_rater = {(row["completion_id"], row["caller"], row["end_user"]): row for row in rows}
        return cls({row["id"]: row for row in rows}, by_rater, list(completions))

    def insert(self, row: dict[str, Any]) -> None:
        self.inserted[row["id"]] = self.by_id[row["id"]] = row
        self.by_rater[(row["completion_id"], row["caller"], row["end_user"])] = row

    def write(self, session: Session) -> None:
        if self.inserted:
            session.execute(insert(Feedback), list(self.inserted.values()))
        if changed := [row for row_id, row in self.updated.items() if row_id not in self.inserted]:
            session.execute(update(Feedback), changed)  # by primary key, one executemany


def _submit(session: Session, batch: _Batch, caller: Caller, rating: RatingInput, now: datetime) -> StoredRating:
    """One rating against the batch's rows; raises a FeedbackError before changing anything."""
    completion = get_completion_for(session, rating.completion_id, caller, param="completion_id")
    row: dict[str, Any] | None = None
    if rating.feedback_id is not None:
        row = batch.by_id.get(rating.feedback_id)
        if row is not None and (row["completion_id"] != rating.completion_id or row["caller"] != caller.id):
            raise ConflictingFeedback(
                f"feedback_id {rating.feedback_id!r} already belongs to another rating", param="feedback_id"
            )
    if row is None:
        row = batch.by_rater.get((rating.completion_id, caller.id, rating.end_user))
    if row is None:
        row = {
            "id": rating.feedback_id or new_uuid(),
            "completion_id": rating.completion_id,
            "caller": caller.id,
            "end_user": rating.end_user,
            **_wanted(rating),
            "revision": 1,
            "created_at": now,
            "updated_at": now,
        }
        batch.insert(row)
    elif _apply(row, rating):
        row["revision"] += 1
        row["updated_at"] = now
        batch.updated[row["id"]] = row
    return StoredRating(
        id=row["id"],
        completion_id=row["completion_id"],
        rating=row["rating"],
        reasons=list(row["reasons"] or []),
        status=row["status"],
        revision=row["revision"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        served_by=completion.served_by,
        adapter_alias=completion.adapter_alias,
    )


def submit_ratings(session: Session, batch: Sequence[tuple[Caller, RatingInput]]) -> list[StoredRating | FeedbackError]:
    """Insert or update many ratings in the caller's transaction with a few statements in all.

    A rating refused (unknown completion, someone else's, a feedback_id of another rating) is returned as
    its error, wrote nothing, and does not stop the others. Ratings of the same rater and completion in one
    batch apply in order, as they would one transaction after another.
    """
    rows = _Batch.load(session, batch)
    now = utcnow()
    outcomes: list[StoredRating | FeedbackError] = []
    for caller, rating in batch:
        try:
            outcomes.append(_submit(session, rows, caller, rating, now))
        except FeedbackError as error:
            outcomes.append(error)
    rows.write(session)
    return outcomes


def submit_rating(session: Session, caller: Caller, rating: RatingInput) -> StoredRating:
    """Insert or update the caller's rating of one completion; the caller commits."""
    (outcome,) = submit_ratings(session, [(caller, rating)])
    if isinstance(outcome, FeedbackError):
        raise outcome
    return outcome


@dataclass
class _Waiting:
    caller: Caller
    rating: RatingInput
    answer: asyncio.Future[StoredRating]


class RatingWriter:
    """Group commit for `POST /v1/feedback`: one transaction at a time; what arrives meanwhile shares the next.

    No timer: a lone rating commits at once; under load, batches grow by themselves to what arrived during
    the previous commit. Each waiting request is answered after *its* transaction committed (or failed).
    """

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        on_committed: Callable[[str, str | None, int], None] | None = None,
        max_batch: int = MAX_BATCH,
    ) -> None:
        self._sessions = async_sessionmaker(engine, expire_on_commit=False)
        self._on_committed = on_committed  # (served_by, alias, rating) per committed rating: the metrics
        self._max_batch = max_batch
        self._waiting: list[_Waiting] = []
        self._draining: asyncio.Task[None] | None = None

    async def submit(self, caller: Caller, rating: RatingInput) -> StoredRating:
        """The stored row and its completion, once committed; raises the rating's FeedbackError or the DB's error."""
        answer: asyncio.Future[StoredRating] = asyncio.get_running_loop().create_future()
        self._waiting.append(_Waiting(caller, rating, answer))
        if self._draining is None or self._draining.done():
            # Its own task: a request cancelled by its client never cancels the commit others wait on.
            self._draining = asyncio.create_task(self._drain(), name="rating-writer")
        return await answer

    async def _drain(self) -> None:
        while self._waiting:
            batch, self._waiting = self._waiting[: self._max_batch], self._waiting[self._max_batch :]
            items = [(waiting.caller, waiting.rating) for waiting in batch]
            try:
                outcomes = await self._write(items)
            except Exception as error:  # the commit failed: nobody in this batch is acknowledged
                outcomes = [error] * len(batch)
            except BaseException as error:  # cancelled (shutdown): answer everyone still waiting, then stop
                for waiting in [*batch, *self._waiting]:
                    if not waiting.answer.done():
                        waiting.answer.set_exception(RuntimeError("the server stopped before this rating committed"))
                raise error
            for waiting, outcome in zip(batch, outcomes, strict=True):
                if self._on_committed is not None and isinstance(outcome, StoredRating):
                    try:
                        self._on_committed(outcome.served_by, outcome.adapter_alias, outcome.rating)
                    except Exception:  # a counter must never keep a committed rating from its answer
                        log.exception("on_committed failed")
                if waiting.answer.done():
                    continue  # its client went away; the rating may be stored, and that is fine
                if isinstance(outcome, BaseException):
                    waiting.answer.set_exception(outcome)
                else:
                    waiting.answer.set_result(outcome)

    async def _transaction(self, items: list[tuple[Caller, RatingInput]]) -> list[StoredRating | FeedbackError]:
        async with self._sessions() as session, session.begin():
            return await session.run_sync(submit_ratings, items)

    async def _write(self, items: list[tuple[Caller, RatingInput]]) -> list[StoredRating | Exception]:
        try:
            return list(await self._transaction(items))
        except IntegrityError:
            # A first rating raced another process's (replicas on PostgreSQL). Each rating alone, then, and
            # twice: the second attempt finds the other's row and updates it. One collision fails no one else.
            outcomes: list[StoredRating | Exception] = []
            for item in items:
                for attempt in range(2):
                    try:
                        outcomes.extend(await self._transaction([item]))
                        break
                    except IntegrityError as error:
                        if attempt == 1:
                            outcomes.append(error)
            return outcomes
