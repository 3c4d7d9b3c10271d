"""The window: when each run's message was published, and each run's estimated cost.

``published_at`` says when a queued run's message was handed to the broker: a run
still queued long after runs published later than it have started lost its message
(the broker restarted, a message in flight), and is published again.
``est_seconds`` is the run's estimated training time (``engine.cost``), computed at
submit, which packs short runs into one message as the window is topped up.
``ix_runs_unsent`` finds the next runs to publish (queued, not yet in the broker) in
id order without walking the runs already done: a million-run grid is fed from it a
few hundred runs at a time.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-04
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_UNSENT = "status = 'queued' AND NOT published"
_IN_BROKER = "status = 'queued' AND published"


def upgrade() -> None:
    # Plain ALTER TABLE ... ADD COLUMN on both stores (no table rebuild under the views).
    op.add_column("runs", sa.Column("published_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("runs", sa.Column("est_seconds", sa.Double(), nullable=True))
    op.create_index(
        "ix_runs_unsent",
        "runs",
        ["id"],
        postgresql_where=sa.text(_UNSENT),
        sqlite_where=sa.text(_UNSENT),
    )
    op.create_index(
        "ix_runs_in_broker",
        "runs",
        ["published_at"],
        postgresql_where=sa.text(_IN_BROKER),
        sqlite_where=sa.text(_IN_BROKER),
    )


def downgrade() -> None:
    op.drop_index("ix_runs_in_broker", table_name="runs")
    op.drop_index("ix_runs_unsent", table_name="runs")
    for column in ("est_seconds", "published_at"):
        op.execute(f"ALTER TABLE runs DROP COLUMN {column}")
