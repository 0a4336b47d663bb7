"""Tuning-run records: what a round did, how far it got, and how it ended."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from feedback.models import RunStatus, TuningRun, utcnow


def start_run(session: Session, *, alias: str, trigger: str, config: dict[str, Any], owner: str) -> TuningRun:
    run = TuningRun(adapter_name=alias, trigger=trigger, config=config, owner=owner, status=RunStatus.RUNNING)
    session.add(run)
    session.flush()
    return run


def report_progress(
    session: Session, run_id: int, *, stage: str, progress: float, metrics: dict[str, Any] | None = None
) -> None:
    values: dict[str, Any] = {"stage": stage, "progress": max(0.0, min(1.0, progress)), "heartbeat_at": utcnow()}
    if metrics is not None:
        values["metrics"] = metrics
    session.execute(update(TuningRun).where(TuningRun.id == run_id).values(**values))


def finish_run(
    session: Session,
    run_id: int,
    status: RunStatus,
    *,
    error: str | None = None,
    metrics: dict[str, Any] | None = None,
    produced_version_id: int | None = None,
) -> TuningRun:
    run = session.get_one(TuningRun, run_id)
    run.status = status
    run.stage = "done" if status != RunStatus.FAILED else "failed"
    run.progress = 1.0 if status == RunStatus.SUCCEEDED else run.progress
    run.finished_at = utcnow()
    run.heartbeat_at = run.finished_at
    if error is not None:
        run.error = error
    if metrics is not None:
        run.metrics = metrics
    if produced_version_id is not None:
        run.produced_version_id = produced_version_id
    session.flush()
    return run


def fail_abandoned_runs(session: Session, *, stale_after: timedelta) -> list[int]:
    """Runs whose process died (no heartbeat for `stale_after`) are marked failed, never left running."""
    cutoff = utcnow() - stale_after
    stale = list(
        session.scalars(select(TuningRun).where(TuningRun.status == RunStatus.RUNNING, TuningRun.heartbeat_at < cutoff))
    )
    for run in stale:
        run.status = RunStatus.FAILED
        run.stage = "failed"
        run.error = f"abandoned: no heartbeat since {run.heartbeat_at:%Y-%m-%d %H:%M:%S} UTC (the process died)"
        run.finished_at = utcnow()
    session.flush()
    return [run.id for run in stale]


def list_runs(session: Session, *, limit: int = 50, alias: str | None = None) -> list[TuningRun]:
    query = select(TuningRun).order_by(TuningRun.id.desc()).limit(limit)
    if alias is not None:
        query = query.where(TuningRun.adapter_name == alias)
    return list(session.scalars(query))


@dataclass(frozen=True)
class FinishedRun:
    id: int
    alias: str
    status: str
    seconds: float


def finished_since(session: Session, after_id: int | None) -> list[FinishedRun]:
    """Runs that ended with an id above `after_id` (None: only the newest one, to learn where to start)."""
    query = select(TuningRun).where(TuningRun.finished_at.is_not(None)).order_by(TuningRun.id)
    if after_id is None:
        query = query.order_by(None).order_by(TuningRun.id.desc()).limit(1)
    else:
        query = query.where(TuningRun.id > after_id)
    return [
        FinishedRun(run.id, run.adapter_name, run.status, (run.finished_at - run.created_at).total_seconds())
        for run in session.scalars(query)
        if run.finished_at is not None
    ]
