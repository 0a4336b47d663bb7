"""Admin API (`/v1/admin/*`, admin role only): adapter versions with their live quality, promote and
roll back, tuning runs, and feedback export as JSONL."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

from litestar import Controller, get, post
from litestar.datastructures import State
from litestar.exceptions import NotFoundException
from litestar.params import Parameter
from litestar.response import Stream
from msgspec import Meta, Struct
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from feedback import adapter_registry, stats, training_data, tuning_runs
from feedback.adapter_registry import RegistryError
from feedback.models import AdapterVersion, RegistryEvent, TuningRun
from serving.adapters.manager import AdapterManager
from serving.api.auth import admin_guard
from serving.api.errors import APIError
from serving.api.schemas import DbInt


class VersionView(Struct):
    id: int
    label: str
    version: int
    status: str
    status_reason: str | None
    parent: str | None
    replaced: str | None
    tuning_run_id: int | None
    created_at: datetime
    promoted_at: datetime | None
    rank: int
    target_modules: list[str]
    sha256: str
    metrics: dict[str, Any]
    up: int
    down: int
    up_rate: float | None
    up_rate_low: float | None
    up_rate_high: float | None


class AliasView(Struct):
    name: str
    active: str | None
    canary: str | None
    canary_share: float
    canary_started_at: datetime | None
    pinned: bool
    serving: str | None  # what this server process answers with right now
    base: VersionView | None
    versions: list[VersionView]


class RunView(Struct):
    id: int
    adapter_name: str
    trigger: str
    method: str | None
    status: str
    stage: str
    progress: float
    data_counts: dict[str, Any]
    metrics: dict[str, Any]
    config: dict[str, Any]
    parent_version_id: int | None
    produced_version_id: int | None
    error: str | None
    created_at: datetime
    finished_at: datetime | None
    seconds: float | None


class PromoteRequest(Struct, forbid_unknown_fields=True):
    version: DbInt


class CanaryRequest(Struct, forbid_unknown_fields=True):
    version: DbInt
    share: Annotated[float, Meta(gt=0.0, le=1.0)]


class PinRequest(Struct, forbid_unknown_fields=True):
    pinned: bool


class TriggerRequest(Struct, forbid_unknown_fields=True):
    alias: str = "default"


class EventView(Struct):
    id: int
    version: str | None
    action: str
    actor: str
    reason: str
    evidence: dict[str, Any]
    created_at: datetime


class SeriesPointView(Struct):
    label: str
    bucket_start: datetime
    up: int
    down: int


def _version_view(v: AdapterVersion, labels: dict[int, str], tally: stats.Tally) -> VersionView:
    interval = tally.wilson()
    return VersionView(
        id=v.id,
        label=v.label,
        version=v.version,
        status=v.status,
        status_reason=v.status_reason,
        parent=labels.get(v.parent_id) if v.parent_id else None,
        replaced=labels.get(v.replaced_id) if v.replaced_id else None,
        tuning_run_id=v.tuning_run_id,
        created_at=v.created_at,
        promoted_at=v.promoted_at,
        rank=v.rank,
        target_modules=list(v.target_modules),
        sha256=v.sha256,
        metrics=dict(v.metrics or {}),
        up=tally.up,
        down=tally.down,
        up_rate=tally.up_rate,
        up_rate_low=interval[0] if interval else None,
        up_rate_high=interval[1] if interval else None,
    )


def run_view(run: TuningRun) -> RunView:
    end = run.finished_at
    return RunView(
        id=run.id,
        adapter_name=run.adapter_name,
        trigger=run.trigger,
        method=run.method,
        status=run.status,
        stage=run.stage,
        progress=run.progress,
        data_counts=dict(run.data_counts or {}),
        metrics=dict(run.metrics or {}),
        config=dict(run.config or {}),
        parent_version_id=run.parent_version_id,
        produced_version_id=run.produced_version_id,
        error=run.error,
        created_at=run.created_at,
        finished_at=end,
        seconds=(end - run.created_at).total_seconds() if end else None,
    )


def _aliases(session: Session, base_label: str, serving: dict[str, str]) -> list[AliasView]:
    versions = adapter_registry.list_versions(session)
    labels = {v.id: v.label for v in versions}
    views = []
    for alias in adapter_registry.list_aliases(session):
        tallies = stats.tallies_by_version(session, alias.name)
        base_tally = tallies.get(base_label, stats.Tally(0, 0))
        base_interval = base_tally.wilson()
        views.append(
            AliasView(
                name=alias.name,
                active=labels.get(alias.active_version_id) if alias.active_version_id else None,
                canary=labels.get(alias.canary_version_id) if alias.canary_version_id else None,
                canary_share=alias.canary_share,
                canary_started_at=alias.canary_started_at,
                pinned=alias.pinned,
                serving=serving.get(alias.name),
                base=VersionView(
                    0,
                    base_label,
                    0,
                    "base",
                    None,
                    None,
                    None,
                    None,
                    alias.created_at,
                    None,
                    0,
                    [],
                    "",
                    {},
                    base_tally.up,
                    base_tally.down,
                    base_tally.up_rate,
                    base_interval[0] if base_interval else None,
                    base_interval[1] if base_interval else None,
                ),
                versions=[
                    _version_view(v, labels, tallies.get(v.label, stats.Tally(0, 0)))
                    for v in versions
                    if v.adapter_name == alias.name
                ],
            )
        )
    return views


class AdminController(Controller):
    path = "/v1/admin"
    tags = ["admin"]
    guards = [admin_guard]

    @get("/adapters", summary="Aliases and versions: lineage, status, gate metrics, live up-rate")
    async def adapters(self, db_session: AsyncSession, adapters: AdapterManager) -> list[AliasView]:
        serving = {name: target.label for name, target in adapters.aliases.items()}
        return await db_session.run_sync(_aliases, adapters.base.label, serving)

    @post("/adapters/{name:str}/promote", summary="Make a version the alias's active one", status_code=200)
    async def promote(self, name: str, data: PromoteRequest, db_session: AsyncSession) -> dict[str, str]:
        def work(session: Session) -> str:
            record = adapter_registry.find_version(session, name, data.version)
            if record is None:
                raise NotFoundException(f"{name}@{data.version} does not exist")
            return adapter_registry.promote(session, record.id, reason="promoted by an admin").label

        return {"alias": name, "active": await self._registry_change(db_session, work)}

    @post("/adapters/{name:str}/rollback", summary="Return the alias to what it served before", status_code=200)
    async def rollback(self, name: str, db_session: AsyncSession) -> dict[str, str | None]:
        previous = await self._registry_change(
            db_session, lambda s: adapter_registry.rollback(s, name, reason="rolled back by an admin")
        )
        return {"alias": name, "active": previous.label if previous else None}

    async def _registry_change(self, db_session: AsyncSession, work: Any) -> Any:
        try:
            async with db_session.begin():
                return await db_session.run_sync(work)
        except RegistryError as exc:
            raise APIError(409, str(exc), code="conflict") from exc

    @post("/adapters/{name:str}/canary", summary="Serve a version to a share of the alias's traffic", status_code=200)
    async def start_canary(self, name: str, data: CanaryRequest, db_session: AsyncSession) -> dict[str, Any]:
        def work(session: Session) -> str:
            record = adapter_registry.find_version(session, name, data.version)
            if record is None:
                raise NotFoundException(f"{name}@{data.version} does not exist")
            return adapter_registry.start_canary(session, record.id, data.share, actor="admin").label

        return {"alias": name, "canary": await self._registry_change(db_session, work), "share": data.share}

    @post(
        "/adapters/{name:str}/canary/stop", summary="Take the canary out of traffic (it is rejected)", status_code=200
    )
    async def stop_canary(self, name: str, db_session: AsyncSession) -> dict[str, Any]:
        await self._registry_change(
            db_session,
            lambda s: adapter_registry.end_canary(
                s, name, promote_it=False, actor="admin", reason="stopped by an admin"
            ),
        )
        return {"alias": name, "canary": None}

    @post("/adapters/{name:str}/pin", summary="Pin (or unpin) an alias to its current version", status_code=200)
    async def pin(self, name: str, data: PinRequest, db_session: AsyncSession) -> dict[str, Any]:
        await self._registry_change(db_session, lambda s: adapter_registry.set_pinned(s, name, data.pinned))
        return {"alias": name, "pinned": data.pinned}

    @get("/adapters/{name:str}/events", summary="Every registry decision for an alias, with its evidence")
    async def events(
        self, name: str, db_session: AsyncSession, limit: int = Parameter(default=100, ge=1, le=1000)
    ) -> list[EventView]:
        def work(session: Session) -> list[EventView]:
            rows = session.scalars(
                select(RegistryEvent)
                .where(RegistryEvent.adapter_name == name)
                .order_by(RegistryEvent.id.desc())
                .limit(limit)
            ).all()
            labels = {v.id: v.label for v in adapter_registry.list_versions(session, name)}
            return [
                EventView(
                    e.id,
                    labels.get(e.version_id) if e.version_id else None,
                    e.action,
                    e.actor,
                    e.reason,
                    dict(e.evidence or {}),
                    e.created_at,
                )
                for e in rows
            ]

        return await db_session.run_sync(work)

    @post(
        "/runs", summary="Start a tuning round now (a separate process; the round lock still applies)", status_code=202
    )
    async def trigger(self, data: TriggerRequest, state: State) -> dict[str, Any]:
        started = await state.scheduler.start_round(data.alias)
        return {"alias": data.alias, "started": started}

    @get("/runs", summary="Tuning runs, newest first")
    async def runs(
        self, db_session: AsyncSession, limit: int = Parameter(default=50, ge=1, le=500), alias: str | None = None
    ) -> list[RunView]:
        rows = await db_session.run_sync(lambda s: tuning_runs.list_runs(s, limit=limit, alias=alias))
        return [run_view(run) for run in rows]

    @get("/runs/{run_id:int}", summary="One tuning run")
    async def run(self, run_id: Annotated[int, Parameter(ge=1, le=2**31 - 1)], db_session: AsyncSession) -> RunView:
        row = await db_session.get(TuningRun, run_id)
        if row is None:
            raise NotFoundException(f"no tuning run {run_id}")
        return run_view(row)

    @get("/stats/uprate", summary="Ratings per version per time bucket (for the dashboard chart)")
    async def uprate(
        self,
        db_session: AsyncSession,
        alias: str = "default",
        bucket_seconds: int = Parameter(default=3600, ge=10, le=86_400 * 7),
        hours: float = Parameter(default=24 * 7, gt=0, le=24 * 365),
    ) -> list[SeriesPointView]:
        since = datetime.now(UTC) - timedelta(hours=hours)
        points = await db_session.run_sync(
            lambda s: stats.uprate_series(s, alias, bucket_seconds=bucket_seconds, since=since)
        )
        return [SeriesPointView(p.label, p.bucket_start, p.up, p.down) for p in points]

    @get(
        "/feedback/export",
        summary="Feedback as JSONL: raw rows, or TRL's kto / dpo formats",
        media_type="application/x-ndjson",
    )
    async def export(
        self,
        db_session: AsyncSession,
        alias: str = "default",
        format: Literal["raw", "kto", "dpo"] = "raw",
        unused_only: bool = False,
    ) -> Stream:
        def rows(session: Session) -> list[dict[str, Any]]:
            ratings = training_data.rated_answers(session, alias, unused_only=unused_only)
            comparisons = training_data.compared_answers(session, alias, unused_only=unused_only)
            if format == "kto":
                return training_data.kto_rows(ratings, comparisons)
            if format == "dpo":
                return training_data.dpo_rows(ratings, comparisons)
            return [{"type": "rating", **r.__dict__} for r in ratings] + [
                {"type": "comparison", **c.__dict__} for c in comparisons
            ]

        exported = await db_session.run_sync(rows)

        async def lines() -> AsyncIterator[str]:
            for row in exported:
                yield json.dumps(row, default=str) + "\n"

        return Stream(lines(), media_type="application/x-ndjson")
