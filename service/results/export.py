"""``mlpq export``: an experiment's runs or metrics to CSV, Parquet or JSON lines, streamed.

Nothing holds all the rows: they are read in batches through the read-only reader
connection (``read_engine()``: SQLite opened ``mode=ro``, PostgreSQL in a read-only
transaction as ``mlpq_reader``) and written as they come, so ten million metric rows
export in bounded memory. Each path takes the fastest route that stays exact:

* **metrics** (numbers only: ``run_id, step, *METRICS`` ordered by run and step):
  on PostgreSQL, ``COPY (SELECT ...) TO STDOUT``, written as it arrives for CSV and
  for JSON lines (each line built by the server), and for Parquet parsed by pyarrow's
  CSV reader a few thousand rows at a time; on SQLite, cursor batches through
  ``csv.writer``, the JSON encoder or into Arrow record batches.
* **runs** (the experiment's ``run_summary`` rows, one per run): cursor batches
  (a server-side cursor on PostgreSQL), each value converted the same way on both
  stores: timestamps as ISO 8601 in UTC.

Non-finite floats: CSV writes ``NaN``, ``Infinity``, ``-Infinity`` (PostgreSQL's own
spelling, read by Python's ``float``, pandas and pyarrow); JSON lines write ``null`` (so
every line is valid JSON); Parquet keeps the IEEE value. SQLite stores NaN as NULL.

The file is written beside its destination under a temporary name and renamed into
place when complete: a failure never leaves a partial file behind.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import io
import json
import math
import os
import secrets
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from service.exceptions import MlpqError

#: What can be exported, and in which formats.
WHATS: tuple[str, ...] = ("runs", "metrics")
FORMATS: tuple[str, ...] = ("csv", "parquet", "jsonl")
#: Rows fetched at a time through a cursor.
FETCH_ROWS = 5000
#: Rows per Parquet row group (Arrow batches are gathered up to this many before a write).
ROW_GROUP_ROWS = 100_000
#: How to install the optional Parquet dependency.
PARQUET_INSTALL = "pip install 'mlpq[parquet]'"


class ExportError(MlpqError):
    """A bad ``mlpq export`` request (what, format, destination): one line, exit 2."""

    exit_code = 2


@dataclass(frozen=True)
class ExportResult:
    """What an export wrote."""

    experiment: str
    what: str
    format: str
    rows: int
    path: str | None  # None: standard output


# -- columns -------------------------------------------------------------------------------


def metric_columns() -> tuple[str, ...]:
    """Columns of a metrics export: ``run_id, step`` and every metric, in table order."""
    from service.store import METRIC_COLUMNS

    return METRIC_COLUMNS


def run_columns() -> list[tuple[str, str]]:
    """``(name, kind)`` of each ``run_summary`` column; kind: int, float, str or time."""
    from sqlalchemy import DateTime, Double, Float, Integer

    from service.results.runs import SUMMARY_COLUMNS
    from service.store import Experiment, Run

    table = Run.__table__
    sources = {
        "run_id": table.c.id,
        "experiment": Experiment.__table__.c.name,
        "duration_seconds": table.c.wall_seconds,
    }
    columns = []
    for name in SUMMARY_COLUMNS:
        kind = sources.get(name, table.c.get(name))
        sql_type = kind.type if kind is not None else None
        if isinstance(sql_type, Integer):
            columns.append((name, "int"))
        elif isinstance(sql_type, Double | Float):
            columns.append((name, "float"))
        elif isinstance(sql_type, DateTime):
            columns.append((name, "time"))
        else:
            columns.append((name, "str"))
    return columns


def _arrow_schema(columns: list[tuple[str, str]]) -> Any:
    import pyarrow as pa

    types = {
        "int": pa.int64(),
        "id": pa.int32(),
        "float": pa.float64(),
        "str": pa.string(),
        "time": pa.timestamp("us", tz="UTC"),
    }
    return pa.schema([(name, types[kind]) for name, kind in columns])


def _metric_kinds() -> list[tuple[str, str]]:
    from engine.metrics import STEP

    return [(c, "id" if c in ("run_id", STEP) else "float") for c in metric_columns()]


# -- statements ----------------------------------------------------------------------------


def _metrics_sql(experiment_id: int, dialect: str, fmt: str) -> str:
    """The metrics of the experiment's runs, ordered; non-finite floats shaped for ``fmt``."""
    from engine.metrics import METRICS, STEP

    def column(name: str) -> str:
        if fmt == "jsonl" and dialect == "postgresql":
            # One JSON object per row, built by the server (numbers only: no text to
            # escape, and COPY's text format changes none of it). A float's text is the
            # shortest that reads back the same double (extra_float_digits), valid JSON.
            return (
                f"CASE WHEN {name} IS NULL OR {name} IN ('NaN', 'Infinity', '-Infinity') "
                f"THEN 'null' ELSE {name}::text END"
            )
        if fmt == "jsonl":  # SQLite has no NaN (it stores NULL); 9e999 reads as infinity
            return f"CASE {name} WHEN 9e999 THEN NULL WHEN -9e999 THEN NULL ELSE {name} END"
        if fmt == "csv" and dialect == "sqlite":  # PostgreSQL's spelling, as its COPY writes
            return (
                f"CASE {name} WHEN 9e999 THEN 'Infinity' WHEN -9e999 THEN '-Infinity' "
                f"ELSE {name} END"
            )
        return name

    if fmt == "jsonl" and dialect == "postgresql":
        fields = [f"'\"{c}\":' || {c}" for c in ("run_id", STEP)]
        fields += [f"'\"{m}\":' || {column(m)}" for m in METRICS]
        selected = "'{' || " + " || ',' || ".join(fields) + " || '}'"
    else:
        selected = ", ".join(
            ["run_id", STEP, *(f"{column(m)} AS {m}" if column(m) != m else m for m in METRICS)]
        )
    # An int, never user text: COPY takes no bind parameters.
    return (
        f"SELECT {selected} FROM metrics "
        f"WHERE run_id IN (SELECT id FROM runs WHERE experiment_id = {int(experiment_id)}) "
        f"ORDER BY run_id, {STEP}"
    )


