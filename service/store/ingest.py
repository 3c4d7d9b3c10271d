"""Write path of the store: metric rows in bulk, artifacts, datasets.

Metrics
-------
``write_metrics(target, run_id, records)`` writes one run's records (dicts keyed
by ``engine.metrics.RECORD_FIELDS``; a missing key is NULL);
``write_metric_rows(target, rows)`` writes rows of many runs, each a tuple in
``METRIC_COLUMNS`` order (``run_id, step, *METRICS``) — the fastest form.

Both are idempotent on ``(run_id, step)``: a step sent again never makes a second
row and the FIRST value stays. A resumed run recomputes bitwise-identical values
from its checkpoint (same parameters, optimizer and RNG state), so there is
nothing to update; first-wins also never rewrites a row a reader already saw
and never makes a redelivered worker wait on row locks for an UPDATE.

How rows travel: on PostgreSQL a binary ``COPY`` straight into ``metrics`` inside
a savepoint (the common case: no step was written before); if a step already
exists the savepoint is rolled back and the batch goes through a temporary
staging table (``COPY`` into it, then ``INSERT ... SELECT ... ON CONFLICT DO
NOTHING``). On SQLite one ``executemany`` of ``INSERT ... ON CONFLICT DO
NOTHING``. ``bench/ingest.py`` measures both against the raw driver calls.

``pg_metric_arrays`` makes one run's records into binary arrays, one per column, for
a statement that unnests them (a worker's final write on PostgreSQL, which needs its
metric rows inside one statement with the rest of the result).

``target`` is an Engine (the rows are committed on return), or a Connection or
Session (the rows join the caller's transaction, which the caller commits — a
worker writes its last metrics, final weights and final status in one
transaction).

Artifacts and datasets
----------------------
Artifacts are npz bytes (never pickle: shapes are read with
``allow_pickle=False``), one ``weights`` and one (latest) ``checkpoint`` row per
run, replaced on each save. Datasets are stored once by the sha256 of their bytes.
"""

from __future__ import annotations

import hashlib
import io
import sqlite3
import zipfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlalchemy import Connection, Engine, select
from sqlalchemy.orm import Session

from engine.metrics import RECORD_FIELDS, STEP
from service.exceptions import NotFoundError, StoreError
from service.store.models import Artifact, ArtifactKind, Dataset, utcnow

#: Column order of a row given to ``write_metric_rows``.
METRIC_COLUMNS: tuple[str, ...] = ("run_id", *RECORD_FIELDS)

Target = Engine | Connection | Session

_FIELD_SET = frozenset(RECORD_FIELDS)
_COLUMN_LIST = ", ".join(METRIC_COLUMNS)
_SQLITE_INSERT = (
    f"INSERT INTO metrics ({_COLUMN_LIST}) VALUES ({', '.join('?' * len(METRIC_COLUMNS))}) "
    "ON CONFLICT (run_id, step) DO NOTHING"
)

# NumPy scalars reach the store from the engine; sqlite3 knows only Python numbers.
for _type in (np.float16, np.float32):
    sqlite3.register_adapter(_type, float)
for _type in (np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32):
    sqlite3.register_adapter(_type, int)


@contextmanager
def connection_scope(target: Target) -> Iterator[Connection]:
    """A Connection for ``target``: an Engine's in a new transaction committed on exit, a
    Session's current one, or the Connection itself (the caller's transaction)."""
    if isinstance(target, Engine):
        with target.begin() as conn:
            yield conn
    elif isinstance(target, Session):
        yield target.connection()
    else:
        yield target


def records_to_rows(run_id: int, records: Iterable[Mapping[str, Any]]) -> list[tuple]:
    """``records`` of one run as rows in ``METRIC_COLUMNS`` order (missing keys -> None)."""
    records = records if isinstance(records, list) else list(records)
    rows = [(run_id, *map(record.get, RECORD_FIELDS)) for record in records]
    if not all(map(_FIELD_SET.issuperset, records)):
        unknown = sorted({key for record in records for key in record} - _FIELD_SET)
        raise ValueError(
            f"metrics: unknown field(s) {unknown} in records of run {run_id}; "
            f"expected names from engine.metrics.RECORD_FIELDS"
        )
    if any(row[1] is None for row in rows):
        raise ValueError(f"metrics: a record of run {run_id} has no '{STEP}'")
    return rows


def write_metrics(target: Target, run_id: int, records: Iterable[Mapping[str, Any]]) -> None:
    """Write one run's metric ``records`` in one batch; steps already stored are kept as they are.

    Each record is a dict keyed by ``RECORD_FIELDS`` (``step`` required, a missing
    metric is NULL).
    """
    write_metric_rows(target, records_to_rows(run_id, records))


