"""The alias row that every replica makes sure of at start-up."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from feedback import adapter_registry
from feedback.db import make_sync_engine, session_scope
from feedback.models import Adapter


def test_ensure_alias_when_another_replica_inserts_it_between_the_read_and_the_insert(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two replicas started at once: both read "no alias", one inserts first; the other must not fail."""
    if database_url.startswith("sqlite"):
        pytest.skip("SQLite transactions here begin IMMEDIATE: the other writer waits, this interleaving cannot happen")
    engine = make_sync_engine(database_url)
    real_get = Session.get

    def get_after_the_other_replica(session: Session, entity: type, key: object, **kw: object) -> object:
        found = real_get(session, entity, key, **kw)
        if found is None and entity is Adapter:
            with session_scope(engine) as other:  # the other replica, committing first
                other.add(Adapter(name=str(key)))
        return found

    monkeypatch.setattr(Session, "get", get_after_the_other_replica)
    with session_scope(engine) as session:
        adapter = adapter_registry.ensure_alias(session, "default")
        assert adapter.name == "default"
    monkeypatch.undo()
    with session_scope(engine) as session:
        assert session.scalar(select(func.count()).select_from(Adapter).where(Adapter.name == "default")) == 1
        assert adapter_registry.ensure_alias(session, "default").name == "default"
