"""Shared fixtures: the bundled model's tokenizer, a tiny random model built here, and both databases.

Database tests run twice, on a SQLite file and on PostgreSQL (LORALOOP_TEST_POSTGRES_URL, default
the local server's `test` database); each test gets a fresh, migrated database of its own.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import make_url

from feedback import migrate
from serving.base_model import prepare_bundled_model
from serving.logs import configure_logging
from serving.settings import Settings
from tests.helpers import make_tiny_model

POSTGRES_URL = os.environ.get("LORALOOP_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
MODEL_CACHE = Path(os.environ.get("LORALOOP_MODEL_CACHE_DIR", Path.home() / ".cache" / "loraloop"))

configure_logging("warning", "console")


@pytest.fixture(scope="session")
def bundled_model_dir() -> Path:
    """The real SmolLM2-135M-Instruct, converted once (the same cache `make serve` uses)."""
    return prepare_bundled_model(MODEL_CACHE)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, bundled_model_dir: Path) -> Path:
    """A 2-layer random Llama with the bundled model's tokenizer and chat template: fast and real-shaped."""
    return make_tiny_model(bundled_model_dir, tmp_path_factory.mktemp("tiny-model"))


def _fresh_postgres_database() -> tuple[str, str]:
    url = make_url(POSTGRES_URL)
    name = f"loraloop_test_{uuid.uuid4().hex[:12]}"
    admin = url.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return url.set(database=name).render_as_string(hide_password=False), name


def _drop_postgres_database(name: str) -> None:
    admin = make_url(POSTGRES_URL).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def empty_database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database on each backend."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'loraloop.db'}"
        return
    url, name = _fresh_postgres_database()
    try:
        yield url
    finally:
        _drop_postgres_database(name)


@pytest.fixture
def database_url(empty_database_url: str) -> str:
    """A fresh database at the newest schema revision."""
    migrate.upgrade(empty_database_url)
    return empty_database_url


@pytest.fixture
def settings(tmp_path: Path, database_url: str, tiny_model_dir: Path) -> Settings:
    return Settings(
        data_dir=tmp_path / "data",
        database_url=database_url,
        base_model=str(tiny_model_dir),
        model_cache_dir=MODEL_CACHE,
        device="cpu",
        dtype="float32",
        swap_poll_seconds=0.2,
        log_format="console",
    )
