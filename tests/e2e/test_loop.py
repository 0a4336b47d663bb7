"""The whole loop with the real server, the real bundled model and the official `openai` client:
chat → thumbs → `loraloop tune` → the running server answers with the new version, no restart."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from sqlalchemy import func, select

from feedback.db import make_sync_engine, session_scope
from feedback.models import Completion, Feedback
from tests.conftest import MODEL_CACHE

pytestmark = pytest.mark.bundled_model

LORALOOP = Path(sys.executable).parent / "loraloop"
QUESTIONS = [
    "What is the capital of France?",
    "Name a primary colour.",
    "What is 2 + 2?",
    "Give me a word that rhymes with cat.",
    "What do bees make?",
    "Which planet is known as the red planet?",
]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, dict[str, str]]]:
    port = _free_port()
    env = os.environ | {
        "LORALOOP_DATA_DIR": str(tmp_path / "data"),
        "LORALOOP_MODEL_CACHE_DIR": str(MODEL_CACHE),
        "LORALOOP_PORT": str(port),
        "LORALOOP_SWAP_POLL_SECONDS": "0.5",
        "LORALOOP_LOG_FORMAT": "json",
    }
    log = (tmp_path / "server.log").open("w")
    process = subprocess.Popen([str(LORALOOP), "serve"], env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if process.poll() is not None:
                pytest.fail(f"server exited: {(tmp_path / 'server.log').read_text()[-3000:]}")
            try:
                if httpx.get(f"{base}/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        else:
            pytest.fail("server not ready within 120 s")
        yield base, env
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


# The real model's full gate (62 factual probes answered by both contenders) takes minutes on a busy 2-core CPU.
@pytest.mark.timeout(1200)
def test_chat_rate_tune_and_hot_swap(server: tuple[str, dict[str, str]], tmp_path: Path) -> None:
    base, env = server
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused-in-local-mode")

    reply = client.chat.completions.create(
        model="default", messages=[{"role": "user", "content": QUESTIONS[0]}], max_tokens=32, temperature=0
    )
    assert "Paris" in reply.choices[0].message.content
    assert reply.system_fingerprint == "SmolLM2-135M-Instruct"  # `default` answers with the base until tuned

    stream = client.chat.completions.create(
        model="default",
        messages=[{"role": "user", "content": QUESTIONS[1]}],
        max_tokens=24,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    streamed_id = chunks[0].id
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    ids = [reply.id, streamed_id]
    for question in QUESTIONS[2:]:
        ids.append(
            client.chat.completions.create(
                model="default", messages=[{"role": "user", "content": question}], max_tokens=24
            ).id
        )
    for i, completion_id in enumerate(ids):
        rated = httpx.post(f"{base}/v1/feedback", json={"completion_id": completion_id, "rating": 1 if i % 2 else -1})
        assert rated.status_code == 200, rated.text

    tune = subprocess.run(
        [str(LORALOOP), "tune"],
        env=env
        | {
            "LORALOOP_TUNING_MAX_STEPS": "3",
            "LORALOOP_TUNING_BATCH_SIZE": "4",
            # Small steps: this test is about the loop's plumbing. Three steps at the default 1.5e-4 on six
            # ratings answered "What is the capital of France?" with "L'Étoile, la Marseillaise, la femme…"
            # and the gate rightly refused that candidate (4 of 86 probe answers became non-answers).
            "LORALOOP_TUNING_LEARNING_RATE": "2e-5",
            "LORALOOP_TUNING_CANARY_SHARE": "0",
        },
        capture_output=True,
        text=True,
        timeout=1000,
    )
    assert tune.returncode == 0, tune.stderr[-3000:]
    summary = json.loads(tune.stdout.strip().splitlines()[-1])
    assert summary["status"] == "promoted" and summary["version"] == "default@1", summary

    models = [m.id for m in client.models.list().data]
    assert "default@1" in models
    deadline = time.monotonic() + 15
    while True:  # the server notices the promotion within its poll interval
        after = client.chat.completions.create(
            model="default", messages=[{"role": "user", "content": QUESTIONS[0]}], max_tokens=16
        )
        if after.system_fingerprint == "default@1" or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert after.system_fingerprint == "default@1"

    engine = make_sync_engine(f"sqlite:///{tmp_path / 'data' / 'loraloop.db'}")
    with session_scope(engine) as session:
        stored = {c.id: c.served_by for c in session.scalars(select(Completion))}
        assert set(ids) | {after.id} <= set(stored)
        assert stored[after.id] == "default@1"
        assert session.scalar(select(func.count()).select_from(Feedback)) == len(ids)
    engine.dispose()
