"""Reading the store without being able to change it: ``mlpq sql`` and every results command.

Two locks, one per store, and a check of the statement before either:

- **The statement**: exactly one, and a read (``SELECT``, ``WITH``, ``VALUES``,
  ``TABLE``, ``PRAGMA`` on SQLite); functions that reach outside the query
  (files, other sessions, settings, large objects) are refused by name.
- **SQLite**: the file is opened read-only (``mode=ro``) with ``PRAGMA
  query_only``, and an authorizer allows only reading actions: no ATTACH (so no
  ``VACUUM INTO``), no writing PRAGMA, no ``load_extension``. Statements run in
  autocommit, so a read holds no lock past itself and never blocks the workers
  (WAL lets readers and the writer run side by side).
- **PostgreSQL**: every transaction is read-only (``default_transaction_read_only``),
  a statement timeout bounds each one, the query runs through a server-side cursor
  (``DECLARE ... CURSOR FOR``, which takes a single query and nothing else: no
  ``COPY``, ``DO``, ``CALL``, ``SET``, ``LISTEN``, no data-modifying ``WITH``),
  and, where the migrations created it, as the ``mlpq_reader`` role (SELECT only).
  ``MLPQ_READ_DATABASE_URL`` can name a login role of that group for the whole session.

Rows stream in batches (``fetchmany`` on a server-side cursor, or SQLite's
cursor), so a 10-million-row query is written out in bounded memory.
"""

from __future__ import annotations

import os
import re
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine
from sqlalchemy.engine import URL, make_url
from sqlalchemy.pool import NullPool

from service.exceptions import MlpqError
from service.settings import get_settings

#: Rows fetched from the server (or SQLite) at a time.
FETCH_ROWS = 2000
#: The role the migrations create with SELECT on the store's tables and views.
READER_ROLE = "mlpq_reader"


class QueryError(MlpqError):
    """A statement refused before it ran, or that failed or timed out: one line, exit 2."""

    exit_code = 2


# -- the statement -------------------------------------------------------------------------

# Strings, comments and PostgreSQL dollar quotes are masked (same length) before the
# statement's words are read, so a ';' or a name inside them does not count; a quoted
# name loses only its quotes, so "set_config"(...) is still seen as a call.
_OPAQUE = re.compile(
    r"(?P<string>'(?:[^']|'')*'|\$(?P<tag>\w*)\$.*?\$(?P=tag)\$)"
    r'|(?P<name>"(?:[^"]|"")*")'
    r"|(?P<comment>--[^\n]*|/\*.*?\*/)",
    re.S,
)
# PostgreSQL also has escape strings, E'...', where a backslash escapes a quote (E'\'' is
# one quote): read as plain strings they would end early and hide what follows them.
_OPAQUE_PG = re.compile(
    r"(?P<string>(?<![\w$])[Ee]'(?:[^'\\]|\\.|'')*'|'(?:[^']|'')*'|\$(?P<tag>\w*)\$.*?\$(?P=tag)\$)"
    r'|(?P<name>"(?:[^"]|"")*")'
    r"|(?P<comment>--[^\n]*|/\*.*?\*/)",
    re.S,
)


def _mask(match: re.Match[str]) -> str:
    text = match.group(0)
    if match.group("string"):
        return "0" * len(text)
    if match.group("name"):
        return " " + text[1:-1] + " "
    return " " * len(text)


_UNCLOSED = re.compile(r"'|\"|/\*|\$\w*\$")
_READS = {
    "sqlite": ("select", "with", "values", "pragma", "explain"),
    "postgresql": ("select", "with", "values", "table"),
}
_CALL = re.compile(r"([A-Za-z_][\w$]*)\s*\(")
_DENIED = {
    "sqlite": re.compile(r"load_extension|readfile|writefile|edit|fts3_tokenizer"),
    "postgresql": re.compile(
        r"set_config|lo_\w+|lo(read|write)|dblink\w*|query_to_xml\w*|\w+_to_xml\w*|ts_stat|"
        r"pg_(read_\w+|ls_\w+|stat_file|terminate_backend|cancel_backend|reload_conf|"
        r"rotate_logfile|switch_wal|promote|notify|(try_)?advisory_\w+|create_\w+|drop_\w+|"
        r"backup_\w+|start_backup|stop_backup|wal_\w+|log_\w+|file_\w+|replication_\w+|"
        r"logical_\w+|copy_\w+|import_system_collations|current_logfile)"
    ),
}


