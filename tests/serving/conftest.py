from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from litestar.testing import AsyncTestClient

from serving.api.app import build_runtime, create_app
from serving.settings import Settings


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[AsyncTestClient]:
    """The real app (real database, real engine) on the tiny model, lifespan included."""
    app = create_app(settings, runtime=build_runtime(settings))
    async with AsyncTestClient(app, timeout=60) as test_client:
        yield test_client