def _runs_sql(experiment_id: int) -> str:
    names = ", ".join(name for name, _ in run_columns())
    return (
        f"SELECT {names} FROM run_summary WHERE experiment_id = {int(experiment_id)} "
        "ORDER BY run_id"
    )


# -- reading -------------------------------------------------------------------------------


@dataclass
class _Source:
    """One open reader connection: batches of rows, or (PostgreSQL) a COPY's bytes."""

    dialect: str
    conn: Any  # sqlite3.Connection or psycopg.Connection

    def batches(self, sql: str, size: int = FETCH_ROWS) -> Iterator[list[tuple[Any, ...]]]:
        if self.dialect == "postgresql":
            cursor = self.conn.cursor(name="mlpq_export")  # server-side: DECLARE ... CURSOR
        else:
            cursor = self.conn.cursor()
        try:
            cursor.execute(sql)
            while batch := cursor.fetchmany(size):
                yield batch
        finally:
            # A generator dropped early (stdout closed by `| head`) may be closed after
            # its connection: the cursor went with it.
            with contextlib.suppress(Exception):
                cursor.close()

    @contextmanager
    def copy(self, sql: str, options: str) -> Iterator[Any]:
        """``COPY (sql) TO STDOUT (options)`` on PostgreSQL: its rows, one chunk of bytes each."""
        with self.conn.cursor() as cursor, cursor.copy(f"COPY ({sql}) TO STDOUT ({options})") as cp:
            yield cp


@contextmanager
def _source(engine: Any) -> Iterator[_Source]:
    raw = engine.raw_connection()
    try:
        conn = raw.driver_connection
        dialect = engine.dialect.name
        if dialect == "postgresql":
            from service.results.reader import _pg_as_reader

            # The reader's statement timeout guards typed queries; an export of millions
            # of rows takes longer, and this statement is ours. Floats leave the server
            # exactly (the shortest text that reads back the same double).
            conn.execute("SET LOCAL statement_timeout = 0")
            conn.execute("SET LOCAL extra_float_digits = 3")
            _pg_as_reader(conn)
        yield _Source(dialect, conn)
    finally:
        try:
            raw.rollback()
        finally:
            raw.close()


# -- value conversions (runs) --------------------------------------------------------------

_CSV_NONFINITE = {math.inf: "Infinity", -math.inf: "-Infinity"}


def _csv_float(value: float | None) -> Any:
    if value is None or math.isfinite(value):
        return value
    return "NaN" if math.isnan(value) else _CSV_NONFINITE[value]


def _json_float(value: float | None) -> float | None:
    return value if value is None or math.isfinite(value) else None


def _utc(value: Any) -> dt.datetime | None:
    """A stored timestamp as an aware UTC datetime (SQLite keeps naive UTC text)."""
    if value is None:
        return None
    if isinstance(value, str):
        value = dt.datetime.fromisoformat(value)
    if value.tzinfo is None:
        return value.replace(tzinfo=dt.UTC)
    return value.astimezone(dt.UTC)


def _iso(value: Any) -> str | None:
    stamp = _utc(value)
    return None if stamp is None else stamp.isoformat()


