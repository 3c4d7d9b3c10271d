"""A least-privilege reader: the role mlpq_reader may SELECT the store's tables and views.

PostgreSQL only (SQLite has no roles; its readers open the file read-only). Roles
belong to the whole server, so the role is created if missing and never dropped:
the downgrade revokes this schema's grants only, other stores on the server may
use it. Give people a login of their own in it and point MLPQ_READ_DATABASE_URL there:

    CREATE ROLE alice LOGIN PASSWORD '...' IN ROLE mlpq_reader;

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-04
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ROLE = "mlpq_reader"

# Two stores migrated at once on one server may both find the role missing.
CREATE_ROLE = f"""
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{ROLE}') THEN
        CREATE ROLE {ROLE} NOLOGIN;
    END IF;
EXCEPTION WHEN duplicate_object OR unique_violation THEN
    NULL;
END
$$
"""


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(CREATE_ROLE)
    schema = op.get_bind().exec_driver_sql("SELECT current_schema()").scalar_one()
    op.execute(f'GRANT USAGE ON SCHEMA "{schema}" TO {ROLE}')
    op.execute(f'GRANT SELECT ON ALL TABLES IN SCHEMA "{schema}" TO {ROLE}')
    # Tables and views later migrations add (created by the role that migrates).
    op.execute(f'ALTER DEFAULT PRIVILEGES IN SCHEMA "{schema}" GRANT SELECT ON TABLES TO {ROLE}')


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    schema = op.get_bind().exec_driver_sql("SELECT current_schema()").scalar_one()
    op.execute(
        f'ALTER DEFAULT PRIVILEGES IN SCHEMA "{schema}" REVOKE SELECT ON TABLES FROM {ROLE}'
    )
    op.execute(f'REVOKE SELECT ON ALL TABLES IN SCHEMA "{schema}" FROM {ROLE}')
    op.execute(f'REVOKE USAGE ON SCHEMA "{schema}" FROM {ROLE}')
