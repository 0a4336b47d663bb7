"""An app in `keys` mode on the tiny model, and keys issued straight into its database."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient

from feedback import api_keys
from feedback.db import make_sync_engine, session_scope
from serving.api.app import build_runtime, create_app
from serving.settings import Settings

IssueKey = Callable[..., str]


@pytest.fixture
def keys_settings(settings: Settings) -> Settings:
    # No key cache: a revocation must show on the very next request in these tests.
    return settings.model_copy(update={"auth": "keys", "key_cache_seconds": 0.0})


@pytest.fixture
def issue_key(keys_settings: Settings) -> IssueKey:
    """Creates a key in the test database and returns its token."""

    def issue(role: str = "user", tenant: str | None = None, name: str = "") -> str:
        engine = make_sync_engine(keys_settings.database_url)
        try:
            with session_scope(engine) as session:
                _, token = api_keys.create_key(session, role, tenant=tenant, name=name)
        finally:
            engine.dispose()
        return token

    return issue


@pytest.fixture
def keys_app(keys_settings: Settings) -> Litestar:
    return create_app(keys_settings, runtime=build_runtime(keys_settings))


@pytest.fixture
async def keyed_client(keys_app: Litestar) -> AsyncIterator[AsyncTestClient]:
    """A client with no credentials of its own: each request passes its key."""
    async with AsyncTestClient(keys_app, timeout=60) as client:
        yield client


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
async def local_client(settings: Settings) -> AsyncIterator[AsyncTestClient]:
    """The laptop default: `local` mode on 127.0.0.1, no keys."""
    assert settings.auth == "local"
    async with AsyncTestClient(create_app(settings, runtime=build_runtime(settings)), timeout=60) as client:
        yield client
