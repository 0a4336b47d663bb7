"""Clients that hang up mid-stream cost nothing lasting: 100 streams cancelled after their first tokens,
then 100 more streams run to `[DONE]`, and the server process's memory is back where it was."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

import httpx

from tests.durability.server import ServerProcess, server_process

CANCELLED = 100
COMPLETED = 100
CONCURRENCY = 10
WARM_UP = 20
MiB = 1024 * 1024
# Allocator pools and caches settle after the warm-up; beyond that, memory must not grow with the cancellations.
RSS_TOLERANCE = 48 * MiB
# Abandoned answers are long, so sequences left running would keep the engine busy. Cancelled, the last one is
# gone 0.04 s after its client; with the chat service not closing the engine's stream (cancellation left to the
# garbage collector, the bug fixed on 2026-12-04) the engine was still busy 1.6 s later here.
ABANDONED_MAX_TOKENS = 2000
RELEASE_SECONDS = 1.0


def _chat(max_tokens: int, number: int) -> dict[str, object]:
    return {
        "model": "default",
        "messages": [{"role": "user", "content": f"Tell me a long story, number {number}."}],
        "max_tokens": max_tokens,
        "stream": True,
    }


async def _hang_up_after_first_token(client: httpx.AsyncClient, number: int) -> None:
    async with client.stream("POST", "/v1/chat/completions", json=_chat(ABANDONED_MAX_TOKENS, number)) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if '"content"' in line:
                return  # leaving the block closes the connection with the body unread: a client gone mid-stream
    raise AssertionError("the stream ended before its first token")


async def _read_to_done(client: httpx.AsyncClient, number: int) -> None:
    async with client.stream("POST", "/v1/chat/completions", json=_chat(16, number)) as response:
        assert response.status_code == 200
        lines = [line async for line in response.aiter_lines() if line]
    assert lines[-1] == "data: [DONE]"


async def _run(requests: int, one: object, url: str) -> None:
    limit = asyncio.Semaphore(CONCURRENCY)
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:

        async def bounded(number: int) -> None:
            async with limit:
                await one(client, number)  # type: ignore[operator]

        await asyncio.gather(*(bounded(i) for i in range(requests)))


def _engine_idle(server: ServerProcess, timeout: float = 30) -> None:
    """Every cancelled sequence released: nothing running, nothing queued."""
    deadline = time.monotonic() + timeout
    while True:
        text = httpx.get(f"{server.url}/metrics", timeout=10).text
        running = float(re.search(r"^loraloop_running_sequences (\S+)$", text, re.M).group(1))  # type: ignore[union-attr]
        waiting = float(re.search(r"^loraloop_queue_depth (\S+)$", text, re.M).group(1))  # type: ignore[union-attr]
        if running == 0 and waiting == 0:
            return
        assert time.monotonic() < deadline, f"still {running} running, {waiting} waiting"
        time.sleep(0.2)


def test_cancelled_streams_release_their_memory(tiny_model_dir: Path, tmp_path: Path) -> None:
    with server_process(tmp_path / "data", tiny_model_dir, env={"OMP_NUM_THREADS": "1"}) as server:
        asyncio.run(_run(WARM_UP, _hang_up_after_first_token, server.url))
        asyncio.run(_run(WARM_UP, _read_to_done, server.url))
        _engine_idle(server)
        before = server.rss_bytes()

        asyncio.run(_run(CANCELLED, _hang_up_after_first_token, server.url))
        _engine_idle(server, timeout=RELEASE_SECONDS)  # each hang-up cancelled its sequence
        asyncio.run(_run(COMPLETED, _read_to_done, server.url))
        _engine_idle(server)
        after = server.rss_bytes()
        print(f"RSS before {before / MiB:.1f} MiB, after {after / MiB:.1f} MiB")
        assert after - before < RSS_TOLERANCE, f"RSS grew {(after - before) / MiB:.1f} MiB"
        assert httpx.get(f"{server.url}/ready", timeout=10).status_code == 200
