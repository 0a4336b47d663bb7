"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-11-25 09:08:29.707577
"""

from collections.abc import Sequence

import sqlalchemy as sa
from advanced_alchemy.types import DateTimeUTC
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "adapters",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("active_version_id", sa.Integer(), nullable=True),
        sa.Column("canary_version_id", sa.Integer(), nullable=True),
        sa.Column("canary_share", sa.Float(), nullable=False),
        sa.Column("created_at", DateTimeUTC(timezone=True), nullable=False),
        sa.Column("updated_at", DateTimeUTC(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_adapters")),
    )
    op.create_table(
        "adapter_versions",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("adapter_name", sa.String(length=64), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("parent_id", sa.Integer(), nullable=True),
        sa.Column("replaced_id", sa.Integer(), nullable=True),
        sa.Column("path", sa.String(length=1024), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("base_model_id", sa.String(length=256), nullable=False),
        sa.Column("rank", sa.Integer(), nullable=False),
        sa.Column("alpha", sa.Float(), nullable=False),
        sa.Column("target_modules", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("status_reason", sa.Text(), nullable=True),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("tuning_run_id", sa.Integer(), nullable=True),
        sa.Column("created_at", DateTimeUTC(timezone=True), nullable=False),
        sa.Column("promoted_at", DateTimeUTC(timezone=True), nullable=True),
        sa.Column("retired_at", DateTimeUTC(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["adapter_name"], ["adapters.name"], name=op.f("fk_adapter_versions_adapter_name_adapters")
        ),
        sa.ForeignKeyConstraint(
            ["parent_id"],
            ["adapter_versions.id"],
            name=op.f("fk_adapter_versions_parent_id_adapter_versions"),
        ),
        sa.ForeignKeyConstraint(
            ["replaced_id"],
            ["adapter_versions.id"],
            name=op.f("fk_adapter_versions_replaced_id_adapter_versions"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_adapter_versions")),
        sa.UniqueConstraint("adapter_name", "version", name="one_number_per_version"),
    )
    with op.batch_alter_table("adapter_versions", schema=None) as batch_op:
        batch_op.create_index("ix_adapter_versions_status", ["adapter_name", "status"], unique=False)

    op.create_table(
        "completions",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("created_at", DateTimeUTC(timezone=True), nullable=False),
        sa.Column("caller", sa.String(length=64), nullable=False),
        sa.Column("tenant", sa.String(length=64), nullable=True),
        sa.Column("end_user", sa.String(length=256), nullable=True),
        sa.Column("model_requested", sa.String(length=160), nullable=False),
        sa.Column("adapter_alias", sa.String(length=64), nullable=True),
        sa.Column("adapter_version_id", sa.Integer(), nullable=True),
        sa.Column("served_by", sa.String(length=160), nullable=False),
        sa.Column("prompt_messages", sa.JSON(), nullable=False),
        sa.Column("answer", sa.Text(), nullable=False),
        sa.Column("finish_reason", sa.String(length=16), nullable=False),
        sa.Column("prompt_tokens", sa.Integer(), nullable=False),
        sa.Column("completion_tokens", sa.Integer(), nullable=False),
        sa.Column("sampling", sa.JSON(), nullable=False),
        sa.Column("latency_ms", sa.Float(), nullable=False),
        sa.Column("time_to_first_token_ms", sa.Float(), nullable=True),
        sa.ForeignKeyConstraint(
            ["adapter_version_id"],
            ["adapter_versions.id"],
            name=op.f("fk_completions_adapter_version_id_adapter_versions"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_completions")),
    )
    with op.batch_alter_table("completions", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_completions_adapter_version_id"), ["adapter_version_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_completions_adapter_alias"), ["adapter_alias"], unique=False)
        batch_op.create_index(batch_op.f("ix_completions_created_at"), ["created_at"], unique=False)

    op.create_table(
        "tuning_runs",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("adapter_name", sa.String(length=64), nullable=False),
        sa.Column("trigger", sa.String(length=16), nullable=False),
        sa.Column("method", sa.String(length=32), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("stage", sa.String(length=32), nullable=False),
        sa.Column("progress", sa.Float(), nullable=False),
        sa.Column("data_counts", sa.JSON(), nullable=False),
        sa.Column("config", sa.JSON(), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("parent_version_id", sa.Integer(), nullable=True),
        sa.Column("produced_version_id", sa.Integer(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("owner", sa.String(length=128), nullable=True),
        sa.Column("created_at", DateTimeUTC(timezone=True), nullable=False),
        sa.Column("heartbeat_at", DateTimeUTC(timezone=True), nullable=False),
        sa.Column("finished_at", DateTimeUTC(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["adapter_name"], ["adapters.name"], name=op.f("fk_tuning_runs_adapter_name_adapters")),
        sa.ForeignKeyConstraint(
            ["parent_version_id"],
            ["adapter_versions.id"],
            name=op.f("fk_tuning_runs_parent_version_id_adapter_versions"),
        ),
        sa.ForeignKeyConstraint(
            ["produced_version_id"],
            ["adapter_versions.id"],
            name=op.f("fk_tuning_runs_produced_version_id_adapter_versions"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_tuning_runs")),
    )
    with op.batch_alter_table("tuning_runs", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_tuning_runs_created_at"), ["created_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_tuning_runs_status"), ["status"], unique=False)

    op.create_table(
        "comparisons",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("completion_a_id", sa.String(length=64), nullable=False),
        sa.Column("completion_b_id", sa.String(length=64), nullable=False),
        sa.Column("outcome", sa.String(length=16), nullable=False),
        sa.Column("caller", sa.String(length=64), nullable=False),
        sa.Column("end_user", sa.String(length=256), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("created_at", DateTimeUTC(timezone=True), nullable=False),
        sa.CheckConstraint("outcome IN ('a', 'b', 'tie', 'both_bad')", name=op.f("ck_comparisons_outcome_values")),
        sa.CheckConstraint("completion_a_id <> completion_b_id", name=op.f("ck_comparisons_two_different_completions")),
        sa.ForeignKeyConstraint(
            ["completion_a_id"],
            ["completions.id"],
            name=op.f("fk_comparisons_completion_a_id_completions"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["completion_b_id"],
            ["completions.id"],
            name=op.f("fk_comparisons_completion_b_id_completions"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_comparisons")),
    )
    with op.batch_alter_table("comparisons", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_comparisons_completion_a_id"), ["completion_a_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_comparisons_completion_b_id"), ["completion_b_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_comparisons_created_at"), ["created_at"], unique=False)

    op.create_table(
        "feedback",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("completion_id", sa.String(length=64), nullable=False),
        sa.Column("caller", sa.String(length=64), nullable=False),
        sa.Column("end_user", sa.String(length=256), nullable=False),
        sa.Column("rating", sa.SmallInteger(), nullable=False),
        sa.Column("reasons", sa.JSON(), nullable=False),
        sa.Column("comment", sa.Text(), nullable=True),
        sa.Column("correction", sa.Text(), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("revision", sa.Integer(), nullable=False),
        sa.Column("created_at", DateTimeUTC(timezone=True), nullable=False),
        sa.Column("updated_at", DateTimeUTC(timezone=True), nullable=False),
        sa.CheckConstraint("status IN ('active', 'retracted', 'quarantined')", name=op.f("ck_feedback_status_values")),
        sa.CheckConstraint("rating IN (-1, 0, 1)", name=op.f("ck_feedback_rating_values")),
        sa.ForeignKeyConstraint(
            ["completion_id"],
            ["completions.id"],
            name=op.f("fk_feedback_completion_id_completions"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_feedback")),
        sa.UniqueConstraint("completion_id", "caller", "end_user", name="one_rating_per_rater"),
    )
    with op.batch_alter_table("feedback", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_feedback_completion_id"), ["completion_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_feedback_updated_at"), ["updated_at"], unique=False)

    op.create_table(
        "comparison_uses",
        sa.Column("comparison_id", sa.String(length=64), nullable=False),
        sa.Column("tuning_run_id", sa.Integer(), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.ForeignKeyConstraint(
            ["comparison_id"],
            ["comparisons.id"],
            name=op.f("fk_comparison_uses_comparison_id_comparisons"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["tuning_run_id"], ["tuning_runs.id"], name=op.f("fk_comparison_uses_tuning_run_id_tuning_runs")
        ),
        sa.PrimaryKeyConstraint("comparison_id", "tuning_run_id", name=op.f("pk_comparison_uses")),
    )
    op.create_table(
        "feedback_uses",
        sa.Column("feedback_id", sa.String(length=64), nullable=False),
        sa.Column("tuning_run_id", sa.Integer(), nullable=False),
        sa.Column("revision", sa.Integer(), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.ForeignKeyConstraint(
            ["feedback_id"],
            ["feedback.id"],
            name=op.f("fk_feedback_uses_feedback_id_feedback"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["tuning_run_id"], ["tuning_runs.id"], name=op.f("fk_feedback_uses_tuning_run_id_tuning_runs")
        ),
        sa.PrimaryKeyConstraint("feedback_id", "tuning_run_id", name=op.f("pk_feedback_uses")),
    )

    # The registry's pointers form cycles (an alias points at its versions, a version at the run
    # that made it, a run at the version it produced), so these keys come once all tables exist.
    with op.batch_alter_table("adapters") as batch_op:
        batch_op.create_foreign_key("fk_adapters_active_version_id", "adapter_versions", ["active_version_id"], ["id"])
        batch_op.create_foreign_key("fk_adapters_canary_version_id", "adapter_versions", ["canary_version_id"], ["id"])
    with op.batch_alter_table("adapter_versions") as batch_op:
        batch_op.create_foreign_key("fk_adapter_versions_tuning_run_id", "tuning_runs", ["tuning_run_id"], ["id"])


def downgrade() -> None:
    with op.batch_alter_table("adapter_versions") as batch_op:
        batch_op.drop_constraint("fk_adapter_versions_tuning_run_id", type_="foreignkey")
    with op.batch_alter_table("adapters") as batch_op:
        batch_op.drop_constraint("fk_adapters_canary_version_id", type_="foreignkey")
        batch_op.drop_constraint("fk_adapters_active_version_id", type_="foreignkey")
    op.drop_table("feedback_uses")
    op.drop_table("comparison_uses")
    with op.batch_alter_table("feedback", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_feedback_updated_at"))
        batch_op.drop_index(batch_op.f("ix_feedback_completion_id"))

    op.drop_table("feedback")
    with op.batch_alter_table("comparisons", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_comparisons_created_at"))
        batch_op.drop_index(batch_op.f("ix_comparisons_completion_b_id"))
        batch_op.drop_index(batch_op.f("ix_comparisons_completion_a_id"))

    op.drop_table("comparisons")
    with op.batch_alter_table("tuning_runs", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_tuning_runs_status"))
        batch_op.drop_index(batch_op.f("ix_tuning_runs_created_at"))

    op.drop_table("tuning_runs")
    with op.batch_alter_table("completions", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_completions_created_at"))
        batch_op.drop_index(batch_op.f("ix_completions_adapter_version_id"))
        batch_op.drop_index(batch_op.f("ix_completions_adapter_alias"))

    op.drop_table("completions")
    with op.batch_alter_table("adapter_versions", schema=None) as batch_op:
        batch_op.drop_index("ix_adapter_versions_status")

    op.drop_table("adapter_versions")
    op.drop_table("adapters")
