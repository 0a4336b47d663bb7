"""Live quality per adapter version: thumbs up and down on the answers each version gave.

This is what makes the loop measurable: every rating belongs to one answer, every answer to one
version (`completions.served_by`), so up-rates compare versions directly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from feedback.models import Completion, Feedback, FeedbackStatus


@dataclass(frozen=True)
class Tally:
    up: int
    down: int

    @property
    def total(self) -> int:
        return self.up + self.down

    @property
    def up_rate(self) -> float | None:
        return self.up / self.total if self.total else None

    def wilson(self, z: float = 1.96) -> tuple[float, float] | None:
        """95 % Wilson score interval of the up-rate (honest at small counts, unlike p ± 1.96·se)."""
        n = self.total
        if n == 0:
            return None
        p = self.up / n
        centre = (p + z * z / (2 * n)) / (1 + z * z / n)
        half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
        return max(0.0, centre - half), min(1.0, centre + half)


def _counted():
    up = func.sum(case((Feedback.rating > 0, 1), else_=0))
    down = func.sum(case((Feedback.rating < 0, 1), else_=0))
    return up, down


def tallies_by_version(session: Session, alias: str | None = None, since: datetime | None = None) -> dict[str, Tally]:
    """Active ratings per serving label ("default@3", or the base model id)."""
    up, down = _counted()
    query = (
        select(Completion.served_by, up, down)
        .join(Feedback, Feedback.completion_id == Completion.id)
        .where(Feedback.status == FeedbackStatus.ACTIVE, Feedback.rating != 0)
        .group_by(Completion.served_by)
    )
    if alias is not None:
        query = query.where(Completion.adapter_alias == alias)
    if since is not None:
        query = query.where(Feedback.updated_at >= since)
    return {label: Tally(int(u or 0), int(d or 0)) for label, u, d in session.execute(query)}


@dataclass(frozen=True)
class SeriesPoint:
    label: str
    bucket_start: datetime
    up: int
    down: int


def uprate_series(session: Session, alias: str, *, bucket_seconds: int, since: datetime) -> list[SeriesPoint]:
    """Ratings per version per time bucket (bucketed here: the same code on SQLite and PostgreSQL)."""
    rows = session.execute(
        select(Completion.served_by, Feedback.updated_at, Feedback.rating)
        .join(Feedback, Feedback.completion_id == Completion.id)
        .where(
            Completion.adapter_alias == alias,
            Feedback.status == FeedbackStatus.ACTIVE,
            Feedback.rating != 0,
            Feedback.updated_at >= since,
        )
    ).all()
    buckets: dict[tuple[str, int], list[int]] = {}
    for label, at, rating in rows:
        key = (label, int(at.timestamp()) // bucket_seconds * bucket_seconds)
        counts = buckets.setdefault(key, [0, 0])
        counts[0 if rating > 0 else 1] += 1
    return [
        SeriesPoint(label, datetime.fromtimestamp(start, tz=since.tzinfo), up, down)
        for (label, start), (up, down) in sorted(buckets.items(), key=lambda item: (item[0][1], item[0][0]))
    ]
