"""A new SQLite store in one transaction, from the schema the migrations produce.

Creating the embedded store through Alembic costs about 0.15 s (importing it, then
running every revision), a tenth of a first `mlpq run`. A store that has no tables
yet is instead created from ``sqlite_schema.sql``: the ``CREATE`` statements that
``sqlite_master`` holds after ``upgrade`` to head, and the head's revision in
``alembic_version``, so Alembic takes over from there for later revisions.

The file is written by ``python -m service.store.sqlite_snapshot``;
``tests/store/test_migrations.py`` checks that it is what the migrations give today
(a new revision without a new snapshot fails there, saying to run that command).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

#: The schema of a SQLite store at the head revision: one statement a line group,
#: separated by ``;\n``. The last statement records the revision.
SNAPSHOT = Path(__file__).with_name("sqlite_schema.sql")
_SEPARATOR = ";\n\n"


def schema_statements(conn: sqlite3.Connection) -> list[str]:
    """The ``CREATE`` statements of ``conn``'s tables, indexes, views and triggers, in order."""
    rows = conn.execute(
        "SELECT sql FROM sqlite_master WHERE sql IS NOT NULL AND name NOT LIKE 'sqlite_%' "
        "ORDER BY rowid"
    ).fetchall()
    return [row[0] for row in rows]


def create_from_snapshot(conn: sqlite3.Connection, head: str) -> bool:
    """Create the schema on ``conn`` (a driver connection in autocommit) if it has none.

    Returns False, changing nothing, when the store has tables already or the
    snapshot is not of revision ``head``; the caller then migrates with Alembic.
    Another process creating the same store at the same time waits on the write lock
    and finds the tables there.
    """
    statements = SNAPSHOT.read_text().split(_SEPARATOR)
    revision = statements[-1].strip().rstrip(";")
    if revision != f"INSERT INTO alembic_version (version_num) VALUES ('{head}')":
        return False
    conn.execute("BEGIN IMMEDIATE")
    try:
        if conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
            conn.execute("ROLLBACK")
            return False
        for statement in statements:
            conn.execute(statement)
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return True


def write_snapshot(path: Path = SNAPSHOT) -> str:
    """Migrate a new store in memory with Alembic and write its schema to ``path``."""
    from sqlalchemy import text

    from service.store.db import make_engine
    from service.store.migrate import head_revision, upgrade

    engine = make_engine("sqlite://")
    upgrade(engine)
    with engine.connect() as conn:
        statements = schema_statements(conn.connection.driver_connection)
        (version,) = conn.execute(text("SELECT version_num FROM alembic_version")).one()
    engine.dispose()
    assert version == head_revision()
    statements.append(f"INSERT INTO alembic_version (version_num) VALUES ('{version}')")
    content = _SEPARATOR.join(statements) + ";\n"
    path.write_text(content)
    return content


if __name__ == "__main__":
    write_snapshot()
    print(f"wrote {SNAPSHOT}")
