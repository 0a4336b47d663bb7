"""What loraloop records: completions, ratings, comparisons, adapter versions and tuning runs.

Every answer is attributable to one adapter version and every rating to one answer; that is
what makes live quality per version measurable (DESIGN.md §1, §4).
"""

from __future__ import annotations

import enum
import uuid
from datetime import UTC, datetime
from typing import Any

from advanced_alchemy.types import DateTimeUTC
from sqlalchemy import (
    JSON,
    Boolean,
    CheckConstraint,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    SmallInteger,
    String,
    Text,
    UniqueConstraint,
    false,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_uuid() -> str:
    return uuid.uuid4().hex


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: DateTimeUTC(timezone=True), dict[str, Any]: JSON, list[Any]: JSON}


class FeedbackStatus(enum.StrEnum):
    ACTIVE = "active"
    RETRACTED = "retracted"
    QUARANTINED = "quarantined"


class ComparisonOutcome(enum.StrEnum):
    A = "a"
    B = "b"
    TIE = "tie"
    BOTH_BAD = "both_bad"


class VersionStatus(enum.StrEnum):
    CANDIDATE = "candidate"
    CANARY = "canary"
    ACTIVE = "active"
    RETIRED = "retired"
    REJECTED = "rejected"
    FAILED = "failed"  # the files did not verify or load: never served


class RunStatus(enum.StrEnum):
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    REJECTED = "rejected"  # trained, but the gate kept the candidate out
    SKIPPED = "skipped"  # not enough new feedback
    FAILED = "failed"


class UseRole(enum.StrEnum):
    TRAIN = "train"
    HELDOUT = "heldout"


class Completion(Base):
    """One answer the server gave, exactly as the model saw and produced it."""

    __tablename__ = "completions"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    caller: Mapped[str] = mapped_column(String(64), default="local")  # API key id, or "local"
    tenant: Mapped[str | None] = mapped_column(String(64))
    end_user: Mapped[str | None] = mapped_column(String(256))  # OpenAI's `user` field
    model_requested: Mapped[str] = mapped_column(String(160))
    adapter_alias: Mapped[str | None] = mapped_column(String(64), index=True)  # the alias it counts for
    adapter_version_id: Mapped[int | None] = mapped_column(ForeignKey("adapter_versions.id"), index=True)
    served_by: Mapped[str] = mapped_column(String(160))  # "default@3", or the base model id
    prompt_messages: Mapped[list[Any]]
    answer: Mapped[str] = mapped_column(Text)
    finish_reason: Mapped[str] = mapped_column(String(16))
    prompt_tokens: Mapped[int] = mapped_column(Integer)
    completion_tokens: Mapped[int] = mapped_column(Integer)
    sampling: Mapped[dict[str, Any]]
    latency_ms: Mapped[float] = mapped_column(Float)
    time_to_first_token_ms: Mapped[float | None] = mapped_column(Float)

    adapter_version: Mapped[AdapterVersion | None] = relationship(lazy="raise")


class Feedback(Base):
    """The current thumbs of one caller on one completion (re-rating updates this row)."""

    __tablename__ = "feedback"
    __table_args__ = (
        UniqueConstraint("completion_id", "caller", "end_user", name="one_rating_per_rater"),
        CheckConstraint("rating IN (-1, 0, 1)", name="rating_values"),
        CheckConstraint("status IN ('active', 'retracted', 'quarantined')", name="status_values"),
    )

    id: Mapped[str] = mapped_column(String(64), primary_key=True, default=new_uuid)
    completion_id: Mapped[str] = mapped_column(ForeignKey("completions.id", ondelete="CASCADE"), index=True)
    caller: Mapped[str] = mapped_column(String(64), default="local")
    end_user: Mapped[str] = mapped_column(String(256), default="")
    rating: Mapped[int] = mapped_column(SmallInteger)
    reasons: Mapped[list[Any]] = mapped_column(default=list)
    comment: Mapped[str | None] = mapped_column(Text)
    correction: Mapped[str | None] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), default=FeedbackStatus.ACTIVE)
    revision: Mapped[int] = mapped_column(Integer, default=1)  # bumps on every change; training uses pin one
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow, index=True)

    completion: Mapped[Completion] = relationship(lazy="raise")


class Comparison(Base):
    """A pairwise choice between two answers to the same prompt."""

    __tablename__ = "comparisons"
    __table_args__ = (
        CheckConstraint("outcome IN ('a', 'b', 'tie', 'both_bad')", name="outcome_values"),
        CheckConstraint("completion_a_id <> completion_b_id", name="two_different_completions"),
    )

    id: Mapped[str] = mapped_column(String(64), primary_key=True, default=new_uuid)
    completion_a_id: Mapped[str] = mapped_column(ForeignKey("completions.id", ondelete="CASCADE"), index=True)
    completion_b_id: Mapped[str] = mapped_column(ForeignKey("completions.id", ondelete="CASCADE"), index=True)
    outcome: Mapped[str] = mapped_column(String(16))
    caller: Mapped[str] = mapped_column(String(64), default="local")
    end_user: Mapped[str] = mapped_column(String(256), default="")
    status: Mapped[str] = mapped_column(String(16), default=FeedbackStatus.ACTIVE)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)

    completion_a: Mapped[Completion] = relationship(foreign_keys=[completion_a_id], lazy="raise")
    completion_b: Mapped[Completion] = relationship(foreign_keys=[completion_b_id], lazy="raise")


