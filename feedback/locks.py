"""Named leases in the database (table `locks`): one holder at a time across processes and replicas.

A lease expires unless its holder renews it, so a holder that crashed (SIGKILL, lost machine)
blocks nobody for longer than one TTL. Same statements on SQLite and PostgreSQL.
"""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import delete, or_, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from feedback.models import Lock, utcnow


def try_acquire(session: Session, name: str, holder: str, ttl: timedelta) -> bool:
    """Take the lease if it is free, expired, or already ours."""
    now = utcnow()
    taken_over = session.execute(
        update(Lock)
        .where(Lock.name == name, or_(Lock.expires_at < now, Lock.holder == holder))
        .values(holder=holder, acquired_at=now, expires_at=now + ttl)
    )
    if taken_over.rowcount == 1:
        return True
    try:
        with session.begin_nested():
            session.add(Lock(name=name, holder=holder, acquired_at=now, expires_at=now + ttl))
    except IntegrityError:
        return False  # someone else holds a live lease (or won the race to create it)
    return True


def renew(session: Session, name: str, holder: str, ttl: timedelta) -> bool:
    """Extend our lease; False when it is no longer ours (it expired and was taken over)."""
    result = session.execute(
        update(Lock).where(Lock.name == name, Lock.holder == holder).values(expires_at=utcnow() + ttl)
    )
    return result.rowcount == 1


def release(session: Session, name: str, holder: str) -> None:
    session.execute(delete(Lock).where(Lock.name == name, Lock.holder == holder))


def holder_of(session: Session, name: str) -> str | None:
    lock = session.get(Lock, name)
    return lock.holder if lock is not None and lock.expires_at > utcnow() else None
