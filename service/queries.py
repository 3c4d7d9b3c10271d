"""Read-side helpers over the store's views: the queries a user would type.

Each helper runs one plain SQL statement (shown in the module constants, the
same text works in ``mlpq sql``) on SQLite and PostgreSQL alike.
"""

from __future__ import annotations

#: Views created by the migrations (autogenerate comparisons skip them).
VIEWS: tuple[str, ...] = ("run_summary", "experiment_progress")
