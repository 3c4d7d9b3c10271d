"""The ``mlpq`` command: assembles the sub-commands and turns domain errors into one line."""

from __future__ import annotations

import contextlib
import os
import sys

import typer

from cli import db, experiments, export, model, plots, results, runs, sql, submit
from service.exceptions import MlpqError

app = typer.Typer(
    name="mlpq",
    help="Submit grids of MLP training runs, train them on Celery workers, query results in SQL. "
    "Example: $ mlpq run examples/quickstart.yaml",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(db.app, name="db")
for module in (submit, runs, experiments, results, model, plots, sql, export):
    module.register(app)


def entry() -> None:
    """Console-script entry point: ``main``, then an exit that skips the interpreter's teardown.

    Tearing down the modules a command imported (SQLAlchemy, Celery, NumPy, ...) takes
    about 0.2 s, a tenth of a short `mlpq run`. Everything the command wrote is committed
    or flushed by then; the output streams are flushed here.
    """
    from cli.launch import discard

    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if exc.code is not None and not isinstance(exc.code, int):
            print(exc.code, file=sys.stderr)
    finally:
        discard()  # workers cli.launch started for a command that did not take them
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
    os._exit(code)


def main() -> None:
    """The ``mlpq`` command (raises SystemExit with its exit code)."""
    from kombu.exceptions import OperationalError as BrokerOperationalError
    from sqlalchemy.exc import OperationalError as DatabaseOperationalError
    from sqlalchemy.exc import ProgrammingError

    try:
        app()
    except MlpqError as exc:
        _fail(str(exc), exc.exit_code)
    except ProgrammingError as exc:
        if _unmigrated(exc):
            _fail("database: the store has no tables yet: run `mlpq db upgrade` once", 2)
        raise
    except DatabaseOperationalError as exc:
        _fail(f"database: cannot use the store: {_first_line(exc.orig)}", 1)
    except BrokerOperationalError as exc:
        _fail(f"broker: cannot reach the message broker: {_first_line(exc)}", 1)


def _unmigrated(exc: BaseException) -> bool:
    """Whether ``exc`` says a table is missing from a store never migrated (PostgreSQL)."""
    from sqlalchemy import text

    if type(getattr(exc, "orig", None)).__name__ != "UndefinedTable":
        return False
    from service.store import get_engine

    try:
        with get_engine().connect() as conn:
            return conn.execute(text("SELECT to_regclass('alembic_version')")).scalar() is None
    except Exception:
        return False


def _first_line(exc: object) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _fail(message: str, code: int) -> None:
    print(f"mlpq: {message}", file=sys.stderr)
    sys.exit(code)
