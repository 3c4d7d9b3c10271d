"""The reaper's index covers running runs only: ``ix_runs_running_heartbeat``.

``ix_runs_status_heartbeat`` on (status, heartbeat_at) held an entry for every run,
though only running runs are ever looked up by it (the reaper's stale heartbeats,
the window's count of running runs, a dead worker's runs). A submit wrote one
entry per run into it, the same (queued, NULL) every time: a million rows copied
into ``runs`` took 9.4-11.2 s with it and 8.5-8.6 s with a partial index on
``heartbeat_at WHERE status = 'running'``, which a run enters when it is claimed
and leaves when it finishes. Both stores support partial indexes.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-05
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_RUNNING = "status = 'running'"


def upgrade() -> None:
    op.drop_index("ix_runs_status_heartbeat", table_name="runs")
    op.create_index(
        "ix_runs_running_heartbeat",
        "runs",
        ["heartbeat_at"],
        postgresql_where=sa.text(_RUNNING),
        sqlite_where=sa.text(_RUNNING),
    )


def downgrade() -> None:
    op.drop_index("ix_runs_running_heartbeat", table_name="runs")
    op.create_index("ix_runs_status_heartbeat", "runs", ["status", "heartbeat_at"])
