"""The adapter registry in the database: aliases, their versions, and which one is active.

Serving reads it (what to serve), tuning writes it (register, promote), admins steer it
(promote, roll back). Promotion and rollback are each one transaction (DESIGN.md §5).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from feedback.models import Adapter, AdapterVersion, RegistryEvent, VersionStatus, utcnow


class RegistryError(ValueError):
    """An operation the registry cannot do; the message says why."""


@dataclass(frozen=True)
class VersionRecord:
    """What a server needs to load and attribute one version."""

    id: int
    adapter_name: str
    version: int
    path: str
    sha256: str
    status: str

    @property
    def label(self) -> str:
        return f"{self.adapter_name}@{self.version}"

    @classmethod
    def of(cls, row: AdapterVersion) -> VersionRecord:
        return cls(row.id, row.adapter_name, row.version, row.path, row.sha256, row.status)


def record_event(
    session: Session,
    alias: str,
    version_id: int | None,
    action: str,
    actor: str,
    reason: str,
    evidence: dict[str, Any] | None = None,
) -> None:
    """Every change of what an alias serves is written down with who decided and on what evidence."""
    session.add(
        RegistryEvent(
            adapter_name=alias,
            version_id=version_id,
            action=action,
            actor=actor,
            reason=reason,
            evidence=evidence or {},
        )
    )


def ensure_alias(session: Session, name: str) -> Adapter:
    adapter = session.get(Adapter, name)
    if adapter is not None:
        return adapter
    # Replicas start at once against one database: another may insert the row between our read and our
    # insert (a UniqueViolation that failed a replica's start-up on PostgreSQL). Insert-or-nothing, then read.
    insert = {"postgresql": postgresql_insert, "sqlite": sqlite_insert}.get(session.get_bind().dialect.name)
    if insert is None:
        session.add(Adapter(name=name))
        session.flush()
    else:
        session.execute(insert(Adapter).values(name=name).on_conflict_do_nothing(index_elements=["name"]))
    return session.get_one(Adapter, name)


def active_versions(session: Session) -> dict[str, VersionRecord | None]:
    """Every alias and its active version (None: the alias answers with the base model)."""
    rows = session.execute(
        select(Adapter.name, AdapterVersion).outerjoin(AdapterVersion, Adapter.active_version_id == AdapterVersion.id)
    ).all()
    return {name: (VersionRecord.of(version) if version is not None else None) for name, version in rows}


@dataclass(frozen=True)
class AliasRouting:
    """What one alias serves: its active version (None = base) and an optional canary with its share."""

    active: VersionRecord | None
    canary: VersionRecord | None = None
    canary_share: float = 0.0


def routing_table(session: Session) -> dict[str, AliasRouting]:
    records = {
        v.id: VersionRecord.of(v)
        for v in session.scalars(
            select(AdapterVersion).where(
                AdapterVersion.id.in_(select(Adapter.active_version_id).union(select(Adapter.canary_version_id)))
            )
        )
    }
    return {
        a.name: AliasRouting(
            active=records.get(a.active_version_id) if a.active_version_id else None,
            canary=records.get(a.canary_version_id) if a.canary_version_id else None,
            canary_share=a.canary_share if a.canary_version_id else 0.0,
        )
        for a in session.scalars(select(Adapter))
    }


def find_version(session: Session, name: str, version: int) -> VersionRecord | None:
    row = session.scalars(
        select(AdapterVersion).where(AdapterVersion.adapter_name == name, AdapterVersion.version == version)
    ).one_or_none()
    return VersionRecord.of(row) if row is not None else None


def get_version(session: Session, version_id: int) -> AdapterVersion:
    row = session.get(AdapterVersion, version_id)
    if row is None:
        raise RegistryError(f"no adapter version with id {version_id}")
    return row


def list_versions(session: Session, name: str | None = None) -> list[AdapterVersion]:
    query = select(AdapterVersion).order_by(AdapterVersion.adapter_name, AdapterVersion.version)
    if name is not None:
        query = query.where(AdapterVersion.adapter_name == name)
    return list(session.scalars(query))


def list_aliases(session: Session) -> list[Adapter]:
    return list(session.scalars(select(Adapter).order_by(Adapter.name)))


def next_version_number(session: Session, name: str) -> int:
    current = session.scalar(select(func.max(AdapterVersion.version)).where(AdapterVersion.adapter_name == name))
    return (current or 0) + 1


def register_version(session: Session, version: AdapterVersion) -> AdapterVersion:
    ensure_alias(session, version.adapter_name)
    session.add(version)
    session.flush()
    return version


def promote(
    session: Session,
    version_id: int,
    *,
    reason: str = "promoted",
    actor: str = "admin",
    evidence: dict[str, Any] | None = None,
) -> AdapterVersion:
    """Make a version its alias's active one; the previous active version retires."""
    version = get_version(session, version_id)
    if version.status in (VersionStatus.REJECTED, VersionStatus.FAILED):
        raise RegistryError(f"{version.label} is {version.status} and can never be served")
    adapter = ensure_alias(session, version.adapter_name)
    if adapter.active_version_id == version.id:
        return version
    if adapter.active_version_id is not None:
        previous = get_version(session, adapter.active_version_id)
        previous.status = VersionStatus.RETIRED
        previous.retired_at = utcnow()
    version.replaced_id = adapter.active_version_id
    if adapter.canary_version_id == version.id:
        _end_canary(adapter)
    adapter.active_version_id = version.id
    version.status = VersionStatus.ACTIVE
    version.status_reason = reason
    version.promoted_at = utcnow()
    version.retired_at = None
    record_event(session, adapter.name, version.id, "promote", actor, reason, evidence)
    session.flush()
    return version


