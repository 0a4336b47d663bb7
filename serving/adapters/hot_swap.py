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

from feedback import adapter_registry
from feedback.adapter_registry import VersionRecord
from serving.adapters.manager import AdapterManager

log = structlog.get_logger(__name__)


class RegistryWatcher:
    def __init__(
        self, manager: AdapterManager, sessions: async_sessionmaker[AsyncSession], poll_seconds: float
    ) -> None:
        self.manager = manager
        self.sessions = sessions
        self.poll_seconds = poll_seconds
        self._task: asyncio.Task[None] | None = None
        self.swaps = 0

    async def sync_once(self) -> None:
        async with self.sessions() as session:
            wanted = await session.run_sync(adapter_registry.active_versions)
        for alias, record in wanted.items():
            current = self.manager.aliases.get(alias)
            if current is not None and current.version_id == (record.id if record else None):
                continue
            if await self.manager.set_active(alias, record):
                self.swaps += current is not None
                log.info("alias now serves", alias=alias, version=record.label if record else "base")

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
