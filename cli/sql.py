"""``mlpq sql``: one read-only SQL statement against the store, rows streamed out."""

from __future__ import annotations

import base64
import csv
import datetime as dt
import decimal
import json
import sys
from collections.abc import Iterable, Iterator
from enum import StrEnum
from typing import Annotated, Any

import typer

#: Rows the table format shows (the other formats write every row).
TABLE_ROWS = 1000


class OutputFormat(StrEnum):
    table = "table"
    csv = "csv"
    json = "json"
    jsonl = "jsonl"


def sql(
    query: Annotated[str, typer.Argument(help="One SELECT (or WITH, VALUES); '-' reads stdin.")],
    fmt: Annotated[
        OutputFormat,
        typer.Option("--format", "-f", help="table (first 1,000 rows), csv, json or jsonl."),
    ] = OutputFormat.table,
    timeout: Annotated[
        float | None,
        typer.Option(
            min=0.001, help="Seconds the statement may run (default MLPQ_SQL_TIMEOUT_SECONDS, 30)."
        ),
    ] = None,
) -> None:
    """Run one read-only SQL statement against the store and print its rows.

    Tables: experiments, runs, metrics, artifacts, datasets; views: run_summary,
    experiment_progress, run_groups. Nothing typed here can change the store: writes, DDL,
    ATTACH, PRAGMAs that write, COPY, SET and stacked statements are refused.
    stddev() and variance() work on SQLite as on PostgreSQL.

    Example:

        $ mlpq sql "SELECT optimizer, avg(best_val_accuracy), stddev(best_val_accuracy)
                    FROM run_summary GROUP BY optimizer" --format csv > by_optimizer.csv
    """
    from cli.interrupts import interrupts
    from service.results.reader import read_query

    if query == "-":
        query = sys.stdin.read()
    # Ctrl-C during the statement is an interrupt, not "canceled after 30 s" (see interrupts).
    with interrupts(), read_query(query, timeout=timeout) as result:
        if fmt is OutputFormat.table:
            _table(result.columns, result.rows)
        elif fmt is OutputFormat.csv:
            writer = csv.writer(sys.stdout)
            writer.writerow(result.columns)
            writer.writerows(_plain(row) for row in result.rows)
        elif fmt is OutputFormat.jsonl:
            for row in result.rows:
                sys.stdout.write(_json_row(result.columns, row) + "\n")
        else:
            sys.stdout.write("[")
            for i, row in enumerate(result.rows):
                sys.stdout.write(("," if i else "") + "\n" + _json_row(result.columns, row))
            sys.stdout.write("\n]\n")


def _table(columns: list[str], rows: Iterator[tuple[Any, ...]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(*columns)
    more = False
    for shown, row in enumerate(rows):
        if shown == TABLE_ROWS:
            more = True
            break
        table.add_row(*("" if v is None else _cell(v) for v in row))
    console = Console()
    console.print(table)
    if more:
        Console(stderr=True).print(
            f"first {TABLE_ROWS} rows shown; --format csv or jsonl writes them all",
            highlight=False,
        )


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, bytes | memoryview):
        return f"<{len(bytes(value))} bytes>"
    return str(value)


def _plain(row: Iterable[Any]) -> list[Any]:
    return [_scalar(v) for v in row]


def _scalar(value: Any) -> Any:
    if isinstance(value, bytes | memoryview):
        return base64.b64encode(bytes(value)).decode()
    if isinstance(value, dt.datetime | dt.date):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return float(value)
    return value


def _json_row(columns: list[str], row: tuple[Any, ...]) -> str:
    return json.dumps(dict(zip(columns, _plain(row), strict=True)), default=str)


def register(app: typer.Typer) -> None:
    """Add ``mlpq sql`` to ``app``."""
    app.command("sql")(sql)