def _end_canary(adapter: Adapter) -> None:
    adapter.canary_version_id = None
    adapter.canary_share = 0.0
    adapter.canary_started_at = None


def start_canary(
    session: Session, version_id: int, share: float, *, actor: str = "gate", evidence: dict[str, Any] | None = None
) -> AdapterVersion:
    """Serve a candidate to `share` of the alias's traffic beside the active version."""
    version = get_version(session, version_id)
    if version.status in (VersionStatus.REJECTED, VersionStatus.FAILED):
        raise RegistryError(f"{version.label} is {version.status} and can never be served")
    adapter = ensure_alias(session, version.adapter_name)
    if adapter.canary_version_id is not None and adapter.canary_version_id != version.id:
        end_canary(session, adapter.name, promote_it=False, actor=actor, reason="replaced by a newer canary")
    adapter.canary_version_id = version.id
    adapter.canary_share = share
    adapter.canary_started_at = utcnow()
    version.status = VersionStatus.CANARY
    version.status_reason = f"canary at {share:.0%} of traffic"
    record_event(session, adapter.name, version.id, "canary_start", actor, version.status_reason, evidence)
    session.flush()
    return version


def end_canary(
    session: Session,
    alias: str,
    *,
    promote_it: bool,
    actor: str,
    reason: str,
    evidence: dict[str, Any] | None = None,
) -> AdapterVersion | None:
    """Promote the canary, or take it out of traffic (status rejected: it lost to the incumbent live)."""
    adapter = session.get(Adapter, alias)
    if adapter is None or adapter.canary_version_id is None:
        raise RegistryError(f"alias {alias!r} has no canary")
    version = get_version(session, adapter.canary_version_id)
    if promote_it:
        return promote(session, version.id, reason=reason, actor=actor, evidence=evidence)
    _end_canary(adapter)
    version.status = VersionStatus.REJECTED
    version.status_reason = reason
    record_event(session, alias, version.id, "canary_rollback", actor, reason, evidence)
    session.flush()
    return None


def reject(session: Session, version_id: int, reasons: list[str], evidence: dict[str, Any]) -> None:
    """The gate kept a candidate out: it stays on record, never served."""
    version = get_version(session, version_id)
    version.status = VersionStatus.REJECTED
    version.status_reason = "; ".join(reasons)
    record_event(session, version.adapter_name, version.id, "reject", "gate", version.status_reason, evidence)
    session.flush()


def set_pinned(session: Session, alias: str, pinned: bool, *, actor: str = "admin") -> Adapter:
    """A pinned alias keeps its version: no scheduled round or canary decision moves it."""
    adapter = ensure_alias(session, alias)
    adapter.pinned = pinned
    record_event(session, alias, adapter.active_version_id, "pin" if pinned else "unpin", actor, "pinned by an admin")
    session.flush()
    return adapter


def _reinstate(session: Session, adapter: Adapter, version_id: int | None, reason: str) -> AdapterVersion | None:
    """Point the alias back at an earlier version (None: the base model)."""
    previous = session.get(AdapterVersion, version_id) if version_id is not None else None
    adapter.active_version_id = previous.id if previous is not None else None
    if previous is not None:
        previous.status = VersionStatus.ACTIVE
        previous.status_reason = reason
        previous.retired_at = None
    return previous


def rollback(
    session: Session,
    name: str,
    *,
    reason: str = "rolled back",
    actor: str = "admin",
    evidence: dict[str, Any] | None = None,
) -> AdapterVersion | None:
    """Retire the active version; the alias serves what it served before it (None: the base model)."""
    adapter = session.get(Adapter, name)
    if adapter is None or adapter.active_version_id is None:
        raise RegistryError(f"alias {name!r} has no active version to roll back")
    current = get_version(session, adapter.active_version_id)
    current.status = VersionStatus.RETIRED
    current.status_reason = reason
    current.retired_at = utcnow()
    previous = _reinstate(session, adapter, current.replaced_id, reason)
    record_event(session, name, current.id, "rollback", actor, reason, evidence)
    session.flush()
    return previous


def mark_failed(session: Session, version_id: int, reason: str) -> None:
    """A version whose files did not verify: never served again; its alias returns to what it served before."""
    version = get_version(session, version_id)
    version.status = VersionStatus.FAILED
    version.status_reason = reason
    adapter = session.get(Adapter, version.adapter_name)
    if adapter is not None and adapter.active_version_id == version.id:
        _reinstate(session, adapter, version.replaced_id, f"{version.label} failed verification")
    if adapter is not None and adapter.canary_version_id == version.id:
        _end_canary(adapter)
    record_event(session, version.adapter_name, version.id, "failed", "server", reason)
    session.flush()
