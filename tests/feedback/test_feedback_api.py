"""`/v1/feedback` and `/v1/comparisons` through HTTP: what is acknowledged is stored, bad input is a 4xx."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from litestar.testing import AsyncTestClient
from sqlalchemy import select

from feedback.db import make_sync_engine, session_scope
from feedback.models import Comparison, Feedback
from serving.api.app import build_runtime, create_app
from serving.settings import Settings

CHAT = {"model": "default", "messages": [{"role": "user", "content": "Tell me a fact."}], "max_tokens": 4}


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[AsyncTestClient]:
    app = create_app(settings, runtime=build_runtime(settings))
    async with AsyncTestClient(app, timeout=60) as test_client:
        yield test_client


async def _answer(client: AsyncTestClient, content: str = "Tell me a fact.") -> str:
    response = await client.post(
        "/v1/chat/completions", json=CHAT | {"messages": [{"role": "user", "content": content}]}
    )
    assert response.status_code == 200
    return response.json()["id"]


def _rows(settings: Settings, model: type) -> list:
    engine = make_sync_engine(settings.database_url)
    with session_scope(engine) as session:
        rows = list(session.scalars(select(model)))
    engine.dispose()
    return rows


async def test_rating_is_stored_updated_and_retracted(client: AsyncTestClient, settings: Settings) -> None:
    completion = await _answer(client)
    first = await client.post(
        "/v1/feedback", json={"completion_id": completion, "rating": -1, "reasons": ["too_verbose"], "comment": "meh"}
    )
    assert first.status_code == 200, first.text
    body = first.json()
    assert body["object"] == "feedback" and body["rating"] == -1 and body["revision"] == 1
    [row] = _rows(settings, Feedback)
    assert (row.rating, row.reasons, row.comment, row.status) == (-1, ["too_verbose"], "meh", "active")

    again = await client.post("/v1/feedback", json={"completion_id": completion, "rating": 1})
    assert again.json()["id"] == body["id"] and again.json()["revision"] == 2
    retract = await client.post("/v1/feedback", json={"completion_id": completion, "rating": 0})
    assert retract.json()["status"] == "retracted"
    [row] = _rows(settings, Feedback)
    assert (row.rating, row.status, row.revision) == (0, "retracted", 3)


async def test_feedback_id_makes_retries_idempotent(client: AsyncTestClient, settings: Settings) -> None:
    completion = await _answer(client)
    payload = {"completion_id": completion, "rating": 1, "feedback_id": "client-key-1", "correction": "Better."}
    responses = [await client.post("/v1/feedback", json=payload) for _ in range(3)]
    assert {r.status_code for r in responses} == {200}
    assert {r.json()["revision"] for r in responses} == {1}
    [row] = _rows(settings, Feedback)
    assert row.id == "client-key-1" and row.correction == "Better."
    other = await _answer(client, "Another question")
    clash = await client.post("/v1/feedback", json=payload | {"completion_id": other})
    assert clash.status_code == 409 and clash.json()["error"]["param"] == "feedback_id"


@pytest.mark.parametrize(
    ("payload", "status", "param"),
    [
        ({"completion_id": "chatcmpl-unknown", "rating": 1}, 404, "completion_id"),
        ({"completion_id": "{id}", "rating": 2}, 400, "rating"),
        ({"completion_id": "{id}", "rating": "up"}, 400, "rating"),
        ({"rating": 1}, 400, "completion_id"),
        ({"completion_id": "{id}", "rating": 1, "comment": "x" * 5000}, 400, "comment"),
        ({"completion_id": "{id}", "rating": 1, "reasons": ["Not A Reason!"]}, 400, "reasons.0"),
        ({"completion_id": "{id}", "rating": 1, "extra": True}, 400, "extra"),
    ],
)
async def test_bad_feedback_is_refused_and_stores_nothing(
    client: AsyncTestClient, settings: Settings, payload: dict, status: int, param: str
) -> None:
    completion = await _answer(client)
    if payload.get("completion_id") == "{id}":
        payload = payload | {"completion_id": completion}
    response = await client.post("/v1/feedback", json=payload)
    assert response.status_code == status, response.text
    assert response.json()["error"]["param"] == param
    assert _rows(settings, Feedback) == []


async def test_malformed_feedback_json(client: AsyncTestClient, settings: Settings) -> None:
    response = await client.post("/v1/feedback", content=b'{"rating": ', headers={"content-type": "application/json"})
    assert response.status_code == 400 and "error" in response.json()


async def test_comparisons_both_forms_and_validation(client: AsyncTestClient, settings: Settings) -> None:
    a, b = await _answer(client), await _answer(client)
    chosen = await client.post("/v1/comparisons", json={"chosen_id": b, "rejected_id": a})
    assert chosen.status_code == 200, chosen.text
    assert chosen.json()["outcome"] == "a" and chosen.json()["a"] == b
    both_bad = await client.post("/v1/comparisons", json={"a": a, "b": b, "outcome": "both_bad", "comparison_id": "k1"})
    retry = await client.post("/v1/comparisons", json={"a": a, "b": b, "outcome": "both_bad", "comparison_id": "k1"})
    assert both_bad.json()["id"] == retry.json()["id"] == "k1"
    assert sorted(c.outcome for c in _rows(settings, Comparison)) == ["a", "both_bad"]

    different = await _answer(client, "A different prompt")
    refused = [
        await client.post("/v1/comparisons", json={"a": a, "b": different, "outcome": "a"}),
        await client.post("/v1/comparisons", json={"a": a, "b": a, "outcome": "a"}),
        await client.post("/v1/comparisons", json={"a": a, "outcome": "a"}),
        await client.post("/v1/comparisons", json={"a": a, "b": "chatcmpl-nope", "outcome": "a"}),
        await client.post("/v1/comparisons", json={"a": a, "b": b, "outcome": "maybe"}),
        await client.post("/v1/comparisons", json={"chosen_id": a}),
    ]
    assert [r.status_code for r in refused] == [400, 400, 400, 404, 400, 400]
    assert [r.json()["error"]["param"] for r in refused] == ["b", "b", "b", "b", "outcome", "rejected_id"]
    assert len(_rows(settings, Comparison)) == 2
