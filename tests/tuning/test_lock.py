"""One round at a time: the database lease admits one holder, survives a crashed holder, and two
schedulers racing on the same database never train at the same time."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest

from feedback import locks
from feedback.db import make_sync_engine, session_scope
from serving.settings import Settings
from tests.tuning.test_round import FAST, _rate_answers
from tuning import trainer
from tuning.lock import RoundLock
from tuning.round import run_round


def test_lease_admits_one_holder_and_expires(database_url: str) -> None:
    engine = make_sync_engine(database_url)
    first, second = RoundLock(engine, ttl_seconds=30), RoundLock(engine, ttl_seconds=30)
    assert first.acquire()
    assert not second.acquire()
    assert second.current_holder() == first.holder
    first.release()
    assert second.acquire()
    second.release()

    # A holder that died (no renewals) blocks others only until its lease expires.
    with session_scope(engine) as session:
        assert locks.try_acquire(session, "tuning-round", "crashed-process", timedelta(seconds=1))
    late = RoundLock(engine, ttl_seconds=30)
    assert not late.acquire()
    time.sleep(1.2)
    assert late.acquire()
    late.release()
    engine.dispose()


def test_two_schedulers_never_train_at_once(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    _rate_answers(settings, 8)
    training: list[tuple[float, float]] = []
    real_train = trainer.train_kto

    def slow_train(*args, **kwargs):
        started = time.monotonic()
        time.sleep(1.5)  # long enough for the other scheduler to try
        result = real_train(*args, **kwargs)
        training.append((started, time.monotonic()))
        return result

    monkeypatch.setattr(trainer, "train_kto", slow_train)
    outcomes = [None, None]

    def schedule(i: int) -> None:
        outcomes[i] = run_round(settings, FAST, alias="default", trigger="schedule")

    threads = [threading.Thread(target=schedule, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    statuses = sorted(o.status for o in outcomes)
    assert statuses == ["busy", "promoted"], [o.summary() for o in outcomes]
    assert len(training) == 1