def check_statement(sql: str, dialect: str) -> str:
    """``sql`` without trailing ``;``, if it is one reading statement; else QueryError."""
    text = sql.strip()
    blank = (_OPAQUE_PG if dialect == "postgresql" else _OPAQUE).sub(_mask, text)
    if _UNCLOSED.search(blank):
        raise QueryError("sql: unterminated string, quoted name or comment")
    body = blank.rstrip().rstrip(";").rstrip()
    if not body.strip():
        raise QueryError("sql: empty statement; expected one SELECT")
    if ";" in body:
        raise QueryError("sql: exactly one statement is allowed; found a ';' before the end")
    first = body.lstrip("( \t\r\n").split(None, 1)[0].lower()
    allowed = _READS[dialect]
    if first not in allowed:
        raise QueryError(
            f"sql: only reading statements run here ({', '.join(w.upper() for w in allowed)}); "
            f"got {first.upper()}"
        )
    for match in _CALL.finditer(body):
        name = match.group(1).lower().rsplit(".", 1)[-1]
        if _DENIED[dialect].fullmatch(name):
            raise QueryError(f"sql: function {name}() is not allowed in a read-only query")
    return text[: len(body)]


# -- SQLite --------------------------------------------------------------------------------

#: PRAGMAs that only describe the schema (their argument names a table or an index).
_SQLITE_READ_PRAGMAS = frozenset(
    {
        "table_info",
        "table_xinfo",
        "table_list",
        "index_list",
        "index_info",
        "index_xinfo",
        "foreign_key_list",
        "collation_list",
        "function_list",
        "pragma_list",
        "compile_options",
    }
)
#: PRAGMAs that, without an argument, only report a setting (SQLAlchemy asks for some).
_SQLITE_QUERY_PRAGMAS = frozenset(
    {
        "read_uncommitted",
        "user_version",
        "schema_version",
        "application_id",
        "journal_mode",
        "foreign_keys",
        "encoding",
        "page_size",
        "page_count",
        "freelist_count",
        "query_only",
        "data_version",
        "busy_timeout",
        "synchronous",
    }
)
_SQLITE_READ_ACTIONS = frozenset({sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, 33})  # 33: RECURSIVE


def _sqlite_authorizer(action: int, arg1: str | None, arg2: str | None, *_: object) -> int:
    if action in _SQLITE_READ_ACTIONS:
        return sqlite3.SQLITE_OK
    if action == sqlite3.SQLITE_FUNCTION:
        denied = _DENIED["sqlite"].fullmatch((arg2 or "").lower())
        return sqlite3.SQLITE_DENY if denied else sqlite3.SQLITE_OK
    if action == sqlite3.SQLITE_PRAGMA:
        name = (arg1 or "").lower()
        if name in _SQLITE_READ_PRAGMAS or (arg2 is None and name in _SQLITE_QUERY_PRAGMAS):
            return sqlite3.SQLITE_OK
    if action == sqlite3.SQLITE_UPDATE and arg1 == "sqlite_master":
        # SQLite reports reading the schema for a table-valued pragma this way; the
        # read-only file and query_only stop any real write.
        return sqlite3.SQLITE_OK
    return sqlite3.SQLITE_DENY


def sqlite_read_connection(path: str | Path) -> sqlite3.Connection:
    """A connection to the SQLite store at ``path`` that cannot write anything."""
    from service.store import sqlite_functions
    from service.store.db import SQLITE_BUSY_TIMEOUT_S

    uri = f"{Path(path).resolve().as_uri()}?mode=ro"
    conn = sqlite3.connect(
        uri, uri=True, isolation_level=None, check_same_thread=False, timeout=SQLITE_BUSY_TIMEOUT_S
    )
    conn.execute("PRAGMA query_only=ON")
    sqlite_functions.register(conn)
    if hasattr(conn, "enable_load_extension"):  # absent where Python was built without it
        conn.enable_load_extension(False)
    conn.set_authorizer(_sqlite_authorizer)
    return conn


# -- PostgreSQL ----------------------------------------------------------------------------


def _pg_options(url: URL, timeout: float | None) -> str:
    """libpq ``options`` of ``url`` plus read-only transactions and the statement timeout."""
    options = [str(url.query.get("options", ""))]
    options.append("-c default_transaction_read_only=on")
    if timeout is not None:
        options.append(f"-c statement_timeout={max(1, round(timeout * 1000))}")
    return " ".join(o for o in options if o)


def _pg_conninfo(url: URL) -> str:
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


# -- engines for the results commands ------------------------------------------------------

_ENGINES: dict[tuple[str, int], Engine] = {}
_LOCK = threading.Lock()


def reader_url() -> str:
    """The URL readers use: ``MLPQ_READ_DATABASE_URL``, else the store's."""
    settings = get_settings()
    return str(settings.read_database_url or settings.database_url)


def _sqlite_path(url: URL) -> str:
    path = url.database or ""
    if not Path(path).exists():
        # The embedded store creates and migrates itself on first use, readers included.
        from service.store import get_engine

        get_engine(url.render_as_string(hide_password=False))
    return path


