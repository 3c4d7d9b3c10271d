"""The PostgreSQL side of ingest: metric rows by binary COPY, runs' metrics as binary arrays.

Kept apart from ``ingest`` so that a SQLite store (the embedded default: `mlpq run`,
its workers) never imports psycopg, a tenth of a second of every start.
"""

from __future__ import annotations

import operator
import struct
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import psycopg
import psycopg.errors
from psycopg import pq
from psycopg.abc import AdaptContext
from psycopg.adapt import Dumper
from sqlalchemy import Connection

from engine.metrics import METRICS, RECORD_FIELDS
from service.exceptions import StoreError
from service.store.ingest import _COLUMN_LIST, _run_ids, records_to_rows

_PG_TYPES = ["int4", "int4"] + ["float8"] * len(METRICS)
_PG_COPY = f"COPY metrics ({_COLUMN_LIST}) FROM STDIN (FORMAT BINARY)"
_PG_STAGE = "mlpq_metrics_stage"
_PG_STAGE_COPY = f"COPY {_PG_STAGE} ({_COLUMN_LIST}) FROM STDIN (FORMAT BINARY)"


class PgArray(bytes):
    """A one-dimensional array in PostgreSQL's binary format, bound as a parameter as it is.

    Bound with a ``%(name)b::int4[]`` (or ``float8[]``) placeholder on a psycopg connection
    that ``register_pg_arrays`` was called on.
    """

    __slots__ = ()
    OID: int  # of the array type
    ELEMENT_OID: int
    ELEMENTS: np.dtype  # (size, value) pairs, big-endian


class PgInt4Array(PgArray):
    __slots__ = ()
    OID = 1007
    ELEMENT_OID = 23
    ELEMENTS = np.dtype([("size", ">i4"), ("value", ">i4")])


class PgFloat8Array(PgArray):
    __slots__ = ()
    OID = 1022
    ELEMENT_OID = 701
    ELEMENTS = np.dtype([("size", ">i4"), ("value", ">f8")])


class _PgArrayDumper(Dumper):
    format = pq.Format.BINARY

    def __init__(self, cls: type[PgArray], context: AdaptContext | None = None) -> None:
        super().__init__(cls, context)
        # Set on the instance: a class-level oid would also make this dumper the
        # connection's choice for every int4[] / float8[] looked up by oid (COPY).
        self.oid = cls.OID

    def dump(self, obj: PgArray) -> bytes:
        return obj


def register_pg_arrays(driver: psycopg.Connection) -> None:
    """Let ``driver`` bind ``PgArray`` values (about a microsecond: call it before each use)."""
    for cls in (PgInt4Array, PgFloat8Array):
        driver.adapters.register_dumper(cls, _PgArrayDumper)


# Header of a one-dimensional array: ndim, has-NULLs flag, element type, length, lower bound.
_ARRAY_HEADER = struct.Struct(">iiiii")
_NULL_ELEMENT = struct.pack(">i", -1)


def pg_metric_arrays(run_id: int, records: Iterable[Mapping[str, Any]]) -> list[PgArray | None]:
    """One run's ``records`` as one binary array per column of ``RECORD_FIELDS``.

    ``step`` is an ``int4[]``, every metric a ``float8[]``; a metric that is None in
    every record is None (a NULL array: ``unnest`` pads it with NULLs). Values travel
    as their bits (NaN stays NaN): cheaper to make than array literals, and than
    ``float8`` text is for the server to read.
    """
    rows = _record_values(run_id, records)
    if not rows:
        return [None] * len(RECORD_FIELDS)
    steps, *metrics = zip(*rows, strict=True)
    n = len(steps)
    # The columns without NULLs (most of them) in one conversion.
    full = [column for column in metrics if None not in column]
    elements = np.empty((len(full), n), PgFloat8Array.ELEMENTS)
    elements["size"] = 8
    if full:  # NumPy cannot broadcast an empty list into shape (0, n)
        elements["value"] = full
    packed = iter(elements)
    header = _ARRAY_HEADER.pack(1, 0, PgFloat8Array.ELEMENT_OID, n, 1)
    return [
        # operator.index: a float step fails, as it did in an array literal, instead of
        # being truncated by NumPy.
        _pg_array(PgInt4Array, list(map(operator.index, steps))),
        *(
            _pg_array(PgFloat8Array, column)
            if None in column
            else PgFloat8Array(header + next(packed).tobytes())
            for column in metrics
        ),
    ]


_RECORD_VALUES = operator.itemgetter(*RECORD_FIELDS)


def _record_values(run_id: int, records: Iterable[Mapping[str, Any]]) -> list[tuple]:
    # Records with every field and nothing else (the engine's) need no per-field lookups.
    records = records if isinstance(records, list) else list(records)
    try:
        rows = [_RECORD_VALUES(record) for record in records]
    except KeyError:
        rows = None
    exact = rows is not None and all(len(record) == len(RECORD_FIELDS) for record in records)
    if exact and all(row[0] is not None for row in rows):
        return rows
    return [row[1:] for row in records_to_rows(run_id, records)]


def _pg_array(cls: type[PgArray], values: Sequence[Any]) -> PgArray | None:
    n = len(values)
    size = cls.ELEMENTS["value"].itemsize
    if None in values:
        if values.count(None) == n:
            return None
        element = struct.Struct(">i" + cls.ELEMENTS["value"].char)
        body = b"".join(_NULL_ELEMENT if v is None else element.pack(size, v) for v in values)
        return cls(_ARRAY_HEADER.pack(1, 1, cls.ELEMENT_OID, n, 1) + body)
    elements = np.empty(n, cls.ELEMENTS)
    elements["size"] = size
    elements["value"] = values
    return cls(_ARRAY_HEADER.pack(1, 0, cls.ELEMENT_OID, n, 1) + elements.tobytes())


def _copy(conn: Connection, statement: str, rows: Iterable[Sequence[Any]]) -> None:
    with conn.connection.driver_connection.cursor() as cur, cur.copy(statement) as copy:
        copy.set_types(_PG_TYPES)
        for row in rows:
            copy.write_row(row)


def write_postgresql(conn: Connection, rows: Sequence[Sequence[Any]]) -> None:
    try:
        with conn.begin_nested():
            _copy(conn, _PG_COPY, rows)
        return
    except psycopg.errors.UniqueViolation:
        pass  # some steps exist (a resumed or redelivered run): merge through staging below
    except psycopg.errors.ForeignKeyViolation:
        raise StoreError(f"metrics: no run with id in {_run_ids(rows)}") from None
    # First value wins inside the batch too; the INSERT below would keep an arbitrary one.
    first: dict[tuple[Any, Any], Sequence[Any]] = {}
    for row in rows:
        first.setdefault((row[0], row[1]), row)
    driver = conn.connection.driver_connection
    with driver.cursor() as cur:
        cur.execute(
            f"CREATE TEMP TABLE IF NOT EXISTS {_PG_STAGE} "
            "(LIKE metrics INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
        )
        cur.execute(f"TRUNCATE {_PG_STAGE}")
    _copy(conn, _PG_STAGE_COPY, first.values())
    try:
        with conn.begin_nested(), driver.cursor() as cur:
            cur.execute(
                f"INSERT INTO metrics ({_COLUMN_LIST}) SELECT {_COLUMN_LIST} FROM {_PG_STAGE} "
                "ON CONFLICT (run_id, step) DO NOTHING"
            )
    except psycopg.errors.ForeignKeyViolation:
        raise StoreError(f"metrics: no run with id in {_run_ids(rows)}") from None
