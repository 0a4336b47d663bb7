"""canary pinning events locks

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25 10:38:01.520383
"""

from collections.abc import Sequence

import sqlalchemy as sa
from advanced_alchemy.types import DateTimeUTC
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "locks",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("holder", sa.String(length=128), nullable=False),
        sa.Column("acquired_at", DateTimeUTC(timezone=True), nullable=False),
        sa.Column("expires_at", DateTimeUTC(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_locks")),
    )
    op.create_table(
        "registry_events",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("adapter_name", sa.String(length=64), nullable=False),
        sa.Column("version_id", sa.Integer(), nullable=True),
        sa.Column("action", sa.String(length=32), nullable=False),
        sa.Column("actor", sa.String(length=32), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("evidence", sa.JSON(), nullable=False),
        sa.Column("created_at", DateTimeUTC(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["adapter_name"], ["adapters.name"], name=op.f("fk_registry_events_adapter_name_adapters")
        ),
        sa.ForeignKeyConstraint(
            ["version_id"], ["adapter_versions.id"], name=op.f("fk_registry_events_version_id_adapter_versions")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_registry_events")),
    )
    with op.batch_alter_table("registry_events", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_registry_events_adapter_name"), ["adapter_name"], unique=False)
        batch_op.create_index(batch_op.f("ix_registry_events_created_at"), ["created_at"], unique=False)

    with op.batch_alter_table("adapters", schema=None) as batch_op:
        batch_op.add_column(sa.Column("canary_started_at", DateTimeUTC(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("pinned", sa.Boolean(), server_default=sa.false(), nullable=False))


def downgrade() -> None:
    with op.batch_alter_table("adapters", schema=None) as batch_op:
        batch_op.drop_column("pinned")
        batch_op.drop_column("canary_started_at")

    with op.batch_alter_table("registry_events", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_registry_events_created_at"))
        batch_op.drop_index(batch_op.f("ix_registry_events_adapter_name"))

    op.drop_table("registry_events")
    op.drop_table("locks")
