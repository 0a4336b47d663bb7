"""Alembic environment: runs against the URL handed over by `feedback.migrate`, or LORALOOP_DATABASE_URL."""

from __future__ import annotations

from alembic import context

from feedback.db import make_sync_engine
from feedback.models import Base
from serving.settings import Settings

config = context.config
url = config.attributes.get("database_url") or Settings().database_url


def run_migrations_offline() -> None:
    context.configure(url=url, target_metadata=Base.metadata, literal_binds=True, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = make_sync_engine(url)
    with engine.connect() as connection:
        # render_as_batch: SQLite can't ALTER most things, so Alembic rebuilds tables in batches.
        context.configure(
            connection=connection,
            target_metadata=Base.metadata,
            render_as_batch=True,
            compare_type=True,
        )
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
