"""`/v1/chat/completions`, `/v1/models`, `/health`, `/ready` through HTTP on the tiny model, on both databases."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

import msgspec
import pytest
from litestar.testing import AsyncTestClient
from sqlalchemy import select

from feedback.callers import LOCAL_CALLER
from feedback.db import make_sync_engine, session_scope
from feedback.models import Completion
from serving.api.schemas import ChatCompletionRequest
from serving.engine.types import GenerationChunk, GenerationRequest
from serving.settings import Settings

CHAT = {"model": "default", "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 8}


def _completions(settings: Settings) -> list[Completion]:
    engine = make_sync_engine(settings.database_url)
    with session_scope(engine) as session:
        rows = list(session.scalars(select(Completion).order_by(Completion.created_at)))
    engine.dispose()
    return rows


async def test_chat_completion_is_answered_and_recorded(client: AsyncTestClient, settings: Settings) -> None:
    response = await client.post("/v1/chat/completions", json=CHAT | {"user": "alice", "temperature": 0})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-")
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert body["choices"][0]["finish_reason"] in {"stop", "length"}
    assert body["system_fingerprint"] == response.headers["x-loraloop-adapter-version"]
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]

    [stored] = _completions(settings)
    assert stored.id == body["id"]
    assert stored.answer == body["choices"][0]["message"]["content"]
    assert stored.end_user == "alice"
    assert stored.adapter_alias == "default"
    assert stored.served_by == body["system_fingerprint"]
    assert stored.prompt_messages == [{"role": "user", "content": "Hello there"}]
    assert stored.sampling["temperature"] == 0


async def test_stream_sends_chunks_usage_and_done(client: AsyncTestClient, settings: Settings) -> None:
    payload = CHAT | {"stream": True, "stream_options": {"include_usage": True}, "max_tokens": 6}
    async with client.stream("POST", "/v1/chat/completions", json=payload) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line async for line in response.aiter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line[6:]) for line in lines[:-1]]
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    assert len({e["id"] for e in events}) == 1
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    finals = [e for e in events if e["choices"] and e["choices"][0]["finish_reason"]]
    assert len(finals) == 1
    usage_events = [e for e in events if e.get("usage")]
    assert len(usage_events) == 1 and usage_events[0]["choices"] == []
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
    [stored] = _completions(settings)
    assert stored.id == events[0]["id"]
    assert stored.answer == text
    assert stored.completion_tokens == usage_events[0]["usage"]["completion_tokens"]


@pytest.mark.parametrize(
    ("payload", "status", "param"),
    [
        ({"model": "default"}, 400, "messages"),
        (CHAT | {"temperature": 3}, 400, "temperature"),
        (CHAT | {"top_p": 0}, 400, "top_p"),
        (CHAT | {"max_tokens": 0}, 400, "max_tokens"),
        (CHAT | {"max_tokens": 10_000_000}, 400, "max_tokens"),
        (CHAT | {"n": 2}, 400, "n"),
        (CHAT | {"tools": []}, 400, "tools"),
        (CHAT | {"messages": []}, 400, "messages"),
        (CHAT | {"messages": [{"role": "robot", "content": "x"}]}, 400, "messages.0.role"),
        (CHAT | {"stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
        (CHAT | {"model": "nope"}, 404, "model"),
        (CHAT | {"model": "default@99"}, 404, "model"),
    ],
)
async def test_bad_requests_get_openai_errors(
    client: AsyncTestClient, settings: Settings, payload: dict, status: int, param: str
) -> None:
    response = await client.post("/v1/chat/completions", json=payload)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param
    assert error["message"]
    assert _completions(settings) == []


async def test_malformed_and_oversize_bodies(client: AsyncTestClient) -> None:
    malformed = await client.post(
        "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert malformed.status_code == 400
    assert malformed.json()["error"]["type"] == "invalid_request_error"
    huge = await client.post(
        "/v1/chat/completions", content=b"x" * 2_000_000, headers={"content-type": "application/json"}
    )
    assert huge.status_code == 413
    assert "error" in huge.json()
    missing = await client.get("/v1/nothing-here")
    assert missing.status_code == 404 and "error" in missing.json()


async def test_models_health_ready(client: AsyncTestClient) -> None:
    models = (await client.get("/v1/models")).json()
    assert models["object"] == "list"
    ids = [m["id"] for m in models["data"]]
    assert "default" in ids
    assert all(m["object"] == "model" for m in models["data"])
    assert (await client.get("/health")).json() == {"status": "ok"}
    ready = await client.get("/ready")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"


async def test_a_client_that_leaves_mid_stream_cancels_its_sequence(client: AsyncTestClient) -> None:
    """The engine's stream is closed when the response is cancelled, not when it is garbage-collected.

    The test keeps its own reference to the engine's stream, as a cancelled task's traceback does in a server:
    a sequence left to the garbage collector keeps generating and holds its KV slot."""
    chat = client.app.state.chat
    engine_streams: list[AsyncIterator[GenerationChunk]] = []
    generate = chat.engine.generate

    def keep_stream(request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        engine_streams.append(generate(request))
        return engine_streams[-1]

    chat.engine.generate = keep_stream
    request = msgspec.convert(CHAT | {"stream": True, "max_tokens": 1000}, ChatCompletionRequest)
    events, _ = await chat.stream(request, LOCAL_CALLER)
    first_text = asyncio.Event()

    async def respond() -> None:  # what the server's response task does, until the client's disconnect cancels it
        async for event in events:
            if '"content":"' in event and '"content":""' not in event:
                first_text.set()

    response = asyncio.create_task(respond())
    await asyncio.wait_for(first_text.wait(), timeout=30)
    response.cancel()
    await asyncio.gather(response, return_exceptions=True)

    [stream] = engine_streams
    assert await anext(stream, None) is None, "the engine's stream is still open after the response was cancelled"
    deadline = time.monotonic() + 10
    while chat.engine.running:
        assert time.monotonic() < deadline, "the cancelled sequence still runs"
        await asyncio.sleep(0.01)