def _converter(kinds: list[str], fmt: str) -> Callable[[tuple[Any, ...]], tuple[Any, ...]]:
    """A function turning one fetched run row into the values ``fmt`` writes."""
    by_kind: dict[str, Callable[[Any], Any]] = {
        "float": {"csv": _csv_float, "jsonl": _json_float}.get(fmt, lambda v: v),
        "time": _utc if fmt == "parquet" else _iso,
    }
    funcs = [by_kind.get(kind) for kind in kinds]
    pairs = [(i, f) for i, f in enumerate(funcs) if f is not None]

    def convert(row: tuple[Any, ...]) -> tuple[Any, ...]:
        values = list(row)
        for i, func in pairs:
            values[i] = func(values[i])
        return tuple(values)

    return convert


# -- writers -------------------------------------------------------------------------------


@contextmanager
def _text(stream: IO[bytes]) -> Iterator[IO[str]]:
    text = io.TextIOWrapper(stream, encoding="utf-8", newline="")
    try:
        yield text
    finally:
        text.flush()
        text.detach()  # the binary stream stays open: it is the caller's


def _write_csv(
    stream: IO[bytes], columns: list[str], batches: Iterator[list[tuple[Any, ...]]]
) -> int:
    rows = 0
    with _text(stream) as text:
        writer = csv.writer(text, lineterminator="\n")
        writer.writerow(columns)
        for batch in batches:
            writer.writerows(batch)
            rows += len(batch)
    return rows


def _write_jsonl(
    stream: IO[bytes], columns: list[str], batches: Iterator[list[tuple[Any, ...]]]
) -> int:
    encode = json.JSONEncoder(allow_nan=False, separators=(",", ":"), default=str).encode
    rows = 0
    with _text(stream) as text:
        for batch in batches:
            text.write("\n".join([encode(dict(zip(columns, row, strict=True))) for row in batch]))
            text.write("\n")
            rows += len(batch)
    return rows


