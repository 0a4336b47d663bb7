"""Replicas: two `loraloop serve` processes and the tuning side sharing one PostgreSQL database and one
adapter directory. A promotion reaches both within their poll interval, so does a rollback, and a tuner
never starts a round while another process holds the round lock."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from feedback import migrate
from feedback.db import make_sync_engine
from tests.conftest import _drop_postgres_database, _fresh_postgres_database
from tests.durability.server import ServerProcess
from tests.helpers import make_random_adapter, publish_adapter
from tests.web.server import LORALOOP
from tuning.lock import RoundLock

pytestmark = pytest.mark.postgres

POLL_SECONDS = 0.5
# Noticing takes at most one poll; verifying and loading the tiny adapter, and a request, take the rest.
PICKUP_DEADLINE = POLL_SECONDS + 2.5
VERSION_HEADER = "x-loraloop-adapter-version"


@pytest.fixture
def postgres_url() -> Iterator[str]:
    url, name = _fresh_postgres_database()
    try:
        migrate.upgrade(url)  # a shared PostgreSQL is upgraded deliberately, before the replicas start
        yield url
    finally:
        _drop_postgres_database(name)


@pytest.fixture
def replicas(postgres_url: str, tiny_model_dir: Path, tmp_path: Path) -> Iterator[list[ServerProcess]]:
    servers = [
        ServerProcess(
            tmp_path / f"replica-{i}",
            tiny_model_dir,
            database_url=postgres_url,
            adapter_dir=tmp_path / "adapters",
            poll_seconds=POLL_SECONDS,
            env={"OMP_NUM_THREADS": "1"},
        )
        for i in range(2)
    ]
    try:
        for server in servers:
            server.start(wait=False)  # both load their model at once
        for server in servers:
            server.wait_ready()
        yield servers
    finally:
        for server in servers:
            server.stop()


def _served_by(server: ServerProcess) -> str:
    reply = httpx.post(
        f"{server.url}/v1/chat/completions",
        json={"model": "default", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2},
        timeout=30,
    )
    assert reply.status_code == 200, reply.text
    fingerprint = reply.json()["system_fingerprint"]
    assert reply.headers[VERSION_HEADER] == fingerprint
    return fingerprint


def _seconds_until_all_serve(servers: list[ServerProcess], label: str, since: float) -> list[float]:
    """For each replica, how long after `since` its `default` first answered as `label`."""
    delays: list[float | None] = [None] * len(servers)
    while None in delays and time.monotonic() - since < PICKUP_DEADLINE + 5:
        for i, server in enumerate(servers):
            if delays[i] is None and _served_by(server) == label:
                delays[i] = time.monotonic() - since
        time.sleep(0.05)
    assert None not in delays, f"not every replica serves {label} after {PICKUP_DEADLINE + 5} s: {delays}"
    return delays  # type: ignore[return-value]


def _publish(database_url: str, adapter_dir: Path, model_dir: Path, work: Path, number: int) -> int:
    source = make_random_adapter(model_dir, work / f"source-{number}", seed=number)
    return publish_adapter(database_url, adapter_dir, source, number=number, base_model_id=model_dir.name)


def _loraloop(server: ServerProcess, *args: str) -> subprocess.CompletedProcess[str]:
    """A `loraloop` command on the replicas' database and adapter store: the tuning side, its own process."""
    return subprocess.run([str(LORALOOP), *args], env=server.environment(), capture_output=True, text=True, timeout=300)


def test_promotion_and_rollback_reach_both_replicas(
    replicas: list[ServerProcess], postgres_url: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    base = _served_by(replicas[0])
    assert _served_by(replicas[1]) == base

    _publish(postgres_url, tmp_path / "adapters", tiny_model_dir, tmp_path, 1)
    promoted = time.monotonic()
    delays = _seconds_until_all_serve(replicas, "default@1", promoted)
    print(f"promotion reached the replicas after {delays} s")
    assert max(delays) < PICKUP_DEADLINE, f"promotion reached the replicas after {delays} s"

    _publish(postgres_url, tmp_path / "adapters", tiny_model_dir, tmp_path, 2)
    promoted = time.monotonic()
    delays = _seconds_until_all_serve(replicas, "default@2", promoted)
    assert max(delays) < PICKUP_DEADLINE, f"second promotion reached the replicas after {delays} s"

    rollback = _loraloop(replicas[0], "adapters", "rollback", "default")
    rolled_back = time.monotonic()
    assert rollback.returncode == 0, rollback.stderr[-2000:]
    assert "default@1" in rollback.stdout
    delays = _seconds_until_all_serve(replicas, "default@1", rolled_back)
    print(f"rollback reached the replicas after {delays} s")
    assert max(delays) < PICKUP_DEADLINE, f"rollback reached the replicas after {delays} s"
    # And they stay there: no replica flips back on a later poll.
    time.sleep(2 * POLL_SECONDS)
    assert [_served_by(server) for server in replicas] == ["default@1", "default@1"]


def test_no_round_starts_while_another_process_holds_the_lock(
    postgres_url: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    engine = make_sync_engine(postgres_url)
    lock = RoundLock(engine, ttl_seconds=60)
    try:
        assert lock.acquire()  # as a tuner mid-round would
        # Two tuners at once, while the round runs elsewhere: both must stand down, neither trains.
        tuner = ServerProcess(tmp_path / "tuner", tiny_model_dir, database_url=postgres_url, adapter_dir=tmp_path)
        env = tuner.environment()  # the replicas' configuration; no server needs to run for the lock
        tuners = [
            subprocess.Popen(
                [str(LORALOOP), "tune"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
            for _ in range(2)
        ]
        for process in tuners:
            stdout, stderr = process.communicate(timeout=300)
            assert process.returncode == 0, stderr[-2000:]
            summary = json.loads(stdout.strip().splitlines()[-1])
            assert summary["status"] == "busy", summary
            assert lock.holder in summary["reason"]
        assert lock.current_holder() == lock.holder and not lock.lost.is_set()
    finally:
        lock.release()
        engine.dispose()
    # Released: the next tuner may take it (here, one more holder in this process stands in for it).
    engine = make_sync_engine(postgres_url)
    try:
        follower = RoundLock(engine, ttl_seconds=60)
        assert follower.acquire()
        follower.release()
    finally:
        engine.dispose()
