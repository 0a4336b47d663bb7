"""No acknowledged rating is lost: many concurrent clients against a real server process, on SQLite and
PostgreSQL, and again with the server killed by SIGKILL mid-load and restarted (bench/load.py is the long
version). Each test is bounded: a few seconds of load on a tiny random model."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from tests.durability.load import check_ratings, run_load, seed_completions
from tests.durability.server import ServerProcess, server_process

LOAD_SECONDS = 4.0
CLIENTS = 32
CHAT_CLIENTS = 2
COMPLETIONS = 3000


def test_every_acknowledged_rating_is_stored_once(database_url: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    completion_ids = seed_completions(database_url, COMPLETIONS)
    with server_process(tmp_path / "data", tiny_model_dir, database_url=database_url) as server:
        result = asyncio.run(
            run_load(server.url, completion_ids, seconds=LOAD_SECONDS, clients=CLIENTS, chat_clients=CHAT_CLIENTS)
        )
    verdict = check_ratings(database_url, result)
    assert result.errors == {}, result.errors
    assert result.chats > 0 and verdict.acknowledged > 100
    assert verdict.ok, verdict
    assert verdict.rows == len(result.ledger)  # nothing was in doubt, so every rating sent is a row


def test_sigkill_mid_load_loses_nothing_acknowledged(database_url: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    completion_ids = seed_completions(database_url, COMPLETIONS)
    server = ServerProcess(tmp_path / "data", tiny_model_dir, database_url=database_url)
    server.start()
    try:

        async def kill_and_restart() -> None:
            await asyncio.sleep(LOAD_SECONDS / 2)
            server.kill()  # mid-load: requests in flight, a batch perhaps mid-commit
            await asyncio.to_thread(server.start)  # waits for /ready on the same data

        result = asyncio.run(
            run_load(
                server.url,
                completion_ids,
                seconds=LOAD_SECONDS,
                clients=CLIENTS,
                chat_clients=CHAT_CLIENTS,
                disruption=kill_and_restart,
            )
        )
        assert server.starts == 2
        assert httpx.get(f"{server.url}/ready", timeout=10).status_code == 200
        # After the restart the clients went on: ratings were acknowledged by the new process too.
        assert result.retried > 0
    finally:
        server.stop()
    verdict = check_ratings(database_url, result)
    assert result.errors == {}, result.errors
    assert verdict.ok, verdict
    # Every rating whose answer the kill cut off was re-sent with its feedback_id and then acknowledged.
    assert all(sent.acked for sent in result.ledger.values())


@pytest.fixture(autouse=True)
def _fewer_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    # The server shares two cores with the load generator: one torch thread is plenty for the tiny model.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
