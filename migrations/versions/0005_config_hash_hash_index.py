"""Dedupe's index on PostgreSQL: a hash index on ``runs.config_hash``.

Submit looks runs up by ``config_hash = ANY(...)`` only, never by range or order.
PostgreSQL's btree on the 64-character hex hashes, random in insertion order, cost
about a fifth of a million-run COPY (15.0 s with it, 11.9 s with a hash index, on
the benchmark's grid) and looked 200,000 hashes up in 3.0 s against 2.0 s. SQLite
has no hash index and keeps its btree.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-04
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.drop_index("ix_runs_config_hash", table_name="runs")
    op.create_index("ix_runs_config_hash", "runs", ["config_hash"], postgresql_using="hash")


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.drop_index("ix_runs_config_hash", table_name="runs")
    op.create_index("ix_runs_config_hash", "runs", ["config_hash"])
