"""The ``mlpq`` command: assembles the sub-commands and turns domain errors into one line."""

from __future__ import annotations

import sys

import typer

from cli import db, experiments, results, runs, sql, submit
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
for module in (submit, runs, experiments, results, sql):
    module.register(app)


def main() -> None:
    """Console-script entry point."""
    from kombu.exceptions import OperationalError as BrokerOperationalError
    from sqlalchemy.exc import OperationalError as DatabaseOperationalError

    try:
        app()
    except MlpqError as exc:
        _fail(str(exc), exc.exit_code)
    except DatabaseOperationalError as exc:
        _fail(f"database: cannot use the store: {_first_line(exc.orig)}", 1)
    except BrokerOperationalError as exc:
        _fail(f"broker: cannot reach the message broker: {_first_line(exc)}", 1)


def _first_line(exc: object) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _fail(message: str, code: int) -> None:
    print(f"mlpq: {message}", file=sys.stderr)
    sys.exit(code)
