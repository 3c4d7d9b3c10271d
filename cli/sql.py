"""``mlpq sql``: plain SQL against the store, printed as a table, CSV or JSON."""

from __future__ import annotations

import csv
import json
import sys
from enum import StrEnum
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from service.exceptions import MlpqError


class OutputFormat(StrEnum):
    table = "table"
    csv = "csv"
    json = "json"


class SqlError(MlpqError):
    exit_code = 2


def sql(
    query: Annotated[str, typer.Argument(help="The SQL statement; '-' reads stdin.")],
    fmt: Annotated[
        OutputFormat, typer.Option("--format", "-f", help="How to print the rows.")
    ] = OutputFormat.table,
) -> None:
    """Run one SQL statement against the store and print its rows.

    Tables: experiments, runs, metrics, artifacts, datasets; views: run_summary,
    experiment_progress, run_groups.

    Example:

        $ mlpq sql "SELECT optimizer, AVG(best_val_accuracy) FROM run_summary GROUP BY 1"
    """
    from sqlalchemy import text
    from sqlalchemy.exc import DBAPIError

    from service.store import get_engine

    if query == "-":
        query = sys.stdin.read()
    engine = get_engine()
    try:
        with engine.begin() as conn:
            result = conn.execute(text(query))
            if not result.returns_rows:
                Console().print(f"{result.rowcount} row(s) affected")
                return
            columns = list(result.keys())
            rows = result.all()
    except DBAPIError as exc:
        first = str(exc.orig).strip().splitlines()[0]
        raise SqlError(f"sql: {first}") from None
    if fmt is OutputFormat.csv:
        writer = csv.writer(sys.stdout)
        writer.writerow(columns)
        writer.writerows(rows)
    elif fmt is OutputFormat.json:
        json.dump([dict(zip(columns, r, strict=True)) for r in rows], sys.stdout, default=str)
        sys.stdout.write("\n")
    else:
        table = Table(*columns)
        for row in rows:
            table.add_row(*("" if v is None else _fmt(v) for v in row))
        Console().print(table)


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, bytes):
        return f"<{len(value)} bytes>"
    return str(value)


def register(app: typer.Typer) -> None:
    """Add ``mlpq sql`` to ``app``."""
    app.command("sql")(sql)
