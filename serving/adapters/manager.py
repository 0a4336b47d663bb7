"""Which adapter version answers a request, and keeping those versions loaded in the engine.

A request's `model` names an alias (its active version), a pinned version (`name@N`) or the base
model. Each request holds a lease on the version it resolved to, so a swap never pulls weights
from under a running sequence: the alias flips at once for new requests, and the old version is
unloaded only after its last lease is returned.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import structlog

from feedback.adapter_registry import VersionRecord
from serving.adapters.store import AdapterRejected, read_version
from serving.engine.lora import SERVABLE_MODULES
from serving.engine.types import Engine, EngineOverloaded

log = structlog.get_logger(__name__)

FindVersion = Callable[[str, int], Awaitable[VersionRecord | None]]
ReportFailure = Callable[[VersionRecord, str], Awaitable[None]]


class UnknownModel(LookupError):
    """The request named no alias, version or base model this server knows."""


class AdapterUnavailable(RuntimeError):
    """The version exists but cannot be served (failed verification, or no free slot)."""


@dataclass(frozen=True)
class ServingTarget:
    """What answers: an engine adapter key (None = base), and the label reported to the client."""

    label: str  # "default@3", or the base model id
    key: str | None = None
    version_id: int | None = None
    alias: str | None = None


class AdapterManager:
    def __init__(
        self,
        engine: Engine,
        store: Path,
        base_model_id: str,
        *,
        max_rank: int,
        find_version: FindVersion,
        report_failure: ReportFailure,
    ) -> None:
        self.engine = engine
        self.store = store
        self.base = ServingTarget(label=base_model_id)
        self.max_rank = max_rank
        self._find_version = find_version
        self._report_failure = report_failure
        self._active: dict[str, ServingTarget] = {}
        self._canary: dict[str, tuple[ServingTarget, float]] = {}
        self._leases: Counter[str] = Counter()
        self._resident: OrderedDict[str, ServingTarget] = OrderedDict()  # least recently used first
        self._failed: set[int] = set()
        self._load_lock = asyncio.Lock()
        self._released = asyncio.Condition()

    # -- what the API uses -------------------------------------------------------------------
    @property
    def aliases(self) -> dict[str, ServingTarget]:
        return dict(self._active)

    @property
    def canaries(self) -> dict[str, tuple[ServingTarget, float]]:
        return dict(self._canary)

    @property
    def resident(self) -> list[ServingTarget]:
        return list(self._resident.values())

    @staticmethod
    def _draw(alias: str, user: str | None) -> float:
        """Where a request falls in [0, 1): stable per end user (one user sees one arm), random otherwise."""
        if not user:
            return random.random()
        digest = hashlib.sha256(f"{alias}\0{user}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64

    async def resolve(self, model: str, user: str | None = None) -> ServingTarget:
        if model in self._active:
            canary = self._canary.get(model)
            if canary is not None and self._draw(model, user) < canary[1]:
                return canary[0]
            return self._active[model]
        if model == self.base.label or model == "base":
            return self.base
        name, at, number = model.rpartition("@")
        if at and name in self._active and number.isdigit():
            active = self._active[name]
            if active.label == model:
                return active
            record = await self._find_version(name, int(number))
            if record is None:
                raise UnknownModel(f"alias {name!r} has no version {number}")
            return await self._ensure_loaded(record)
        raise UnknownModel(f"the model {model!r} does not exist")

    @asynccontextmanager
    async def lease(self, model: str, user: str | None = None) -> AsyncIterator[ServingTarget]:
        """Resolve `model` and keep its weights loaded until the block exits."""
        target = await self.resolve(model, user)
        if target.key is not None:
            self._leases[target.key] += 1
            self._resident.move_to_end(target.key, last=True)
        try:
            yield target
        finally:
            if target.key is not None:
                self._leases[target.key] -= 1
                async with self._released:
                    self._released.notify_all()

    # -- what the hot-swapper uses ------------------------------------------------------------
    async def set_active(self, alias: str, record: VersionRecord | None) -> bool:
        """Point an alias at a version (None = base). False when the version cannot be served."""
        current = self._active.get(alias)
        if record is None:
            target = ServingTarget(label=self.base.label, alias=alias)
        else:
            if current is not None and current.version_id == record.id:
                return True
            if record.id in self._failed:
                return False
            try:
                target = await self._ensure_loaded(record)
            except AdapterUnavailable:
                return False
        self._active[alias] = ServingTarget(target.label, target.key, target.version_id, alias)
        if current is not None and current.key is not None and current.key != target.key:
            log.info("adapter swapped", alias=alias, old=current.label, new=target.label)
            asyncio.get_running_loop().create_task(self._unload_when_drained(current.key))
        return True

    async def set_canary(self, alias: str, record: VersionRecord | None, share: float) -> bool:
        """Send `share` of the alias's traffic to a candidate version (None: stop the canary)."""
        current = self._canary.get(alias)
        if record is None or share <= 0:
            self._canary.pop(alias, None)
        else:
            if record.id in self._failed:
                return False
            try:
                target = await self._ensure_loaded(record)
            except AdapterUnavailable:
                return False
            self._canary[alias] = (ServingTarget(target.label, target.key, target.version_id, alias), share)
        if current is not None and current[0].key != (self._canary.get(alias, (ServingTarget(""), 0))[0].key):
            asyncio.get_running_loop().create_task(self._unload_when_drained(current[0].key))  # type: ignore[arg-type]
        return True

    def _in_use(self) -> set[str | None]:
        return {t.key for t in self._active.values()} | {t.key for t, _ in self._canary.values()}

    async def _ensure_loaded(self, record: VersionRecord) -> ServingTarget:
        key = record.label
        async with self._load_lock:
            if key in self._resident:
                self._resident.move_to_end(key)
                return self._resident[key]
            if record.id in self._failed:
                raise AdapterUnavailable(f"{key} failed verification and is not served")
            try:
                weights = await asyncio.to_thread(
                    read_version,
                    self.store,
                    record.path,
                    record.sha256,
                    max_rank=self.max_rank,
                    allowed_modules=SERVABLE_MODULES,
                )
                await self._make_room()
                await self.engine.load_adapter(key, weights)
            except AdapterRejected as exc:
                self._failed.add(record.id)
                log.error("adapter refused", adapter=key, reason=str(exc))
                await self._report_failure(record, str(exc))
                raise AdapterUnavailable(f"{key} cannot be served: {exc}") from exc
            except EngineOverloaded as exc:
                raise AdapterUnavailable(str(exc)) from exc
            target = ServingTarget(label=key, key=key, version_id=record.id, alias=record.adapter_name)
            self._resident[key] = target
            return target

    async def _make_room(self) -> None:
        """Evict the least recently used adapter that no alias points at and no request holds."""
        if len(self._resident) < self.engine.max_loaded_adapters:
            return
        in_use = self._in_use()
        for key in list(self._resident):
            if key not in in_use and self._leases[key] == 0:
                await self._unload(key)
                return
        raise EngineOverloaded("every adapter slot is held by an alias or a running request")

    async def _unload(self, key: str) -> None:
        self._resident.pop(key, None)
        await self.engine.unload_adapter(key)

    async def _unload_when_drained(self, key: str) -> None:
        async with self._released:
            await self._released.wait_for(lambda: self._leases[key] == 0)
        async with self._load_lock:
            if key not in self._in_use() and self._leases[key] == 0 and key in self._resident:
                await self._unload(key)
