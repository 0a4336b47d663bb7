"""API keys in the database and through `loraloop keys`: hashed at rest, shown once, revocable."""

from __future__ import annotations

import hashlib

import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import async_sessionmaker

from feedback import api_keys
from feedback.db import make_async_engine, make_sync_engine, session_scope
from feedback.models import ApiKey
from serving import cli
from serving.api.auth import KeyVerifier
from serving.settings import Settings


def _rows(database_url: str) -> list[ApiKey]:
    engine = make_sync_engine(database_url)
    with session_scope(engine) as session:
        rows = list(session.scalars(select(ApiKey)))
    engine.dispose()
    return rows


def test_keys_are_stored_hashed_and_authenticate_until_revoked(database_url: str) -> None:
    engine = make_sync_engine(database_url)
    with session_scope(engine) as session:
        row, token = api_keys.create_key(session, "user", tenant="acme", name="web app")
        key_id = row.id
    [stored] = _rows(database_url)
    assert token.startswith(f"ll_{key_id}_") and len(token) > 50
    assert stored.token_sha256 == hashlib.sha256(token.encode()).hexdigest()
    assert token not in {stored.id, stored.token_sha256, stored.name}  # the secret itself is nowhere

    with session_scope(engine) as session:
        caller = api_keys.caller_for_token(session, token)
        assert caller is not None and (caller.id, caller.role, caller.tenant) == (key_id, "user", "acme")
        tampered = token[:-1] + ("A" if token[-1] != "A" else "B")
        for bad in (tampered, f"ll_{'0' * 12}_{token.split('_', 2)[2]}", "", "local", token + "x", token.upper()):
            assert api_keys.caller_for_token(session, bad) is None
        assert api_keys.has_active_key(session)

    with session_scope(engine) as session:
        api_keys.revoke_key(session, key_id)
        api_keys.revoke_key(session, key_id)  # idempotent
    with session_scope(engine) as session:
        assert api_keys.caller_for_token(session, token) is None
        assert not api_keys.has_active_key(session)
        with pytest.raises(api_keys.UnknownKey):
            api_keys.revoke_key(session, "nope")
    engine.dispose()


@pytest.mark.parametrize(
    ("role", "tenant", "name"),
    [("root", None, ""), ("admin", "acme", ""), ("user", "bad tenant!", ""), ("user", None, "x" * 200)],
)
def test_bad_key_requests_are_refused(database_url: str, role: str, tenant: str | None, name: str) -> None:
    engine = make_sync_engine(database_url)
    with pytest.raises(api_keys.ApiKeyError), session_scope(engine) as session:
        api_keys.create_key(session, role, tenant=tenant, name=name)
    engine.dispose()
    assert _rows(database_url) == []


def test_cli_creates_lists_and_revokes(settings: Settings, capsys: pytest.CaptureFixture[str]) -> None:
    common = ["--database-url", settings.database_url, "--data-dir", str(settings.data_dir)]
    cli.main(["keys", "create", "--role", "user", "--tenant", "acme", "--name", "support bot", *common])
    created = capsys.readouterr()
    token = created.out.strip()
    assert token.startswith("ll_") and "shown only now" in created.err
    key_id = api_keys.key_id_of(token)

    cli.main(["keys", "list", *common])
    listed = capsys.readouterr().out
    assert key_id in listed and "acme" in listed and "support bot" in listed and "active" in listed
    assert token not in listed

    cli.main(["keys", "revoke", key_id, *common])
    assert "revoked" in capsys.readouterr().out
    cli.main(["keys", "list", *common])
    assert "revoked" in capsys.readouterr().out

    with pytest.raises(SystemExit, match="admin keys are global"):
        cli.main(["keys", "create", "--role", "admin", "--tenant", "acme", *common])
    with pytest.raises(SystemExit, match="no API key"):
        cli.main(["keys", "revoke", "0123456789ab", *common])


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.20", "::"])
def test_local_mode_is_refused_off_loopback(tmp_path, host: str) -> None:
    with pytest.raises(ValueError, match="LORALOOP_AUTH=keys"):
        Settings(data_dir=tmp_path, host=host)
    assert Settings(data_dir=tmp_path, host=host, auth="keys").auth == "keys"
    for loopback in ("127.0.0.1", "::1", "localhost"):
        assert Settings(data_dir=tmp_path, host=loopback).auth == "local"


def test_cli_serve_refuses_local_mode_on_a_public_address(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORALOOP_HOST", "0.0.0.0")
    with pytest.raises(SystemExit) as stopped:
        cli.main(["serve", "--data-dir", str(tmp_path)])
    assert "LORALOOP_AUTH=keys" in str(stopped.value.code)


async def test_servers_remember_a_checked_key_only_for_the_cache_window(database_url: str) -> None:
    """The documented trade-off of LORALOOP_KEY_CACHE_SECONDS: a revocation reaches a server within it."""
    engine = make_sync_engine(database_url)
    with session_scope(engine) as session:
        row, token = api_keys.create_key(session, "user")
        key_id = row.id
    async_engine = make_async_engine(database_url)
    sessions = async_sessionmaker(async_engine, expire_on_commit=False)
    remembering, checking = KeyVerifier(sessions, ttl_seconds=300), KeyVerifier(sessions, ttl_seconds=0)
    try:
        assert (await remembering.caller_for(token)).id == key_id
        assert (await checking.caller_for(token)).id == key_id
        with session_scope(engine) as session:
            api_keys.revoke_key(session, key_id)
        assert (await remembering.caller_for(token)).id == key_id  # within its window
        assert await checking.caller_for(token) is None
        assert await remembering.caller_for("ll_" + "0" * 12 + "_" + "x" * 43) is None
    finally:
        await async_engine.dispose()
        engine.dispose()
