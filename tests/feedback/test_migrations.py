"""Alembic on both databases: the migrations build exactly the models' schema, and round-trip."""

from __future__ import annotations

import pytest
from alembic import command
from sqlalchemy import inspect, text

from feedback import migrate
from feedback.db import is_sqlite, make_sync_engine

TABLES = {
    "completions",
    "feedback",
    "comparisons",
    "adapters",
    "adapter_versions",
    "tuning_runs",
    "feedback_uses",
    "comparison_uses",
    "registry_events",
    "locks",
    "api_keys",
}


def _tables(url: str) -> set[str]:
    engine = make_sync_engine(url)
    try:
        return set(inspect(engine).get_table_names()) - {"alembic_version"}
    finally:
        engine.dispose()


def test_upgrade_matches_models_then_downgrade_and_upgrade_again(empty_database_url: str) -> None:
    url = empty_database_url
    assert not migrate.is_current(url)
    migrate.upgrade(url)
    assert migrate.is_current(url)
    assert _tables(url) == TABLES
    command.check(migrate.alembic_config(url))  # raises if the models and the migrations disagree
    migrate.downgrade(url, "base")
    assert _tables(url) == set()
    migrate.upgrade(url)
    assert _tables(url) == TABLES


def test_sqlite_runs_in_wal_with_full_sync(database_url: str) -> None:
    if not is_sqlite(database_url):
        pytest.skip("SQLite pragmas")
    engine = make_sync_engine(database_url)
    with engine.connect() as connection:
        assert connection.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert connection.execute(text("PRAGMA synchronous")).scalar() == 2  # FULL
        assert connection.execute(text("PRAGMA foreign_keys")).scalar() == 1
    engine.dispose()