def _write_parquet(path: str, schema: Any, parts: Iterator[Any]) -> int:
    """Arrow record batches or tables into ``path``, in row groups of ROW_GROUP_ROWS rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    # Dictionaries pay for ids and names; measured floats are mostly distinct, and a
    # dictionary per float column costs memory and time before it falls back to plain.
    dictionary = [f.name for f in schema if not pa.types.is_floating(f.type)]
    rows = 0
    with pq.ParquetWriter(path, schema, use_dictionary=dictionary) as writer:
        held: list[Any] = []
        held_rows = 0
        for part in parts:
            held.append(part if isinstance(part, pa.Table) else pa.Table.from_batches([part]))
            held_rows += part.num_rows
            if held_rows >= ROW_GROUP_ROWS:
                writer.write_table(pa.concat_tables(held), held_rows)
                rows += held_rows
                held, held_rows = [], 0
        if held:
            writer.write_table(pa.concat_tables(held), held_rows)
            rows += held_rows
    return rows


def _arrow_batches(schema: Any, batches: Iterator[list[tuple[Any, ...]]]) -> Iterator[Any]:
    import pyarrow as pa

    for batch in batches:
        yield pa.RecordBatch.from_arrays(
            [
                pa.array(values, type=field.type)
                for values, field in zip(zip(*batch, strict=True), schema, strict=True)
            ],
            schema=schema,
        )


def _copy_arrow_tables(copy: Any, schema: Any) -> Iterator[Any]:
    """Tables of FETCH_ROWS rows of a ``COPY ... (FORMAT csv)`` without a header.

    COPY hands over one row at a time; FETCH_ROWS rows are gathered as CSV text, then
    parsed at once by pyarrow (no read-ahead of its own), so memory holds that text and
    the row group being gathered, whatever the total.
    """
    import pyarrow as pa
    import pyarrow.csv as pcsv

    # One thread: the other core is busy with the server's side of the COPY, and a
    # thread pool's buffers cost more memory than they save time here.
    read_options = pcsv.ReadOptions(column_names=schema.names, use_threads=False)
    # COPY writes NULL as an empty field and an empty string as "".
    convert_options = pcsv.ConvertOptions(
        column_types=schema, null_values=[""], quoted_strings_can_be_null=False
    )
    text = bytearray()
    rows = 0
    for chunk in copy:
        text += chunk
        rows += 1
        if rows == FETCH_ROWS:
            yield pcsv.read_csv(pa.py_buffer(text), read_options, convert_options=convert_options)
            text, rows = bytearray(), 0
    if rows:
        yield pcsv.read_csv(pa.py_buffer(text), read_options, convert_options=convert_options)


# -- destination ---------------------------------------------------------------------------


@dataclass
class _Target:
    stream: IO[bytes]
    path: str | None  # the temporary file being written; None for standard output


@contextmanager
def _target(output: str) -> Iterator[_Target]:
    """Standard output for ``-``; else a temporary file beside ``output``, renamed at the end."""
    if output == "-":
        yield _Target(sys.stdout.buffer, None)
        sys.stdout.buffer.flush()
        return
    final = Path(output)
    if final.is_dir():
        raise ExportError(f"-o: {output} is a directory; expected a file name")
    parent = final.parent
    if not parent.is_dir():
        raise ExportError(f"-o: no such directory: {parent}")
    temp = parent / f".{final.name}.{secrets.token_hex(4)}.part"
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as exc:
        raise ExportError(f"-o: cannot write in {parent}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "wb", buffering=1 << 20) as stream:
            yield _Target(stream, str(temp))
        os.replace(temp, final)
    except BaseException as exc:
        temp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise MlpqError(f"-o: cannot write {output}: {exc.strerror or exc}") from None
        raise


# -- the export ----------------------------------------------------------------------------


def check_request(what: str, fmt: str, output: str) -> None:
    """ExportError unless ``what``, ``fmt`` and ``output`` make a possible export."""
    if what not in WHATS:
        raise ExportError(f"--what: expected one of {', '.join(WHATS)}; got {what!r}")
    if fmt not in FORMATS:
        raise ExportError(f"--format: expected one of {', '.join(FORMATS)}; got {fmt!r}")
    if fmt == "parquet":
        if output == "-":
            raise ExportError("-o: Parquet cannot go to standard output; give a file name")
        try:
            import pyarrow.parquet  # noqa: F401
        except ImportError:
            raise ExportError(
                f"--format parquet: needs pyarrow, not installed here: {PARQUET_INSTALL}"
            ) from None


def export_experiment(
    *, experiment: str, what: str, fmt: str, output: str, url: str | None = None
) -> ExportResult:
    """Write ``what`` (runs or metrics) of ``experiment`` as ``fmt`` to ``output`` (``-``: stdout).

    Raises ExportError for a bad request, NotFoundError for an unknown experiment;
    on any failure nothing is left at ``output``.
    """
    from sqlalchemy.orm import Session

    from service.results.reader import read_engine
    from service.store import get_experiment

    check_request(what, fmt, output)
    engine = read_engine(url)
    with Session(engine) as session:
        exp = get_experiment(session=session, name=experiment)
        exp_id, exp_name = exp.id, exp.name
    with _source(engine) as source, _target(output) as target:
        if what == "metrics":
            rows = _export_metrics(source, target, exp_id, fmt)
        else:
            rows = _export_runs(source, target, exp_id, fmt)
    return ExportResult(exp_name, what, fmt, rows, None if output == "-" else output)


def _export_metrics(source: _Source, target: _Target, experiment_id: int, fmt: str) -> int:
    columns = list(metric_columns())
    sql = _metrics_sql(experiment_id, source.dialect, fmt)
    if source.dialect == "postgresql" and fmt in ("csv", "jsonl"):
        header = fmt == "csv"
        rows = 0
        with source.copy(sql, "FORMAT csv, HEADER" if header else "FORMAT text") as copy:
            for chunk in copy:
                target.stream.write(chunk)
                rows += 1
        return max(rows - header, 0)  # COPY sends one row per chunk, the header first
    if fmt == "csv":
        return _write_csv(target.stream, columns, source.batches(sql))
    if fmt == "jsonl":
        return _write_jsonl(target.stream, columns, source.batches(sql))
    assert target.path is not None
    schema = _arrow_schema(_metric_kinds())
    if source.dialect == "postgresql":
        with source.copy(sql, "FORMAT csv") as copy:
            return _write_parquet(target.path, schema, _copy_arrow_tables(copy, schema))
    return _write_parquet(target.path, schema, _arrow_batches(schema, source.batches(sql)))


def _export_runs(source: _Source, target: _Target, experiment_id: int, fmt: str) -> int:
    kinds = run_columns()
    columns = [name for name, _ in kinds]
    convert = _converter([kind for _, kind in kinds], fmt)
    batches = (
        [convert(row) for row in batch] for batch in source.batches(_runs_sql(experiment_id))
    )
    if fmt == "csv":
        return _write_csv(target.stream, columns, batches)
    if fmt == "jsonl":
        return _write_jsonl(target.stream, columns, batches)
    assert target.path is not None
    schema = _arrow_schema(kinds)
    return _write_parquet(target.path, schema, _arrow_batches(schema, batches))
