"""Who may do what, through HTTP on both databases: deny by default, roles, and rating only what you received."""

from __future__ import annotations

import re

import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient

from feedback import api_keys
from feedback.api_keys import key_id_of
from feedback.db import make_sync_engine, session_scope
from feedback.models import Feedback
from serving.api.auth import PUBLIC_PATHS
from tests.security.conftest import IssueKey, bearer

CHAT = {"model": "default", "messages": [{"role": "user", "content": "Tell me a fact."}], "max_tokens": 4}


def _routes(app: Litestar) -> list[tuple[str, str]]:
    """Every (method, concrete path) the app serves, path parameters filled with harmless values."""
    fill = {"str": "default", "int": "1", "path": "style.css"}
    found = []
    for route in app.routes:
        path = re.sub(r"\{\w+:(\w+)\}", lambda m: fill[m.group(1)], route.path)
        found += [(method, path) for method in sorted(route.methods) if method not in {"OPTIONS", "HEAD"}]
    return found


def _is_public(path: str) -> bool:
    return any(re.search(pattern, path) for pattern in PUBLIC_PATHS)


async def _answer(client: AsyncTestClient, token: str, content: str = "Tell me a fact.") -> str:
    payload = CHAT | {"messages": [{"role": "user", "content": content}]}
    response = await client.post("/v1/chat/completions", json=payload, headers=bearer(token))
    assert response.status_code == 200, response.text
    return response.json()["id"]


async def test_every_route_but_the_public_ones_needs_a_key(
    keys_app: Litestar, keyed_client: AsyncTestClient, issue_key: IssueKey
) -> None:
    routes = _routes(keys_app)
    assert ("POST", "/v1/admin/runs") in routes and ("GET", "/schema/openapi.json") in routes
    issue_key("admin")  # a key existing changes nothing for requests that do not carry it
    for method, path in routes:
        for headers in ({}, bearer("ll_000000000000_" + "x" * 43), {"Authorization": "Basic dXNlcjpwYXNz"}):
            response = await keyed_client.request(method, path, headers=headers)
            if _is_public(path):
                assert response.status_code < 400, (method, path, response.status_code)
                continue
            assert response.status_code == 401, (method, path, headers, response.text)
            error = response.json()["error"]
            assert set(error) == {"message", "type", "param", "code"}
            assert (error["type"], error["code"]) == ("authentication_error", "invalid_api_key")
            assert response.headers["www-authenticate"].startswith("Bearer")


async def test_revoked_key_is_refused(keyed_client: AsyncTestClient, issue_key: IssueKey, keys_settings) -> None:
    token = issue_key("user")
    assert (await keyed_client.get("/v1/models", headers=bearer(token))).status_code == 200
    engine = make_sync_engine(keys_settings.database_url)
    with session_scope(engine) as session:
        api_keys.revoke_key(session, api_keys.key_id_of(token))
    engine.dispose()
    refused = await keyed_client.get("/v1/models", headers=bearer(token))
    assert refused.status_code == 401 and "revoked" in refused.json()["error"]["message"]


async def test_user_keys_are_refused_on_admin_routes(
    keys_app: Litestar, keyed_client: AsyncTestClient, issue_key: IssueKey
) -> None:
    user, admin = issue_key("user"), issue_key("admin")
    admin_routes = [(m, p) for m, p in _routes(keys_app) if p.startswith("/v1/admin") or p == "/metrics"]
    assert len(admin_routes) >= 12
    for method, path in admin_routes:
        response = await keyed_client.request(method, path, headers=bearer(user))
        assert response.status_code == 403, (method, path, response.text)
        assert response.json()["error"]["type"] == "permission_error"
    for path in ("/v1/admin/adapters", "/v1/admin/runs", "/v1/admin/feedback/export", "/metrics"):
        assert (await keyed_client.get(path, headers=bearer(admin))).status_code == 200, path
    # What a user key may do: chat, list models, read the schema.
    for path in ("/v1/models", "/schema/openapi.json"):
        assert (await keyed_client.get(path, headers=bearer(user))).status_code == 200, path
    await _answer(keyed_client, user)


