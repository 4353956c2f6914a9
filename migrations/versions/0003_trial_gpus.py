"""The GPUs a trial runs on.

``trials.gpus`` holds the GPU ids Ray assigned to the trial's worker ("0", "2,3"; "" for a
CPU trial), which the worker announces before its work starts, so that ``sweep status
--watch`` can show where each running trial is. Nullable: trials recorded before this
revision, and trials whose worker has not announced itself yet, have none.

Revision ID: 0003_trial_gpus
Revises: 0002_leases_timeouts
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003_trial_gpus"
down_revision: str | None = "0002_leases_timeouts"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # A nullable column is a plain ALTER TABLE … ADD COLUMN on both backends (no copy).
    with op.batch_alter_table("trials") as batch:
        batch.add_column(sa.Column("gpus", sa.String(length=64), nullable=True))


def downgrade() -> None:
    # SQLite rebuilds the table here (batch mode); every other column and row is kept.
    with op.batch_alter_table("trials") as batch:
        batch.drop_column("gpus")
