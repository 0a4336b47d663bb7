"""Database engines for SQLite (the embedded default) and PostgreSQL (production), same code.

SQLite runs in WAL mode with `synchronous=FULL`, so a commit that returned is on disk: an
acknowledged rating survives a crash. Write transactions start with `BEGIN IMMEDIATE` so two
processes (a server and a tuner) never deadlock upgrading a read lock to a write lock; they
queue on `busy_timeout` instead.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, make_url
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.orm import Session, sessionmaker

SQLITE_BUSY_TIMEOUT_MS = 30_000


def _normalise(url: str, *, asynchronous: bool) -> URL:
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        return parsed.set(drivername="sqlite+aiosqlite" if asynchronous else "sqlite+pysqlite")
    if backend in {"postgresql", "postgres"}:
        # psycopg 3 speaks both sync and async under one dialect name.
        return parsed.set(drivername="postgresql+psycopg")
    raise ValueError(f"unsupported database URL {url!r}: use sqlite:/// or postgresql://")


def is_sqlite(url: str) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


def _configure_sqlite(sync_engine: Engine) -> None:
    @event.listens_for(sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take transaction control away from the driver so the "begin" hook decides how to begin.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA synchronous = FULL")
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.close()

    @event.listens_for(sync_engine, "begin")
    def _on_begin(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")


def _ensure_sqlite_dir(url: URL) -> None:
    if url.database and url.database != ":memory:":
        Path(url.database).parent.mkdir(parents=True, exist_ok=True)


def make_sync_engine(url: str, **kwargs: Any) -> Engine:
    """A synchronous engine (CLI, tuning, migrations)."""
    normalised = _normalise(url, asynchronous=False)
    if normalised.get_backend_name() == "sqlite":
        _ensure_sqlite_dir(normalised)
        engine = create_engine(normalised, **kwargs)
        _configure_sqlite(engine)
        return engine
    return create_engine(normalised, pool_pre_ping=True, **kwargs)


def make_async_engine(url: str, **kwargs: Any) -> AsyncEngine:
    """An asyncio engine (the HTTP server)."""
    normalised = _normalise(url, asynchronous=True)
    if normalised.get_backend_name() == "sqlite":
        _ensure_sqlite_dir(normalised)
        engine = create_async_engine(normalised, **kwargs)
        _configure_sqlite(engine.sync_engine)
        return engine
    return create_async_engine(normalised, pool_pre_ping=True, pool_size=10, max_overflow=20, **kwargs)


@contextmanager
def session_scope(engine: Engine) -> Iterator[Session]:
    """One unit of work: commits on success, rolls back on error."""
    factory = sessionmaker(engine, expire_on_commit=False)
    with factory() as session, session.begin():
        yield session