async def test_a_caller_rates_and_compares_only_what_it_received(
    keyed_client: AsyncTestClient, issue_key: IssueKey, keys_settings
) -> None:
    alice, bob, admin = issue_key("user"), issue_key("user"), issue_key("admin")
    mine, mine_again = await _answer(keyed_client, alice), await _answer(keyed_client, alice)
    theirs = await _answer(keyed_client, bob)

    rate_theirs = {"completion_id": theirs, "rating": -1}
    stolen = await keyed_client.post("/v1/feedback", json=rate_theirs, headers=bearer(alice))
    assert stolen.status_code == 403
    assert stolen.json()["error"] == {
        "message": stolen.json()["error"]["message"],
        "type": "permission_error",
        "param": "completion_id",
        "code": "forbidden",
    }
    for pair in ({"chosen_id": mine, "rejected_id": theirs}, {"a": theirs, "b": mine, "outcome": "a"}):
        response = await keyed_client.post("/v1/comparisons", json=pair, headers=bearer(alice))
        assert response.status_code == 403, response.text

    own = await keyed_client.post("/v1/feedback", json={"completion_id": mine, "rating": 1}, headers=bearer(alice))
    assert own.status_code == 200
    pair = {"chosen_id": mine, "rejected_id": mine_again}
    assert (await keyed_client.post("/v1/comparisons", json=pair, headers=bearer(alice))).status_code == 200
    # An admin may rate anyone's answer (moderation); the rating is recorded as the admin's.
    by_admin = await keyed_client.post("/v1/feedback", json=rate_theirs, headers=bearer(admin))
    assert by_admin.status_code == 200

    engine = make_sync_engine(keys_settings.database_url)
    with session_scope(engine) as session:
        rows = {(row.completion_id, row.caller) for row in session.query(Feedback)}
    engine.dispose()
    assert rows == {(mine, key_id_of(alice)), (theirs, key_id_of(admin))}


async def test_keys_of_one_tenant_share_their_completions(keyed_client: AsyncTestClient, issue_key: IssueKey) -> None:
    web, feedback_bot, other = issue_key("user", "acme"), issue_key("user", "acme"), issue_key("user", "globex")
    untenanted = issue_key("user")
    answered = await _answer(keyed_client, web)
    rate = {"completion_id": answered, "rating": 1}
    assert (await keyed_client.post("/v1/feedback", json=rate, headers=bearer(feedback_bot))).status_code == 200
    assert (await keyed_client.post("/v1/feedback", json=rate, headers=bearer(other))).status_code == 403
    assert (await keyed_client.post("/v1/feedback", json=rate, headers=bearer(untenanted))).status_code == 403
    # And the other way: a tenant key cannot rate a key-without-tenant's answer.
    loner = await _answer(keyed_client, untenanted)
    rate = {"completion_id": loner, "rating": 1}
    assert (await keyed_client.post("/v1/feedback", json=rate, headers=bearer(web))).status_code == 403


async def test_unknown_completion_is_404_not_403(keyed_client: AsyncTestClient, issue_key: IssueKey) -> None:
    response = await keyed_client.post(
        "/v1/feedback", json={"completion_id": "chatcmpl-nope", "rating": 1}, headers=bearer(issue_key())
    )
    assert response.status_code == 404 and response.json()["error"]["param"] == "completion_id"


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER"])
async def test_bearer_scheme_is_case_insensitive(keyed_client: AsyncTestClient, issue_key: IssueKey, scheme) -> None:
    token = issue_key()
    response = await keyed_client.get("/v1/models", headers={"Authorization": f"{scheme} {token}"})
    assert response.status_code == 200


async def test_local_mode_needs_no_key_and_ignores_one(local_client: AsyncTestClient) -> None:
    """The laptop default (what the rest of the suite runs): every caller is the local admin."""
    for headers in ({}, bearer("local"), bearer("anything")):
        assert (await local_client.get("/v1/admin/adapters", headers=headers)).status_code == 200
        assert (await local_client.get("/metrics", headers=headers)).status_code == 200
