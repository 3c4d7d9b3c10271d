"""The ``mlpq`` command: assembles the sub-commands and turns domain errors into one line."""

from __future__ import annotations

import sys

import typer

from cli import db, experiments, runs, sql, submit
from service.exceptions import MlpqError

app = typer.Typer(
    name="mlpq",
    help="Submit grids of MLP training runs, train them on Celery workers, query the results in SQL.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(db.app, name="db")
for module in (submit, runs, experiments, sql):
    module.register(app)


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except MlpqError as exc:
        print(f"mlpq: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
