"""Where the adapter is swapped: each server polls the registry and follows promotions.

Every `poll_seconds` the watcher reads each alias's active version. A change is loaded into a
free slot (hash and config verified first), then the alias flips for new requests; in-flight
requests finish on their old version, which is unloaded once drained. A version that fails to
verify is marked failed in the registry and the alias keeps serving what it served before.
"""

from __future__ import annotations

import asyncio
import contextlib

import structlog
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from feedback import adapter_registry, tuning_runs
from feedback.adapter_registry import VersionRecord
from serving.adapters.manager import AdapterManager
from serving.metrics import Metrics

log = structlog.get_logger(__name__)


class RegistryWatcher:
    def __init__(
        self,
        manager: AdapterManager,
        sessions: async_sessionmaker[AsyncSession],
        poll_seconds: float,
        metrics: Metrics | None = None,
    ) -> None:
        self.manager = manager
        self.sessions = sessions
        self.poll_seconds = poll_seconds
        self.metrics = metrics
        self._task: asyncio.Task[None] | None = None
        self._last_finished_run: int | None = None

    async def sync_once(self) -> None:
        async with self.sessions() as session:
            wanted = await session.run_sync(adapter_registry.routing_table)
            finished = await session.run_sync(tuning_runs.finished_since, self._last_finished_run)
        for alias, routing in wanted.items():
            await self._follow_active(alias, routing.active)
            await self._follow_canary(alias, routing.canary, routing.canary_share)
        self._observe_rounds(finished)

    async def _follow_active(self, alias: str, record: VersionRecord | None) -> None:
        current = self.manager.aliases.get(alias)
        if current is not None and current.version_id == (record.id if record else None):
            return
        if await self.manager.set_active(alias, record):
            log.info("alias now serves", alias=alias, version=record.label if record else "base")
            if current is not None and self.metrics is not None:
                self.metrics.swaps.labels(alias).inc()
        elif self.metrics is not None:
            self.metrics.swap_failures.labels(alias).inc()

    async def _follow_canary(self, alias: str, record: VersionRecord | None, share: float) -> None:
        current = self.manager.canaries.get(alias)
        have = (current[0].version_id, current[1]) if current else (None, 0.0)
        want = (record.id, share) if record else (None, 0.0)
        if have == want:
            return
        if await self.manager.set_canary(alias, record, share):
            log.info("canary", alias=alias, version=record.label if record else None, share=share)
        elif self.metrics is not None:
            self.metrics.swap_failures.labels(alias).inc()

    def _observe_rounds(self, finished: list[tuning_runs.FinishedRun]) -> None:
        """Rounds run in their own processes; each server counts those that ended since it started."""
        first_poll = self._last_finished_run is None
        if finished:
            self._last_finished_run = max(run.id for run in finished)
        elif first_poll:
            self._last_finished_run = 0
        if first_poll or self.metrics is None:
            return
        for run in finished:
            self.metrics.rounds.labels(run.alias, run.status).inc()
            self.metrics.round_seconds.labels(run.alias, run.status).observe(run.seconds)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.poll_seconds)
            try:
                await self.sync_once()
            except Exception:  # a DB hiccup must not stop the watcher; the next poll retries
                log.exception("registry poll failed")

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="registry-watcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


class RegistryAccess:
    """The two registry calls the adapter manager makes, each in its own short session."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self.sessions = sessions

    async def find_version(self, name: str, number: int) -> VersionRecord | None:
        async with self.sessions() as session:
            return await session.run_sync(adapter_registry.find_version, name, number)

    async def report_failure(self, record: VersionRecord, reason: str) -> None:
        async with self.sessions() as session, session.begin():
            await session.run_sync(adapter_registry.mark_failed, record.id, reason)