class Adapter(Base):
    """A public alias (`default`, `support-bot`…) pointing at its active version, if any."""

    __tablename__ = "adapters"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    active_version_id: Mapped[int | None] = mapped_column(
        ForeignKey("adapter_versions.id", use_alter=True, name="fk_adapters_active_version_id")
    )
    canary_version_id: Mapped[int | None] = mapped_column(
        ForeignKey("adapter_versions.id", use_alter=True, name="fk_adapters_canary_version_id")
    )
    canary_share: Mapped[float] = mapped_column(Float, default=0.0)
    canary_started_at: Mapped[datetime | None]
    # A pinned alias keeps its version: no scheduled round, canary decision or automatic rollback moves it.
    pinned: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class AdapterVersion(Base):
    """One immutable LoRA adapter on disk, with where it came from and how it did."""

    __tablename__ = "adapter_versions"
    __table_args__ = (
        UniqueConstraint("adapter_name", "version", name="one_number_per_version"),
        Index("ix_adapter_versions_status", "adapter_name", "status"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    adapter_name: Mapped[str] = mapped_column(ForeignKey("adapters.name"))
    version: Mapped[int] = mapped_column(Integer)
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("adapter_versions.id"))  # trained from
    # What the alias served before this version was promoted: where rollback returns to.
    replaced_id: Mapped[int | None] = mapped_column(ForeignKey("adapter_versions.id"))
    path: Mapped[str] = mapped_column(String(1024))  # relative to the adapter store
    sha256: Mapped[str] = mapped_column(String(64))
    base_model_id: Mapped[str] = mapped_column(String(256))
    rank: Mapped[int] = mapped_column(Integer)
    alpha: Mapped[float] = mapped_column(Float)
    target_modules: Mapped[list[Any]]
    status: Mapped[str] = mapped_column(String(16), default=VersionStatus.CANDIDATE)
    status_reason: Mapped[str | None] = mapped_column(Text)
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    tuning_run_id: Mapped[int | None] = mapped_column(
        ForeignKey("tuning_runs.id", use_alter=True, name="fk_adapter_versions_tuning_run_id")
    )
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    promoted_at: Mapped[datetime | None]
    retired_at: Mapped[datetime | None]

    @property
    def label(self) -> str:
        return f"{self.adapter_name}@{self.version}"


class TuningRun(Base):
    """One round of the loop: data in, a candidate version (or a reason there is none) out."""

    __tablename__ = "tuning_runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    adapter_name: Mapped[str] = mapped_column(ForeignKey("adapters.name"))
    trigger: Mapped[str] = mapped_column(String(16))  # manual | schedule
    method: Mapped[str | None] = mapped_column(String(32))  # kto, dpo, kto+dpo
    status: Mapped[str] = mapped_column(String(16), default=RunStatus.RUNNING, index=True)
    stage: Mapped[str] = mapped_column(String(32), default="starting")
    progress: Mapped[float] = mapped_column(Float, default=0.0)  # 0..1
    data_counts: Mapped[dict[str, Any]] = mapped_column(default=dict)
    config: Mapped[dict[str, Any]] = mapped_column(default=dict)
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    parent_version_id: Mapped[int | None] = mapped_column(ForeignKey("adapter_versions.id"))
    produced_version_id: Mapped[int | None] = mapped_column(ForeignKey("adapter_versions.id"))
    error: Mapped[str | None] = mapped_column(Text)
    owner: Mapped[str | None] = mapped_column(String(128))  # host:pid of the process running it
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    heartbeat_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None]


class FeedbackUse(Base):
    """That a tuning run trained on (or held out) one revision of one rating."""

    __tablename__ = "feedback_uses"

    feedback_id: Mapped[str] = mapped_column(ForeignKey("feedback.id", ondelete="CASCADE"), primary_key=True)
    tuning_run_id: Mapped[int] = mapped_column(ForeignKey("tuning_runs.id"), primary_key=True)
    revision: Mapped[int] = mapped_column(Integer)
    role: Mapped[str] = mapped_column(String(16))


class ComparisonUse(Base):
    """That a tuning run trained on (or held out) one comparison."""

    __tablename__ = "comparison_uses"

    comparison_id: Mapped[str] = mapped_column(ForeignKey("comparisons.id", ondelete="CASCADE"), primary_key=True)
    tuning_run_id: Mapped[int] = mapped_column(ForeignKey("tuning_runs.id"), primary_key=True)
    role: Mapped[str] = mapped_column(String(16))


class RegistryEvent(Base):
    """Every decision that changed (or refused to change) what an alias serves, with its evidence."""

    __tablename__ = "registry_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    adapter_name: Mapped[str] = mapped_column(ForeignKey("adapters.name"), index=True)
    version_id: Mapped[int | None] = mapped_column(ForeignKey("adapter_versions.id"))
    action: Mapped[str] = mapped_column(String(32))  # promote, rollback, reject, canary_start, canary_promote…
    actor: Mapped[str] = mapped_column(String(32))  # gate, canary, admin, tuning, server
    reason: Mapped[str] = mapped_column(Text)
    evidence: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)


class ApiKey(Base):
    """An API key: only the sha256 of its token is kept, so a database leak does not leak working keys."""

    __tablename__ = "api_keys"
    __table_args__ = (CheckConstraint("role IN ('admin', 'user')", name="role_values"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)  # public: shown in lists, recorded as caller
    token_sha256: Mapped[str] = mapped_column(String(64))
    role: Mapped[str] = mapped_column(String(16))
    tenant: Mapped[str | None] = mapped_column(String(64))
    name: Mapped[str] = mapped_column(String(128), default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None]


class Lock(Base):
    """A named lease in the database: one holder at a time across processes and machines.

    A holder renews `expires_at` while it works; a holder that died simply stops renewing, and the
    lease can be taken over once it has expired.
    """

    __tablename__ = "locks"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    holder: Mapped[str] = mapped_column(String(128))
    acquired_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime]