def write_metric_rows(target: Target, rows: Sequence[Sequence[Any]]) -> None:
    """Write metric ``rows`` of any runs in one batch; steps already stored are kept as they are.

    Each row is a tuple in ``METRIC_COLUMNS`` order: ``(run_id, step, *METRICS)``.
    """
    if not rows:
        return
    width = len(METRIC_COLUMNS)
    if set(map(len, rows)) != {width}:
        bad = next(row for row in rows if len(row) != width)
        raise ValueError(f"metrics: a row has {len(bad)} values, expected {width} ({_COLUMN_LIST})")
    if isinstance(target, Engine):
        with target.begin() as conn:
            _write(conn, rows, own_transaction=True)
    else:
        _write(target.connection() if isinstance(target, Session) else target, rows)


def _write(conn: Connection, rows: Sequence[Sequence[Any]], own_transaction: bool = False) -> None:
    if conn.dialect.name == "postgresql":
        from service.store.pg_ingest import write_postgresql

        write_postgresql(conn, rows)
    elif own_transaction:
        _write_sqlite(conn, rows)
    else:
        # A savepoint keeps the batch all-or-nothing inside the caller's transaction.
        with conn.begin_nested():
            _write_sqlite(conn, rows)


def _write_sqlite(conn: Connection, rows: Sequence[Sequence[Any]]) -> None:
    cursor = conn.connection.driver_connection.cursor()
    try:
        cursor.executemany(_SQLITE_INSERT, rows)
    except sqlite3.IntegrityError as exc:
        if "FOREIGN KEY" not in str(exc):
            raise
        raise StoreError(f"metrics: no run with id in {_run_ids(rows)}") from None
    finally:
        cursor.close()


def _run_ids(rows: Sequence[Sequence[Any]]) -> list[int]:
    return sorted({row[0] for row in rows})


# --------------------------------------------------------------------------- artifacts


@dataclass(frozen=True, slots=True)
class StoredArtifact:
    """One artifact row: npz ``data`` with its ``shapes`` ({array name: shape})."""

    run_id: int
    kind: ArtifactKind
    format: str
    shapes: dict[str, list[int]]
    step: int | None
    data: bytes
    size: int


def npz_shapes(data: bytes) -> dict[str, list[int]]:
    """Array shapes inside npz ``data``; raises ValueError if it is not a pickle-free npz."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as archive:
            return {name: list(archive[name].shape) for name in archive.files}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ValueError(
            f"artifact: expected npz bytes without pickled objects ({first})"
        ) from None


def save_artifact(
    target: Target,
    run_id: int,
    kind: ArtifactKind | str,
    data: bytes,
    shapes: Mapping[str, Sequence[int]] | None = None,
    step: int | None = None,
) -> None:
    """Store npz ``data`` as the run's ``kind`` artifact, replacing the previous one.

    ``shapes`` defaults to the shapes read from ``data`` (which also checks that
    it is a pickle-free npz).
    """
    kind = ArtifactKind(kind)
    checked = npz_shapes(data) if shapes is None else {k: list(v) for k, v in shapes.items()}
    values = {
        "run_id": run_id,
        "kind": kind,
        "format": "npz",
        "shapes": checked,
        "step": step,
        "data": data,
        "size": len(data),
        "created_at": utcnow(),
    }
    with connection_scope(target) as conn:
        stmt = _upsert_insert(conn)(Artifact).values(**values)
        stmt = stmt.on_conflict_do_update(
            index_elements=["run_id", "kind"],
            set_={k: stmt.excluded[k] for k in values if k not in ("run_id", "kind")},
        )
        conn.execute(stmt)


def _upsert_insert(conn: Connection) -> Any:
    """The dialect's ``insert`` (with ON CONFLICT) for ``conn``, imported only when used."""
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    return insert


def load_artifact(target: Target, run_id: int, kind: ArtifactKind | str) -> StoredArtifact | None:
    """The run's ``kind`` artifact, or None if it has none."""
    kind = ArtifactKind(kind)
    with connection_scope(target) as conn:
        row = conn.execute(
            select(
                Artifact.format, Artifact.shapes, Artifact.step, Artifact.data, Artifact.size
            ).where(Artifact.run_id == run_id, Artifact.kind == kind)
        ).one_or_none()
    if row is None:
        return None
    return StoredArtifact(run_id, kind, row.format, row.shapes, row.step, bytes(row.data), row.size)


# --------------------------------------------------------------------------- datasets


def store_dataset(target: Target, name: str, data: bytes, format: str = "csv") -> str:
    """Store dataset bytes once by content and return their sha256 (stored again: a no-op)."""
    digest = hashlib.sha256(data).hexdigest()
    values = {
        "sha256": digest,
        "name": name,
        "format": format,
        "size": len(data),
        "data": data,
        "created_at": utcnow(),
    }
    with connection_scope(target) as conn:
        stmt = _upsert_insert(conn)(Dataset).values(**values).on_conflict_do_nothing()
        conn.execute(stmt)
    return digest


def load_dataset_bytes(target: Target, sha256: str) -> bytes:
    """The bytes of the dataset stored under ``sha256``; NotFoundError if there is none."""
    with connection_scope(target) as conn:
        data = conn.execute(select(Dataset.data).where(Dataset.sha256 == sha256)).scalar()
    if data is None:
        raise NotFoundError(f"dataset: no dataset with sha256 {sha256} in the store")
    return bytes(data)
