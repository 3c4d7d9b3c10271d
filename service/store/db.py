"""Database engines and sessions.

SQLite runs in WAL mode with a busy timeout and foreign keys on, so several
worker processes can write one file. The embedded SQLite default migrates itself
on first use; PostgreSQL is migrated once with ``mlpq db upgrade``.
"""

from __future__ import annotations

import functools
import os
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from service.settings import get_settings
from service.store import sqlite_functions

# Seconds a SQLite writer waits for the lock before "database is locked".
SQLITE_BUSY_TIMEOUT_S = 60


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    # Autocommit off at the driver level; SQLAlchemy emits BEGIN (IMMEDIATE) itself.
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_S * 1000}")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()
    sqlite_functions.register(dbapi_conn)


def _sqlite_begin(conn) -> None:
    # BEGIN IMMEDIATE takes the write lock up front, so two writers queue on the
    # busy timeout instead of failing with "database is locked" on lock upgrade.
    conn.exec_driver_sql("BEGIN IMMEDIATE")


def make_engine(url: str, **kwargs: object) -> Engine:
    """Create an engine for ``url`` with the store's connection settings."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url,
            connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S, "check_same_thread": False},
            **kwargs,
        )
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    kwargs.setdefault("pool_pre_ping", True)
    return create_engine(url, **kwargs)


def is_sqlite(engine: Engine) -> bool:
    return engine.dialect.name == "sqlite"


# Engines handed out by get_engine, per (url, pid): a forked child never reuses its
# parent's pooled connections. A dict rather than lru_cache so dispose_engines can
# close them (tests drop their stores; eviction would leak open connections).
_ENGINES: dict[tuple[str, int], Engine] = {}
_ENGINES_LOCK = threading.Lock()
# SQLite stores found at the newest schema by this process or the one it was forked from
# (a worker's main process checks once; its children skip Alembic on their first run).
_MIGRATED: set[str] = set()


def get_engine(url: str | None = None) -> Engine:
    """The process's engine for ``url`` (default: the settings' store).

    A SQLite store is migrated to the newest schema on first use, so a new user
    runs nothing extra. Engines are per process: a forked worker gets its own.
    """
    key = (url or get_settings().database_url, os.getpid())
    engine = _ENGINES.get(key)
    if engine is None:
        with _ENGINES_LOCK:
            engine = _ENGINES.get(key)
            if engine is None:
                engine = make_engine(key[0])
                if is_sqlite(engine) and key[0] not in _MIGRATED:
                    if not _at_head(engine) and not _created_from_snapshot(engine):
                        from service.store.migrate import upgrade

                        upgrade(engine)
                    _MIGRATED.add(key[0])
                _ENGINES[key] = engine
    return engine


_REVISION = re.compile(r"^(down_)?revision\b[^=]*=\s*['\"]?([\w]+)?", re.M)


@functools.cache
def script_head() -> str | None:
    """The newest revision in ``migrations/versions``, read from the files without Alembic.

    Importing Alembic costs a quarter of a second; every ``mlpq`` command and every
    worker start checks the embedded store against this first and migrates only
    when it differs (tests/store checks it against Alembic's own answer).
    """
    import migrations

    revisions: set[str] = set()
    parents: set[str] = set()
    for path in (Path(migrations.__file__).parent / "versions").glob("*.py"):
        for down, value in _REVISION.findall(path.read_text()):
            if value and value != "None":
                (parents if down else revisions).add(value)
    heads = revisions - parents
    return heads.pop() if len(heads) == 1 else None


def _at_head(engine: Engine) -> bool:
    """Whether the SQLite store's recorded revision is the newest (no transaction, no lock)."""
    conn = engine.raw_connection()
    try:
        row = conn.cursor().execute("SELECT version_num FROM alembic_version").fetchone()
    except Exception:  # no such table yet
        return False
    finally:
        conn.close()
    head = script_head()
    return head is not None and row is not None and row[0] == head


def _created_from_snapshot(engine: Engine) -> bool:
    """Whether a store with no tables yet was just created at head from the schema snapshot."""
    from service.store.sqlite_snapshot import create_from_snapshot

    head = script_head()
    if head is None:
        return False
    conn = engine.raw_connection()
    try:
        return create_from_snapshot(conn.driver_connection, head)
    finally:
        conn.close()


def dispose_engines() -> None:
    """Close every engine get_engine handed out and forget it (the next call makes a new one).

    Engines inherited from a parent process are dropped without closing the
    parent's connections.
    """
    with _ENGINES_LOCK:
        engines = list(_ENGINES.items())
        _ENGINES.clear()
    for (_url, pid), engine in engines:
        engine.dispose(close=pid == os.getpid())


@contextmanager
def session_scope(engine: Engine | None = None) -> Iterator[Session]:
    """A session in one transaction: committed on success, rolled back on error."""
    factory = sessionmaker(engine or get_engine(), expire_on_commit=False)
    with factory.begin() as session:
        yield session