def read_engine(url: str | None = None) -> Engine:
    """A SQLAlchemy engine whose connections can only read (see the module's docstring)."""
    url = url or reader_url()
    key = (url, os.getpid())
    with _LOCK:
        engine = _ENGINES.get(key)
        if engine is None:
            parsed = make_url(url)
            if parsed.get_backend_name() == "sqlite":
                path = _sqlite_path(parsed)
                engine = create_engine(
                    "sqlite://", creator=lambda: sqlite_read_connection(path), poolclass=NullPool
                )
            else:
                timeout = get_settings().sql_timeout_seconds
                engine = create_engine(
                    parsed.difference_update_query(["options"]),
                    connect_args={"options": _pg_options(parsed, timeout)},
                    poolclass=NullPool,
                )
            _ENGINES[key] = engine
    return engine


# -- one query, streamed -------------------------------------------------------------------


@dataclass
class QueryRows:
    """The columns of a query and its rows, fetched in batches as they are read."""

    columns: list[str]
    rows: Iterator[tuple[Any, ...]]


@contextmanager
def read_query(
    sql: str, *, url: str | None = None, timeout: float | None = None
) -> Iterator[QueryRows]:
    """Run one reading statement; its rows stream while the context is open."""
    url = url or reader_url()
    timeout = get_settings().sql_timeout_seconds if timeout is None else timeout
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        with _sqlite_query(sql, _sqlite_path(parsed), timeout) as rows:
            yield rows
    else:
        with _pg_query(sql, parsed, timeout) as rows:
            yield rows


def _batches(cursor: Any, translate: Any) -> Iterator[tuple[Any, ...]]:
    while True:
        try:
            batch = cursor.fetchmany(FETCH_ROWS)
        except Exception as exc:  # a failure or timeout while the rows come
            raise translate(exc) from None
        if not batch:
            return
        yield from batch


@contextmanager
def _sqlite_query(sql: str, path: str, timeout: float) -> Iterator[QueryRows]:
    statement = check_statement(sql, "sqlite")
    conn = sqlite_read_connection(path)
    deadline = time.monotonic() + timeout
    conn.set_progress_handler(lambda: int(time.monotonic() > deadline), 10_000)

    def translate(exc: Exception) -> QueryError:
        if isinstance(exc, sqlite3.OperationalError) and str(exc) == "interrupted":
            return QueryError(f"sql: canceled after {timeout:g} s (--timeout to allow longer)")
        if "not authorized" in str(exc):
            return QueryError("sql: refused: the statement would do more than read")
        return QueryError(f"sql: {_first_line(exc)}")

    try:
        try:
            cursor = conn.execute(statement)
        except (sqlite3.Error, sqlite3.Warning) as exc:
            raise translate(exc) from None
        columns = [d[0] for d in cursor.description or ()]
        yield QueryRows(columns, _batches(cursor, translate))
    finally:
        conn.close()


@contextmanager
def _pg_query(sql: str, url: URL, timeout: float) -> Iterator[QueryRows]:
    import psycopg

    statement = check_statement(sql, "postgresql")
    try:
        conn = psycopg.connect(
            _pg_conninfo(url.difference_update_query(["options"])),
            options=_pg_options(url, timeout),
        )
    except psycopg.Error as exc:
        raise QueryError(f"sql: cannot connect to the store: {_first_line(exc)}") from None

    def translate(exc: Exception) -> QueryError:
        if isinstance(exc, psycopg.errors.QueryCanceled):
            return QueryError(f"sql: canceled after {timeout:g} s (--timeout to allow longer)")
        if isinstance(exc, psycopg.errors.UndefinedTable) and not _pg_migrated(url):
            return QueryError("sql: the store has no tables yet: run `mlpq db upgrade`")
        return QueryError(f"sql: {_first_line(exc)}")

    try:
        try:
            _pg_as_reader(conn)
            cursor = conn.cursor(name="mlpq_sql")
            cursor.execute(statement)
            # The first batch (and with it the query's first failure) before the columns.
            first = cursor.fetchmany(FETCH_ROWS)
        except psycopg.Error as exc:
            raise translate(exc) from None
        columns = [d.name for d in cursor.description or ()]

        def rows() -> Iterator[tuple[Any, ...]]:
            yield from first
            if len(first) == FETCH_ROWS:
                yield from _batches(cursor, translate)

        yield QueryRows(columns, rows())
    finally:
        conn.close()


def _pg_as_reader(conn: Any) -> None:
    """Inside the (read-only) transaction, act as ``mlpq_reader`` when a superuser connects."""
    row = conn.execute(
        "SELECT r.rolsuper, EXISTS (SELECT 1 FROM pg_roles WHERE rolname = %(role)s) "
        "AND has_schema_privilege(%(role)s, current_schema(), 'USAGE') "
        "FROM pg_roles r WHERE r.rolname = current_user",
        {"role": READER_ROLE},
    ).fetchone()
    if row is not None and row[0] and row[1]:
        conn.execute(f"SET LOCAL ROLE {READER_ROLE}")


def _pg_migrated(url: URL) -> bool:
    import psycopg

    try:
        with psycopg.connect(_pg_conninfo(url)) as conn:
            return conn.execute("SELECT to_regclass('alembic_version') IS NOT NULL").fetchone()[0]
    except psycopg.Error:
        return True  # cannot tell: report the original error


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
