"""The schedule: each server starts tuning rounds by itself and decides canaries, without stalling serving.

Every `schedule_check_seconds` the scheduler looks at each alias:
- a canary in progress is judged on its live ratings against the active version's over the same
  period (`tuning/canary.py`) and promoted or rolled back, with the evidence recorded;
- otherwise, with at least `schedule_min_feedback` new ratings and `schedule_interval_seconds` since
  the alias's last round, it starts `loraloop tune` as a separate process (training never runs in the
  server's process). The round itself takes the database lock, so however many replicas schedule,
  only one round runs at a time; the others find the lock held and stand down.

This module imports no training code: it only reads the database and starts processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import structlog
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session

from feedback import adapter_registry, stats, training_data
from feedback.adapter_registry import RegistryError
from feedback.models import Adapter, AdapterVersion, RunStatus, TuningRun, utcnow
from serving.settings import Settings
from tuning.canary import CanaryDecision, decide
from tuning.settings import TuningSettings

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class AliasState:
    name: str
    pinned: bool
    active_label: str | None
    canary_id: int | None
    canary_label: str | None
    canary_since: datetime | None
    new_feedback: int
    last_round_at: datetime | None
    round_running: bool


def read_state(session: Session) -> list[AliasState]:
    states = []
    for adapter in session.scalars(select(Adapter).order_by(Adapter.name)):
        labels = {
            v.id: v.label
            for v in session.scalars(
                select(AdapterVersion).where(
                    AdapterVersion.id.in_([i for i in (adapter.active_version_id, adapter.canary_version_id) if i])
                )
            )
        }
        last = session.scalars(
            select(TuningRun).where(TuningRun.adapter_name == adapter.name).order_by(TuningRun.id.desc()).limit(1)
        ).first()
        states.append(
            AliasState(
                name=adapter.name,
                pinned=adapter.pinned,
                active_label=labels.get(adapter.active_version_id) if adapter.active_version_id else None,
                canary_id=adapter.canary_version_id,
                canary_label=labels.get(adapter.canary_version_id) if adapter.canary_version_id else None,
                canary_since=adapter.canary_started_at,
                new_feedback=training_data.count_unused(session, adapter.name),
                last_round_at=last.created_at if last else None,
                round_running=last is not None and last.status == RunStatus.RUNNING,
            )
        )
    return states


def judge_canary(session: Session, state: AliasState, base_label: str, tuning: TuningSettings) -> CanaryDecision | None:
    """Decide the alias's canary and apply the decision in this transaction (None: it changed meanwhile)."""
    adapter = session.get(Adapter, state.name)
    if adapter is None or adapter.canary_version_id != state.canary_id or adapter.pinned:
        return None
    tallies = stats.tallies_by_version(session, state.name, since=state.canary_since)
    canary = tallies.get(state.canary_label or "", stats.Tally(0, 0))
    incumbent = tallies.get(state.active_label or base_label, stats.Tally(0, 0))
    decision = decide(canary, incumbent, tuning)
    if decision.action != "continue":
        adapter_registry.end_canary(
            session,
            state.name,
            promote_it=decision.action == "promote",
            actor="canary",
            reason=f"canary {decision.action}: {decision.reason}",
            evidence=dict(decision.evidence),
        )
    return decision


def round_command(settings: Settings, tuning: TuningSettings, alias: str) -> tuple[list[str], dict[str, str]]:
    """`loraloop tune` for one alias, with this server's exact settings passed through the environment."""
    env = dict(os.environ)
    for prefix, values in (
        ("LORALOOP_", settings.model_dump(mode="json")),
        ("LORALOOP_TUNING_", tuning.model_dump(mode="json")),
    ):
        for name, value in values.items():
            if value is not None:
                env[f"{prefix}{name.upper()}"] = _env_value(value)
    return [sys.executable, "-m", "serving.cli", "tune", "--alias", alias, "--trigger", "schedule"], env


def yield_cpu_to_serving(niceness: int) -> int:
    """Lower this process's CPU priority (a round a server started on its own machine); the new nice value."""
    if not hasattr(os, "nice"):  # POSIX-only
        return 0
    return os.nice(max(niceness, 0))  # os.nice(0) only reads it


def _env_value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


class Scheduler:
    def __init__(
        self,
        settings: Settings,
        tuning: TuningSettings,
        sessions: async_sessionmaker[AsyncSession],
        base_label: str,
    ) -> None:
        self.settings = settings
        self.tuning = tuning
        self.sessions = sessions
        self.base_label = base_label
        self._children: dict[str, asyncio.subprocess.Process] = {}
        self._task: asyncio.Task[None] | None = None

    async def tick(self) -> None:
        async with self.sessions() as session:
            states = await session.run_sync(read_state)
        for state in states:
            if state.pinned:
                continue
            if state.canary_id is not None:
                async with self.sessions() as session, session.begin():
                    decision = await session.run_sync(judge_canary, state, self.base_label, self.tuning)
                if decision is not None and decision.action != "continue":
                    log.info("canary decided", alias=state.name, action=decision.action, **decision.evidence)
            elif self._round_due(state):
                await self.start_round(state.name)

    def _round_due(self, state: AliasState) -> bool:
        if state.round_running or self._child_running(state.name):
            return False
        if state.new_feedback < self.tuning.schedule_min_feedback:
            return False
        interval = timedelta(seconds=self.tuning.schedule_interval_seconds)
        return state.last_round_at is None or utcnow() - state.last_round_at >= interval

    def _child_running(self, alias: str) -> bool:
        child = self._children.get(alias)
        return child is not None and child.returncode is None

    async def start_round(self, alias: str) -> bool:
        """Start a round as its own process (the admin API's trigger uses this too)."""
        if self._child_running(alias):
            return False
        command, env = round_command(self.settings, self.tuning, alias)
        log.info("starting a scheduled tuning round", alias=alias)
        self._children[alias] = await asyncio.create_subprocess_exec(
            *command, env=env, stdout=asyncio.subprocess.DEVNULL, stderr=None
        )
        return True

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.tuning.schedule_check_seconds)
            try:
                await self.tick()
            except RegistryError as exc:
                log.warning("schedule step skipped", reason=str(exc))
            except Exception:  # the schedule must outlive a DB hiccup
                log.exception("schedule step failed")

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="tuning-schedule")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        # A round in progress is left to finish: it is its own process and holds the lock.
