"""The single-round lock: only one tuning round runs at a time across every process and replica.

The lease lives in the database (`feedback.locks`) and a background thread renews it while the
round works; if the renewal ever fails, the round has lost exclusivity and must not promote.
"""

from __future__ import annotations

import os
import socket
import threading
import uuid
from collections.abc import Callable
from datetime import timedelta
from types import TracebackType

import structlog
from sqlalchemy import Engine

from feedback import locks
from feedback.db import session_scope

log = structlog.get_logger(__name__)

ROUND_LOCK = "tuning-round"


class RoundLock:
    def __init__(self, db: Engine, *, ttl_seconds: float, name: str = ROUND_LOCK) -> None:
        self.db = db
        self.name = name
        self.ttl = timedelta(seconds=ttl_seconds)
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.held = False
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.on_renew: Callable[[], None] | None = None  # e.g. the run record's heartbeat

    def acquire(self) -> bool:
        with session_scope(self.db) as session:
            self.held = locks.try_acquire(session, self.name, self.holder, self.ttl)
        if self.held:
            self._thread = threading.Thread(target=self._renew_until_released, name="round-lock", daemon=True)
            self._thread.start()
        return self.held

    def current_holder(self) -> str | None:
        with session_scope(self.db) as session:
            return locks.holder_of(session, self.name)

    def _renew_until_released(self) -> None:
        interval = self.ttl.total_seconds() / 3
        while not self._stop.wait(interval):
            try:
                with session_scope(self.db) as session:
                    still_ours = locks.renew(session, self.name, self.holder, self.ttl)
            except Exception:
                log.exception("could not renew the round lock")
                continue
            if not still_ours:
                log.error("the round lock was taken over: this round will not promote", holder=self.holder)
                self.lost.set()
                return
            if self.on_renew is not None:
                try:
                    self.on_renew()
                except Exception:
                    log.exception("heartbeat failed")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.held:
            with session_scope(self.db) as session:
                locks.release(session, self.name, self.holder)
            self.held = False

    def __enter__(self) -> RoundLock:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()
