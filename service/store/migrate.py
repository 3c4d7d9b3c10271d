"""Schema migrations, run in code: ``upgrade``, ``downgrade``, ``current_revision``.

The Alembic configuration is built here (no ini file needed, so it works from an
installed package): the script location is the ``migrations`` package folder and
the caller's engine lends its connection through ``config.attributes``.

Every migration runs inside one transaction that first takes a lock — SQLite's
``BEGIN IMMEDIATE`` write lock, a PostgreSQL advisory lock — so two processes
starting at once on a new store migrate it once; the second finds it at head.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util.exc import CommandError
from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import DBAPIError

import migrations
from service.exceptions import StoreError

#: Views created by the migrations (autogenerate comparisons skip them).
VIEWS: tuple[str, ...] = ("run_summary", "experiment_progress", "run_groups")

#: Folder of env.py and versions/, inside the installed ``migrations`` package.
SCRIPT_LOCATION = Path(migrations.__file__).resolve().parent

# Arbitrary constant key of the PostgreSQL advisory lock that serializes migrations.
_PG_LOCK_KEY = 0x6D6C7071  # "mlpq"


#: Indexes written by hand in the migrations, per store: the window's partial indexes
#: (revision 0004), dedupe's, a hash index on PostgreSQL (0005), and the reaper's
#: partial index on running runs (0006).
HAND_WRITTEN_INDEXES = frozenset(
    {"ix_runs_unsent", "ix_runs_in_broker", "ix_runs_config_hash", "ix_runs_running_heartbeat"}
)


def include_object(
    obj: object, name: str | None, type_: str, reflected: bool, compare_to: object
) -> bool:
    """Autogenerate filter: views and some indexes are written by hand in migrations."""
    if type_ == "index" and name in HAND_WRITTEN_INDEXES:
        return False
    return not (type_ == "table" and name in VIEWS)


def alembic_config(connection: Connection | None = None) -> Config:
    """An Alembic Config for the store's migrations, bound to ``connection`` if given."""
    config = Config()
    config.set_main_option("script_location", str(SCRIPT_LOCATION))
    config.set_main_option("path_separator", "os")
    if connection is not None:
        config.attributes["connection"] = connection
    return config


@cache
def head_revision() -> str:
    """The newest revision in ``migrations/versions``."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if head is None:
        raise StoreError(f"migrations: no revision found in {SCRIPT_LOCATION / 'versions'}")
    return head


def _current(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


def _lock(connection: Connection) -> None:
    # SQLite: the engine's BEGIN IMMEDIATE already holds the database's write lock.
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_LOCK_KEY})


def _fail(action: str, engine: Engine, exc: Exception) -> StoreError:
    where = engine.url.render_as_string(hide_password=True)
    orig = getattr(exc, "orig", None) or exc
    first = (str(orig).strip().splitlines() or [type(orig).__name__])[0]
    return StoreError(f"{action} {where}: {first}")


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Migrate the store to ``revision`` (default: the newest); a no-op when already there.

    Safe when several processes call it at once: they take turns on a lock and
    the later ones find nothing to do.
    """
    target = head_revision() if revision == "head" else revision
    try:
        with engine.begin() as connection:
            _lock(connection)
            if _current(connection) == target:
                return
            command.upgrade(alembic_config(connection), revision)
    except (DBAPIError, CommandError) as exc:
        raise _fail("cannot migrate", engine, exc) from None


def downgrade(engine: Engine, revision: str) -> None:
    """Migrate the store down to ``revision`` (``"base"``: drop every table and view)."""
    try:
        with engine.begin() as connection:
            _lock(connection)
            command.downgrade(alembic_config(connection), revision)
    except (DBAPIError, CommandError) as exc:
        raise _fail("cannot migrate", engine, exc) from None


def current_revision(engine: Engine) -> str | None:
    """The revision the store is at, or None for an empty (never migrated) store."""
    try:
        with engine.connect() as connection:
            return _current(connection)
    except DBAPIError as exc:
        raise _fail("cannot read the schema revision of", engine, exc) from None
