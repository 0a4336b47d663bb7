"""Client input gets a 4xx in OpenAI's error shape naming the parameter, never a 500, and nothing is recorded."""

from __future__ import annotations

from typing import Any

from litestar.testing import AsyncTestClient
from sqlalchemy import func, select

from feedback.db import make_sync_engine, session_scope
from feedback.models import Completion, Feedback
from serving.api.app import MAX_BODY_BYTES
from serving.api.schemas import MAX_MESSAGE_CHARS, MAX_MESSAGES, MAX_TOTAL_CHARS
from serving.settings import Settings
from tests.security.conftest import IssueKey, bearer

CHAT: dict[str, Any] = {"model": "default", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
USER = {"role": "user", "content": "Hi"}
IMAGE_PART = {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}


def _count(settings: Settings, model: type) -> int:
    engine = make_sync_engine(settings.database_url)
    with session_scope(engine) as session:
        count = session.scalar(select(func.count()).select_from(model))
    engine.dispose()
    return int(count or 0)


def _assert_openai_error(response: Any, status: int, param: str | None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param, error
    assert error["message"] and error["type"] == "invalid_request_error" if status in (400, 413) else True
    return error


CHAT_CASES = [
    # message count and size
    ({"messages": []}, 400, "messages"),
    ({"messages": [USER] * (MAX_MESSAGES + 1)}, 400, "messages"),
    ({"messages": [{"role": "user", "content": "x" * (MAX_MESSAGE_CHARS + 1)}]}, 400, "messages.0.content"),
    ({"messages": [{"role": "user", "content": "x" * (MAX_TOTAL_CHARS // 3 + 1)}] * 3}, 400, "messages"),
    ({"messages": [{"role": "robot", "content": "x"}]}, 400, "messages.0.role"),
    ({"messages": [{"role": "user", "content": [IMAGE_PART]}]}, 400, "messages.0.content.0.type"),
    ({"messages": "Hi"}, 400, "messages"),
    # max_tokens range
    ({"max_tokens": 0}, 400, "max_tokens"),
    ({"max_tokens": -5}, 400, "max_tokens"),
    ({"max_tokens": 10**30}, 400, "max_tokens"),
    ({"max_tokens": 100_000}, 400, "max_tokens"),
    ({"max_tokens": 1.5}, 400, "max_tokens"),
    ({"max_tokens": None, "max_completion_tokens": 0}, 400, "max_completion_tokens"),
    # sampling ranges
    ({"temperature": -0.1}, 400, "temperature"),
    ({"temperature": 2.01}, 400, "temperature"),
    ({"temperature": "hot"}, 400, "temperature"),
    ({"top_p": 0}, 400, "top_p"),
    ({"top_p": 1.01}, 400, "top_p"),
    ({"seed": 2**64}, 400, "seed"),
    # stop list
    ({"stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"stop": ""}, 400, "stop"),
    ({"stop": ["ok", ""]}, 400, "stop.1"),
    ({"stop": ["x" * 1000]}, 400, "stop.0"),
    # model
    ({"model": "nope"}, 404, "model"),
    ({"model": "default@99"}, 404, "model"),
    ({"model": ""}, 400, "model"),
    # OpenAI parameters this server does not implement: refused by name, not silently ignored
    ({"n": 2}, 400, "n"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools"),
    ({"tool_choice": "auto"}, 400, "tool_choice"),
    ({"logprobs": True}, 400, "logprobs"),
    ({"top_logprobs": 2}, 400, "top_logprobs"),
    ({"response_format": {"type": "json_object"}}, 400, "response_format"),
    ({"logit_bias": {"50256": -100}}, 400, "logit_bias"),
    ({"frequency_penalty": 0.5}, 400, "frequency_penalty"),
    ({"presence_penalty": -1}, 400, "presence_penalty"),
    ({"stream": "yes"}, 400, "stream"),
    ({"stream_options": {"include_usage": True, "extra": 1}}, 400, "stream_options.extra"),
]


async def test_chat_input_limits(keyed_client: AsyncTestClient, issue_key: IssueKey, keys_settings: Settings) -> None:
    # One app for all cases (starting one per case would dominate the suite's time); failures are listed together.
    token = issue_key()
    wrong = []
    for change, status, param in CHAT_CASES:
        payload = {key: value for key, value in (CHAT | change).items() if value is not None}
        response = await keyed_client.post("/v1/chat/completions", json=payload, headers=bearer(token))
        try:
            _assert_openai_error(response, status, param)
        except (AssertionError, ValueError, KeyError) as error:
            wrong.append(f"{change!r:.120}: {error}")
    assert not wrong, "\n".join(wrong)
    assert _count(keys_settings, Completion) == 0


MALFORMED = [b"{not json", b"[]", b"null", b'"text"', b"{}", b'{"model": "default", "messages": [{}]}', b"\xff\xfe"]


async def test_malformed_bodies_are_400(keyed_client: AsyncTestClient, issue_key: IssueKey) -> None:
    headers = bearer(issue_key()) | {"content-type": "application/json"}
    for body in MALFORMED:
        for path in ("/v1/chat/completions", "/v1/feedback", "/v1/comparisons"):
            response = await keyed_client.post(path, content=body, headers=headers)
            assert response.status_code == 400, (path, body, response.text)
            assert set(response.json()["error"]) == {"message", "type", "param", "code"}


async def test_oversize_body_is_413(keyed_client: AsyncTestClient, issue_key: IssueKey) -> None:
    headers = bearer(issue_key()) | {"content-type": "application/json"}
    for path in ("/v1/chat/completions", "/v1/feedback", "/v1/comparisons"):
        response = await keyed_client.post(path, content=b" " * (MAX_BODY_BYTES + 1), headers=headers)
        error = _assert_openai_error(response, 413, None)
        assert error["code"] == "request_too_large" and str(MAX_BODY_BYTES) in error["message"]


FEEDBACK_CASES = [
    ({"rating": 2}, "rating"),
    ({"rating": "up"}, "rating"),
    ({"completion_id": ""}, "completion_id"),
    ({"completion_id": "../../etc/passwd"}, "completion_id"),
    ({"reasons": ["ok"] * 17}, "reasons"),
    ({"reasons": ["Not Snake"]}, "reasons.0"),
    ({"comment": "x" * 4001}, "comment"),
    ({"correction": ""}, "correction"),
    ({"stars": 5}, "stars"),
]


async def test_feedback_input_limits(
    keyed_client: AsyncTestClient, issue_key: IssueKey, keys_settings: Settings
) -> None:
    token = issue_key()
    wrong = []
    for change, param in FEEDBACK_CASES:
        payload = {"completion_id": "chatcmpl-1", "rating": 1} | change
        response = await keyed_client.post("/v1/feedback", json=payload, headers=bearer(token))
        try:
            _assert_openai_error(response, 400, param)
        except (AssertionError, ValueError, KeyError) as error:
            wrong.append(f"{change!r:.120}: {error}")
    assert not wrong, "\n".join(wrong)
    assert _count(keys_settings, Feedback) == 0
