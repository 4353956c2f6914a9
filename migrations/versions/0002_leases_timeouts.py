"""Driver leases, the timed_out status and failure reasons.

``drivers`` records each ``sweep launch`` with a heartbeat; ``trials.driver_id`` is the
launch that claimed a trial, so a relaunch can tell a dead driver's zombies from a live
driver's work. ``trials.failure_reason`` says why a trial did not finish (out_of_memory,
timed_out, …) and decides whether it is retried; ``timed_out`` becomes a status. Two
indexes let the leaderboard rank in SQL; the one on trials replaces (sweep_id, status),
its first two columns.

Revision ID: 0002_leases_timeouts
Revises: 0001_initial
Create Date: 2026-11-23
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002_leases_timeouts"
down_revision: str | None = "0001_initial"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OLD_STATUSES = "status IN ('pending', 'running', 'done', 'failed')"
NEW_STATUSES = "status IN ('pending', 'running', 'done', 'failed', 'timed_out')"


def upgrade() -> None:
    op.create_table(
        "drivers",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("sweep_id", sa.Integer(), nullable=False),
        sa.Column("host", sa.String(length=255), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["sweep_id"], ["sweeps.id"], name=op.f("fk_drivers_sweep_id_sweeps"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_drivers")),
    )
    op.create_index(op.f("ix_drivers_sweep_id"), "drivers", ["sweep_id"], unique=False)
    with op.batch_alter_table("trials") as batch:
        batch.add_column(sa.Column("failure_reason", sa.String(length=32), nullable=True))
        batch.add_column(sa.Column("driver_id", sa.Integer(), nullable=True))
        batch.create_index(op.f("ix_trials_driver_id"), ["driver_id"], unique=False)
        batch.create_foreign_key(
            op.f("fk_trials_driver_id_drivers"), "drivers", ["driver_id"], ["id"],
            ondelete="SET NULL",
        )
        batch.drop_constraint(op.f("ck_trials_status"), type_="check")
        batch.create_check_constraint(op.f("ck_trials_status"), NEW_STATUSES)
    # Failures recorded before this revision have no reason; the error type tells it.
    op.execute(
        "UPDATE trials SET failure_reason = CASE WHEN error_type = 'WorkerCrashed' "
        "THEN 'worker_crashed' ELSE 'error' END WHERE status = 'failed'"
    )
    # The leaderboard ranks in SQL from these (see orchestrator/db/models.py); the trials
    # index starts with (sweep_id, status) and so takes over from the index on just those.
    op.drop_index(op.f("ix_trials_sweep_id_status"), table_name="trials")
    op.create_index(
        op.f("ix_trials_sweep_id_status_model_dataset"), "trials",
        ["sweep_id", "status", "model", "dataset", "is_baseline", "environment_id", "position",
         "id"],
        unique=False,
    )
    op.create_index(
        op.f("ix_metrics_name_value"), "metrics", ["name", "value", "trial_id", "direction"],
        unique=False,
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_metrics_name_value"), table_name="metrics")
    op.drop_index(op.f("ix_trials_sweep_id_status_model_dataset"), table_name="trials")
    op.create_index(
        op.f("ix_trials_sweep_id_status"), "trials", ["sweep_id", "status"], unique=False
    )
    # The old schema has no timed_out status: such trials become plain failures.
    op.execute("UPDATE trials SET status = 'failed' WHERE status = 'timed_out'")
    with op.batch_alter_table("trials") as batch:
        batch.drop_constraint(op.f("ck_trials_status"), type_="check")
        batch.create_check_constraint(op.f("ck_trials_status"), OLD_STATUSES)
        batch.drop_constraint(op.f("fk_trials_driver_id_drivers"), type_="foreignkey")
        batch.drop_index(op.f("ix_trials_driver_id"))
        batch.drop_column("driver_id")
        batch.drop_column("failure_reason")
    op.drop_index(op.f("ix_drivers_sweep_id"), table_name="drivers")
    op.drop_table("drivers")
