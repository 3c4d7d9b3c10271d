"""Submit an expanded grid: runs in SQL in one transaction, then the broker's window.

Re-submitting (same experiment name or not) is safe. Per config hash:

- queued or running anywhere in the store: not duplicated (``already_queued``);
- succeeded or diverged anywhere: skipped (``skipped_done``) — a run is
  deterministic given its config and seed, so running it again gives the same
  result — unless ``force``, which adds a new run and keeps the old one;
- failed or cancelled in this experiment: the run is reset and queued again in
  place (``requeued``), its old metrics and artifacts deleted;
- otherwise a new run (``new``).

Every run is stored with ``published = false`` and its estimated cost; after the
commit, ``service.queue.window.feed`` publishes the oldest unsent runs, packed,
up to the window of messages the broker holds, and the workers publish the rest
as runs finish. Publishing goes in batches on one connection and one producer
(kombu's ``Producer.batch()`` pipelines the LPUSHes on Redis); each batch's runs
are marked ``published`` once the broker has them. If the broker fails midway,
the rest stay queued with ``published = false`` and go out with the next feed.
"""

from __future__ import annotations

import json
import struct
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from celery import Celery
from kombu.utils.url import maybe_sanitize_url
from sqlalchemy import Connection, Engine, func, insert, select, text, update

from service.exceptions import BrokerError
from service.grids.canonical import fast_canonical_json
from service.queue.names import QUEUE, TRAIN_TASK
from service.queue.packing import estimated_costs, pack
from service.store import Experiment, Run, RunStatus, reset_runs, utcnow

if TYPE_CHECKING:
    from service.grids import Grid

try:
    import fcntl
except ImportError:  # Windows has no fcntl; SQLite submits there are not serialized
    fcntl = None  # type: ignore[assignment]

Progress = Callable[[str, int, int], None]

#: Messages handed to the broker per batch (one Redis pipeline, one UPDATE ... published).
PUBLISH_BATCH = 2000
#: Rows per INSERT chunk (progress granularity; all chunks share one transaction).
INSERT_CHUNK = 5000
#: Config hashes looked up per query (one array parameter).
LOOKUP_CHUNK = 20000
#: Run ids per IN (...) list (SQLite allows 32766 parameters per statement).
ID_CHUNK = 5000
#: New runs from which a submit refreshes PostgreSQL's statistics of ``runs`` (_analyze).
ANALYZE_AFTER = 10_000

_RUNS = Run.__table__
_IN_FLIGHT = frozenset({RunStatus.queued, RunStatus.running})
_DONE = frozenset({RunStatus.succeeded, RunStatus.diverged})
_REQUEUE = frozenset({RunStatus.failed, RunStatus.cancelled})
# Optimizer-specific columns of ``runs``; NULL for the other optimizer's runs.
_PARAM_COLUMNS = (
    "learning_rate",
    "batch_size",
    "momentum",
    "step_size",
    "temperature",
    "candidates",
)


@dataclass
class SubmitReport:
    """What a submit did, for the summary line and for tests."""

    experiment_id: int
    experiment: str
    created: bool  # the experiment is new
    total: int  # runs in the grid
    new: int = 0
    requeued: int = 0  # failed/cancelled runs of this experiment queued again
    forced: int = 0  # new runs of configs already done (--force)
    skipped_done: int = 0  # succeeded or diverged somewhere in the store
    already_queued: int = 0  # queued or running somewhere in the store
    published: int = 0  # runs handed to the broker by this submit (the window)
    unsent: int = 0  # the experiment's queued runs waiting in the store for the window
    publish_error: str | None = None
    run_ids: list[int] = field(default_factory=list)  # runs queued by this submit


class PublishError(BrokerError):
    """The broker failed while publishing; ``sent`` messages got through."""

    def __init__(self, message: str, sent: int) -> None:
        super().__init__(message)
        self.sent = sent


# -- publishing -------------------------------------------------------------------------------


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _broker_errors(app: Celery, conn: Any) -> tuple[type[BaseException], ...]:
    from kombu.exceptions import KombuError

    return (
        KombuError,
        OSError,
        *getattr(conn, "connection_errors", ()),
        *getattr(conn, "channel_errors", ()),
    )


def _broker_url(app: Celery) -> str:
    return maybe_sanitize_url(app.conf.broker_url or "")


def check_broker(app: Celery) -> None:
    """Connect to the broker once; BrokerError (one line) if it cannot be reached."""
    with app.connection_for_write() as conn:
        try:
            conn.ensure_connection(max_retries=1, interval_start=0, timeout=5)
        except Exception as exc:
            url = _broker_url(app)
            raise BrokerError(f"broker {url}: cannot connect: {_first_line(exc)}") from None


def publish_runs(
    app: Celery,
    run_ids: Sequence[int],
    *,
    engine: Engine | None = None,
    progress: Progress | None = None,
    batch_size: int | None = None,
    costs: Mapping[int, float] | None = None,
) -> int:
    """Publish ``TRAIN_TASK`` messages for the runs now, packed, and mark them published.

    Bypasses the window (``service.queue.window.feed`` is the way runs reach the
    broker); for benchmarks and tests that need a given set of messages. Short
    runs share a message (``service.queue.packing``; the app's
    ``mlpq_pack_seconds``, 0 = one run per message). ``costs`` (run id ->
    estimated seconds) spares reading the configs of runs the caller knows.
    """
    from service.store import get_engine

    ids = [int(i) for i in run_ids]
    if not ids:
        return 0
    engine = engine or get_engine()
    target = float(app.conf.get("mlpq_pack_seconds") or 0)
    packs = pack(estimated_costs(engine, ids, costs), target) if target > 0 else [[i] for i in ids]
    return publish_packs(app, packs, engine=engine, progress=progress, batch_size=batch_size)


def publish_packs(
    app: Celery,
    packs: Sequence[Sequence[int]],
    *,
    engine: Engine,
    conn: Connection | None = None,
    progress: Progress | None = None,
    batch_size: int | None = None,
) -> int:
    """Publish one ``TRAIN_TASK`` message per pack and mark its runs published.

    A message's args are ``[run_id]`` for one run, ``[[run_id, ...]]`` for a pack.
    One connection, one producer; messages go in batches (one Redis pipeline each)
    and each batch's runs are marked ``published`` (with ``published_at``) once the
    broker has it. Returns the number of runs sent; raises ``PublishError`` (with
    ``.sent``) if the broker fails, the runs not sent staying ``published = false``.
    A message is never dropped, but a batch the broker took without confirming is
    sent again by a later publish: delivery is at least once, and the worker's
    claim makes a second message a no-op.

    ``conn``: mark on this connection, in its transaction (the caller commits), rather
    than in transactions of their own beside the publishing.
    """
    packs = [list(p) for p in packs if p]
    total = sum(len(p) for p in packs)
    if not total:
        return 0
    batch_size = batch_size or PUBLISH_BATCH
    amqp = app.amqp
    create = amqp.create_task_message
    send = amqp.send_task_message
    sent = 0
    if progress is not None:
        progress("publish", 0, total)
    # The UPDATE marking a batch published runs in this thread while the next batch
    # is published (on PostgreSQL it costs about as much as the publishing).
    marker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlpq-mark")
    marks: list[Future[None]] = []
    try:
        with app.connection_for_write() as broker:
            errors = _broker_errors(app, broker)
            try:
                producer = amqp.Producer(broker, auto_declare=False)
                # Declared once here: per message, kombu would re-bind a copy of the
                # queue (about half of the publishing time).
                producer.maybe_declare(amqp.queues[QUEUE])
                for start in range(0, len(packs), batch_size):
                    chunk = packs[start : start + batch_size]
                    with producer.batch(max_size=len(chunk) + 1):
                        for ids_ in chunk:
                            payload = ids_[0] if len(ids_) == 1 else ids_
                            message = create(
                                str(uuid.uuid4()),
                                TRAIN_TASK,
                                (payload,),
                                {},
                                argsrepr=_args_repr(ids_),
                                kwargsrepr="{}",
                            )
                            send(
                                producer, TRAIN_TASK, message, queue=QUEUE, declare=[], retry=False
                            )
                    # The batch left the with-block flushed: the broker has it.
                    batch_ids = [run_id for ids_ in chunk for run_id in ids_]
                    if conn is not None:
                        _mark(conn, batch_ids)
                    else:
                        marks.append(marker.submit(_mark_published, engine, batch_ids))
                    sent += len(batch_ids)
                    if progress is not None:
                        progress("publish", sent, total)
            except errors as exc:
                raise PublishError(
                    f"broker {_broker_url(app)}: publishing failed after {sent} of {total} "
                    f"run(s): {_first_line(exc)}",
                    sent,
                ) from exc
    finally:
        marker.shutdown(wait=True)
        for mark in marks:
            mark.result()  # a failed UPDATE surfaces here
    return sent


def _args_repr(ids: Sequence[int]) -> str:
    if len(ids) == 1:
        return f"({ids[0]},)"
    shown = ", ".join(map(str, ids[:4])) + (", ..." if len(ids) > 4 else "")
    return f"([{shown}],) {len(ids)} runs"


_MARK_PG = text(
    "UPDATE runs SET published = true, published_at = :at WHERE id = ANY(CAST(:ids AS integer[]))"
)
_MARK_SQLITE = text(
    "UPDATE runs SET published = 1, published_at = :at "
    "WHERE id IN (SELECT value FROM json_each(:ids))"
)


def _mark_published(engine: Engine, ids: Sequence[int]) -> None:
    with engine.begin() as conn:
        _mark(conn, ids)


def _mark(conn: Connection, ids: Sequence[int]) -> None:
    # One array parameter: compiling an IN list of thousands of parameters in the
    # marking thread would take the GIL from the publishing loop.
    now = utcnow()
    if conn.dialect.name == "postgresql":
        conn.execute(_MARK_PG, {"ids": list(ids), "at": now})
    else:
        # The timestamp as SQLAlchemy stores it on SQLite, so comparisons in SQL hold.
        kind = _RUNS.c.published_at.type.dialect_impl(conn.dialect)
        to_db = kind.bind_processor(conn.dialect) or (lambda v: v)
        conn.execute(_MARK_SQLITE, {"ids": json.dumps(list(ids)), "at": to_db(now)})


def pending_ids(*, engine: Engine, experiment_id: int | None = None) -> list[int]:
    """Ids of queued runs whose message was never handed to the broker, oldest first."""
    cond = [_RUNS.c.status == RunStatus.queued, _RUNS.c.published.is_(False)]
    if experiment_id is not None:
        cond.append(_RUNS.c.experiment_id == experiment_id)
    with engine.connect() as conn:
        return list(conn.execute(select(_RUNS.c.id).where(*cond).order_by(_RUNS.c.id)).scalars())


# -- the store side -----------------------------------------------------------------------------


#: Keys of a row from ``run_row``, in this order.
_ROW_KEYS = (
    "config",
    "experiment_id",
    "config_hash",
    "optimizer",
    "dataset",
    "hidden",
    "activation",
    "seed",
    "max_steps",
    *_PARAM_COLUMNS,
    "est_seconds",
    "status",
    "published",
    "attempt",
    "cancel_requested",
    "created_at",
)


def hidden_label(hidden: Sequence[int]) -> str:
    """The grids' label of a hidden layer list, e.g. ``64x32``.

    Imported when first used, by a submit: the grid models it lives beside take
    about 80 ms to import, and the window (this module's publishing half) runs in
    every worker process, which never submits a grid.
    """
    from service.grids import hidden_label as label

    return label(hidden)


def run_row(experiment_id: int, run: Any, now: Any) -> dict[str, Any]:
    """The ``runs`` row of a RunSpec (config, hash and the hyperparameter columns).

    The definition; ``_Rows`` builds the same values for a whole grid, faster.
    """
    config = run.config
    return {
        "config": config,
        "experiment_id": experiment_id,
        "config_hash": run.config_hash,
        "optimizer": config["optimizer"],
        "dataset": config["dataset"],
        "hidden": hidden_label(config["hidden"]),
        "activation": config["activation"],
        "seed": config["seed"],
        "max_steps": config["max_steps"],
        **{column: config.get(column) for column in _PARAM_COLUMNS},
        "est_seconds": _estimate(config),
        "status": RunStatus.queued,
        "published": False,
        "attempt": 0,
        "cancel_requested": False,
        "created_at": now,
    }


#: The columns ``_Rows`` fills, in its order: what differs between runs that differ
#: by their seed alone comes first, then what they share, then what every run shares.
_OWN_COLUMNS = ("id", "config", "config_hash", "seed")
_SHARED_COLUMNS = (
    "optimizer",
    "dataset",
    "hidden",
    "activation",
    "max_steps",
    *_PARAM_COLUMNS,
    "est_seconds",
)
_FIXED_COLUMNS = ("experiment_id", "status", "published", "attempt", "cancel_requested")
_COPY_COLUMNS = (*_OWN_COLUMNS, *_SHARED_COLUMNS, *_FIXED_COLUMNS, "created_at")
_COPY_STATEMENT = f"COPY runs ({', '.join(_COPY_COLUMNS)}) FROM STDIN (FORMAT binary)"
#: Shared values remembered at most (a grid's runs share a few thousand).
_SHARED_MEMO = 100_000


class _Rows:
    """The ``runs`` rows of a grid's runs: ``run_row``'s values, built for many runs at once.

    A grid repeats itself: runs that differ only by their seed (the fastest axis)
    share every column but the id, the config and its hash, so those columns
    (hidden label, cost estimate ...) are computed once per config-without-seed.
    The config is stored as its canonical JSON (sorted keys, no spaces; it parses
    to the same dict). ``tuple`` gives driver values in ``_COPY_COLUMNS`` order,
    ``copy_binary`` the same row in PostgreSQL's binary COPY format (each column
    as ``_BINARY_TYPES`` says; a stream of rows starts with ``BINARY_HEADER`` and
    ends with ``BINARY_TRAILER``). Binary, PostgreSQL parses no numbers, dates or
    escapes: a million-run COPY took 10.0-10.5 s against 10.7-11.0 s as text.
    """

    def __init__(
        self, experiment_id: int, now: Any, *, created_at: Any = None, encoding: str = "utf-8"
    ) -> None:
        self._encoding = encoding  # of binary COPY's text: the connection's client encoding
        self._tail = (experiment_id, RunStatus.queued.name, False, 0, False)
        self._created_at = now if created_at is None else created_at
        fixed = zip(_BINARY_TYPES[-len(self._tail) - 1 :], (*self._tail, now), strict=True)
        self._binary_tail = b"".join(_binary_field(kind, v, encoding) for kind, v in fixed)
        self._shared: dict[str, tuple[Any, ...]] = {}
        self._shared_binary: dict[str, bytes] = {}

    def _shared_values(self, config: dict[str, Any], text: str) -> tuple[str, tuple[Any, ...]]:
        """The memo key of ``config`` (its canonical JSON ``text``) and its shared values."""
        # The canonical JSON without the seed's value: JSON keeps 1, 1.0 and true apart,
        # and -0.0 from 0.0, so equal keys mean equal configs but for the seed. Only
        # when "seed" occurs once (no nested object has a key of that name).
        seed = config.get("seed")
        key = text
        if seed.__class__ is int and text.count('"seed":') == 1:
            key = text.replace(f'"seed":{seed}', '"seed":', 1)
        shared = self._shared.get(key)
        if shared is None:
            shared = (
                config["optimizer"],
                config["dataset"],
                hidden_label(config["hidden"]),
                config["activation"],
                config["max_steps"],
                *(config.get(column) for column in _PARAM_COLUMNS),
                _estimate(config),
            )
            if len(self._shared) < _SHARED_MEMO:
                self._shared[key] = shared
        return key, shared

    def tuple(self, run_id: int, run: Any) -> tuple[Any, ...]:
        config = run.config
        text = fast_canonical_json(config)
        _, shared = self._shared_values(config, text)
        return (
            run_id,
            text,
            run.config_hash,
            config["seed"],
            *shared,
            *self._tail,
            self._created_at,
        )

    def copy_binary(self, run_id: int, run: Any, text: str | None = None) -> bytes:
        """The row of ``run``; ``text``, if given, is its config's canonical JSON."""
        config = run.config
        if text is None:
            text = fast_canonical_json(config)
        key, shared = self._shared_values(config, text)
        shared_binary = self._shared_binary.get(key)
        if shared_binary is None:
            kinds = _BINARY_TYPES[len(_OWN_COLUMNS) : len(_OWN_COLUMNS) + len(shared)]
            shared_binary = b"".join(
                _binary_field(kind, value, self._encoding)
                for kind, value in zip(kinds, shared, strict=True)
            )
            if len(self._shared_binary) < _SHARED_MEMO:
                self._shared_binary[key] = shared_binary
        data = text.encode(self._encoding)
        digest = run.config_hash.encode(self._encoding)
        return b"".join(
            (
                _ROW_START.pack(len(_COPY_COLUMNS), 4, run_id, len(data)),
                data,
                _LENGTH.pack(len(digest)),
                digest,
                _INT4.pack(4, config["seed"]),
                shared_binary,
                self._binary_tail,
            )
        )


#: Each column of ``_COPY_COLUMNS`` as PostgreSQL's binary COPY format sends it:
#: its type in ``runs`` (json and the enum travel as their text).
_BINARY_TYPES = (
    *("int4", "text", "text", "int4"),  # id, config, config_hash, seed
    *("text", "text", "text", "text", "int4"),  # optimizer, dataset, hidden, activation, max_steps
    *("float8", "int4", "float8", "float8", "float8", "int4"),  # _PARAM_COLUMNS
    "float8",  # est_seconds
    *("int4", "text", "bool", "int4", "bool"),  # _FIXED_COLUMNS
    "timestamptz",  # created_at
)
BINARY_HEADER = b"PGCOPY\n\xff\r\n\x00" + bytes(8)  # signature, no flags, no extension
BINARY_TRAILER = b"\xff\xff"
_LENGTH = struct.Struct(">i")
_INT4 = struct.Struct(">ii")  # a field: its length, then its value
_ROW_START = struct.Struct(">hiii")  # field count, the id field, the config's length
_FLOAT8 = struct.Struct(">id")
_INT8 = struct.Struct(">iq")
_NULL = _LENGTH.pack(-1)
_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)  # PostgreSQL's timestamps count from here


def _binary_field(kind: str, value: Any, encoding: str) -> bytes:
    """``value`` as one field of a binary COPY row, for a column of type ``kind``."""
    if value is None:
        return _NULL
    if kind == "text":
        data = value.encode(encoding)
        return _LENGTH.pack(len(data)) + data
    if kind == "int4":
        return _INT4.pack(4, value)
    if kind == "float8":
        return _FLOAT8.pack(8, value)
    if kind == "bool":
        return b"\x00\x00\x00\x01" + (b"\x01" if value else b"\x00")
    if kind == "timestamptz":
        return _INT8.pack(8, (value - _EPOCH) // timedelta(microseconds=1))
    raise ValueError(f"no binary COPY encoding for a {kind} column")


def _estimate(config: dict[str, Any]) -> float | None:
    from engine.cost import estimate_seconds

    seconds = estimate_seconds(config)
    return None if seconds == float("inf") else seconds  # unknown: NULL, packed alone


@contextmanager
def submit_lock(engine: Engine) -> Iterator[None]:
    """Serialize submitters of one store from their first read to their last message.

    Without it, a second submit of the same grid could see the first one's runs
    queued but not yet published and send them a second time. PostgreSQL: a
    session advisory lock keyed by the store's schema; SQLite: a file lock beside
    the database (one machine).
    """
    if engine.dialect.name == "postgresql":
        with engine.connect() as conn:
            key = text("SELECT hashtext(current_schema() || '.mlpq.submit')")
            lock_id = conn.execute(key).scalar_one()
            conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": lock_id})
            conn.commit()
            try:
                yield
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": lock_id})
                conn.commit()
        return
    database = engine.url.database
    if not database or database == ":memory:" or fcntl is None:
        yield
        return
    with open(f"{database}.submit-lock", "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _experiment(conn: Connection, grid: Grid) -> tuple[int, bool]:
    table = Experiment.__table__
    found = conn.execute(select(table.c.id).where(table.c.name == grid.name)).scalar()
    if found is not None:
        # The spec records the latest submission of the grid.
        conn.execute(update(table).where(table.c.id == found).values(spec=grid.spec))
        return found, False
    new_id = conn.execute(
        insert(table)
        .values(name=grid.name, spec=grid.spec, created_at=utcnow())
        .returning(table.c.id)
    ).scalar_one()
    return new_id, True


_LOOKUP_PG = (  # run on psycopg's connection (see _existing)
    "SELECT id, experiment_id, status, published, config_hash FROM runs "
    "WHERE config_hash = ANY(CAST(%(hashes)s AS text[]))"
)
_LOOKUP_SQLITE = text(
    "SELECT id, experiment_id, status, published, config_hash FROM runs "
    "WHERE config_hash IN (SELECT value FROM json_each(:hashes))"
)


def _existing(
    conn: Connection, hashes: Iterable[str]
) -> dict[str, list[tuple[int, int, RunStatus, bool]]]:
    """config_hash -> [(run id, experiment id, status, published)] for runs already stored."""
    # One array parameter per query: an IN list of thousands of bound parameters
    # costs more to compile than to run.
    found: dict[str, list[tuple[int, int, RunStatus, bool]]] = {}
    hashes = list(hashes)
    postgres = conn.dialect.name == "postgresql"
    if postgres and hashes:
        # By the hash index, whatever the statistics say. Without any (a store's
        # first big grid), PostgreSQL takes ANY(20,000 hashes) to match every row
        # and scans the table; a grid stored while it is expanded then scanned,
        # chunk after chunk, every row its own COPY had written so far: 3.4-3.9 s
        # of a million-run submit's lookups, against 1.8-2.5 s by the index.
        conn.exec_driver_sql("SET LOCAL enable_seqscan = off")
    for start in range(0, len(hashes), LOOKUP_CHUNK):
        chunk = hashes[start : start + LOOKUP_CHUNK]
        if postgres:
            # Not prepared: psycopg prepares a statement run five times, and five runs
            # later PostgreSQL plans it once for any array, a bitmap scan of the hash
            # index sized for ten hashes: 2.9 s a chunk, where a plan for the chunk at
            # hand takes 0.08 s (a re-submitted million-run grid spent minutes here).
            # One text literal: psycopg's list dumper looks at every element.
            rows = conn.connection.driver_connection.execute(
                _LOOKUP_PG, {"hashes": _pg_text_array(chunk)}, prepare=False
            ).fetchall()  # at once: row by row cost 3 us a run, the lookup itself 4
        else:
            rows = conn.execute(_LOOKUP_SQLITE, {"hashes": json.dumps(chunk)}).all()
        for rid, eid, status, published, digest in rows:
            found.setdefault(digest, []).append((rid, eid, _STATUSES[status], bool(published)))
    if postgres and hashes:
        conn.exec_driver_sql("SET LOCAL enable_seqscan = DEFAULT")
    return found


#: RunStatus by stored value (a dict lookup; calling the enum costs 2 us a run).
_STATUSES = {status.value: status for status in RunStatus}


def _pg_text_array(values: Sequence[str]) -> str:
    """``values`` as a PostgreSQL array literal of text (``{"a","b"}``)."""
    joined = "\x00".join(values)
    if '"' in joined or "\\" in joined:
        values = [v.replace("\\", "\\\\").replace('"', '\\"') for v in values]
        joined = "\x00".join(values)
    return '{"' + joined.replace("\x00", '","') + '"}' if values else "{}"


def _insert_runs(
    conn: Connection,
    experiment_id: int,
    runs: Sequence[Any],
    now: Any,
    progress: Progress | None,
) -> list[int]:
    """Insert the RunSpecs ``runs`` into ``runs`` in the caller's transaction; their ids."""
    if not runs:
        return []
    if progress is not None:
        progress("insert", 0, len(runs))
    if conn.dialect.name == "postgresql":
        return _copy_runs(conn, experiment_id, runs, now, progress)
    # SQLite: this transaction holds the write lock (BEGIN IMMEDIATE), so the ids
    # after the largest one are ours, and the driver's executemany of plain tuples
    # needs no RETURNING.
    first = (conn.execute(select(func.max(_RUNS.c.id))).scalar() or 0) + 1
    ids = range(first, first + len(runs))
    statement = (
        f"INSERT INTO runs ({', '.join(_COPY_COLUMNS)}) "
        f"VALUES ({', '.join('?' * len(_COPY_COLUMNS))})"
    )
    # Datetimes as SQLAlchemy writes them on SQLite, so SQL comparisons of created_at hold.
    kind = _RUNS.c.created_at.type.dialect_impl(conn.dialect)
    to_db = kind.bind_processor(conn.dialect) or (lambda v: v)
    rows = _Rows(experiment_id, now, created_at=to_db(now))
    for start in range(0, len(runs), INSERT_CHUNK):
        chunk = runs[start : start + INSERT_CHUNK]
        conn.exec_driver_sql(statement, list(map(rows.tuple, ids[start:], chunk)))
        if progress is not None:
            progress("insert", start + len(chunk), len(runs))
    return list(ids)


# The sequence's name is looked up once (a subquery, planned as an InitPlan): as the
# argument itself, pg_get_serial_sequence ran for every id, 2.4 s of a million.
_RUNS_SEQUENCE = "(SELECT pg_get_serial_sequence('runs', 'id'))"
_NEW_IDS = text(
    "SELECT min(id), max(id) FROM "
    f"(SELECT nextval({_RUNS_SEQUENCE}) AS id FROM generate_series(1, :n)) s"
)
_NEW_IDS_LIST = text(f"SELECT nextval({_RUNS_SEQUENCE}) FROM generate_series(1, :n)")


def _new_ids(conn: Connection, n: int) -> Sequence[int]:
    """``n`` new run ids from the table's sequence (not rolled back with a transaction)."""
    low, high = conn.execute(_NEW_IDS, {"n": n}).one()
    if high - low + 1 == n:
        return range(low, high + 1)
    # Another session drew from the sequence meanwhile: draw a list (the range
    # drawn above stays unused, a gap in the ids as a rolled back insert leaves).
    return list(conn.execute(_NEW_IDS_LIST, {"n": n}).scalars())


def _copy_runs(
    conn: Connection, experiment_id: int, runs: Sequence[Any], now: Any, progress: Progress | None
) -> list[int]:
    # COPY is about 10x faster than a multi-row INSERT ... RETURNING; the ids come
    # from the table's own sequence first, so they are known without RETURNING.
    # Usually one range (nobody else drew from the sequence meanwhile): read its ends.
    ids = _new_ids(conn, len(runs))
    driver = conn.connection.driver_connection
    rows = _Rows(experiment_id, now, encoding=driver.info.encoding)
    line = rows.copy_binary
    # Rows made one chunk at a time here, sent by psycopg's writer thread: PostgreSQL
    # (the slower side) reads one chunk while the next is made. Written from this
    # thread, each write waited for PostgreSQL to take the chunk, and making the
    # next one waited for that: a million runs took the sum of both sides, not the
    # longer (21.9 s where PostgreSQL alone takes 16.4 s).
    from psycopg.copy import QueuedLibpqWriter

    with (
        driver.cursor() as cur,
        cur.copy(_COPY_STATEMENT, writer=QueuedLibpqWriter(cur)) as copy,
    ):
        copy.write(BINARY_HEADER)
        for start in range(0, len(runs), INSERT_CHUNK):
            end = min(start + INSERT_CHUNK, len(runs))
            copy.write(b"".join(map(line, ids[start:end], runs[start:end])))
            if progress is not None:
                progress("insert", end, len(runs))
        copy.write(BINARY_TRAILER)
    return list(ids)


def _requeue(conn: Connection, ids: list[int]) -> None:
    # Back to a fresh start: a failed run resumed from its checkpoint would likely fail again.
    reset_runs(session=conn, run_ids=ids)


def submit(
    *,
    grid: Grid,
    engine: Engine,
    app: Celery,
    force: bool = False,
    progress: Progress | None = None,
) -> SubmitReport:
    """Store ``grid``'s runs in one transaction, then fill the broker's window from the store.

    See the module docstring for what happens to configs already in the store.
    The broker is checked first, so an unreachable broker writes nothing. Only a
    window of messages is published (``service.queue.window``); the rest wait in
    the store, and the workers publish them as runs finish. A broker failure while
    publishing does not raise: the runs stay in the store, unsent, and the report
    says why (``publish_error``).
    """
    from service.grids.loader import no_gc
    from service.queue.window import feed

    check_broker(app)
    with submit_lock(engine):
        # A million configs, their hashes and the rows made of them hold no cycles: with
        # the collector on, each of its full passes walked them all, for nothing.
        with engine.begin() as conn, no_gc():
            report, fresh = _store(conn, grid, force, progress)
        report.run_ids = fresh
        if len(fresh) >= ANALYZE_AFTER and engine.dialect.name == "postgresql":
            _analyze(engine)
        if progress is not None:
            progress("insert", 1, 1)  # a grid with nothing new still ends the phase
        try:
            report.published = feed(app, engine, block=True, progress=progress)
        except PublishError as exc:
            report.published = exc.sent
            report.publish_error = str(exc)
    report.unsent = _unsent_count(engine, report.experiment_id)
    return report


def _analyze(engine: Engine) -> None:
    """Fresh planner statistics for ``runs`` after a bulk insert (PostgreSQL's advice).

    Until autovacuum gets to it, PostgreSQL plans on the statistics of the table
    before the insert: the window's first look for unsent runs, right after a
    million-run submit, sorted all of them (0.69 s) instead of reading the first
    few hundred from ix_runs_unsent (17 ms). ANALYZE samples 30,000 rows whatever
    the table's size (0.27 s at a million).
    """
    with engine.connect() as conn:
        conn.execute(text("ANALYZE runs"))
        conn.commit()


def _unsent_count(engine: Engine, experiment_id: int) -> int:
    with engine.connect() as conn:
        return int(
            conn.execute(
                select(func.count()).where(
                    _RUNS.c.experiment_id == experiment_id,
                    _RUNS.c.status == RunStatus.queued,
                    _RUNS.c.published.is_(False),
                )
            ).scalar_one()
        )


def _store(
    conn: Connection, grid: Grid, force: bool, progress: Progress | None
) -> tuple[SubmitReport, list[int]]:
    """Write the grid's runs in the caller's transaction.

    Returns the report so far and the ids of the runs queued now (new, forced,
    requeued).
    """
    if grid.datasets:
        from service.store import store_dataset  # the ingest module (NumPy): CSV grids only

        for csv in grid.datasets:
            store_dataset(conn, csv.name, csv.data)
    experiment_id, created = _experiment(conn, grid)
    if not grid.expanded and conn.dialect.name == "postgresql":
        return _store_streaming(conn, grid, experiment_id, created, force, progress)
    report = SubmitReport(experiment_id, grid.name, created, total=len(grid.runs))
    existing = _existing(conn, [r.config_hash for r in grid.runs])
    new, requeue = _sort_out(grid.runs, existing, experiment_id, force, report)
    new_ids = _insert_runs(conn, experiment_id, new, utcnow(), progress)
    _requeue(conn, requeue)
    return report, new_ids + requeue


def _sort_out(
    runs: list[Any],
    existing: dict[str, list[tuple[int, int, RunStatus, bool]]],
    experiment_id: int,
    force: bool,
    report: SubmitReport,
) -> tuple[list[Any], list[int]]:
    """The runs to insert and the ids of this experiment's runs to queue again; counts them."""
    if not existing:  # nothing of these runs in the store yet: every run is new
        report.new += len(runs)
        return runs, []
    new: list[Any] = []
    requeue: list[int] = []
    for run in runs:
        matches = existing.get(run.config_hash, ())
        in_flight = [m for m in matches if m[2] in _IN_FLIGHT]
        if in_flight:
            report.already_queued += 1
            continue
        if any(m[2] in _DONE for m in matches):
            if not force:
                report.skipped_done += 1
                continue
            report.forced += 1
            new.append(run)
            continue
        mine = [m for m in matches if m[1] == experiment_id and m[2] in _REQUEUE]
        if mine:
            requeue.append(mine[0][0])
            continue
        report.new += 1
        new.append(run)
    report.requeued += len(requeue)
    return new, requeue


def _store_streaming(
    conn: Connection,
    grid: Grid,
    experiment_id: int,
    created: bool,
    force: bool,
    progress: Progress | None,
) -> tuple[SubmitReport, list[int]]:
    """``_store`` on PostgreSQL for a grid not expanded yet: expanded while it is stored.

    One COPY takes every new run. The grid is expanded a chunk at a time, and each
    chunk's lookups and ids come from a second connection while PostgreSQL reads the
    chunks before it: the expansion and the lookups run beside the COPY instead of
    before it. That connection reads what is committed, as the lookups did before
    anything was inserted; the runs of this grid are told apart by the expansion
    itself, which drops duplicates.
    """
    from psycopg.copy import QueuedLibpqWriter

    report = SubmitReport(experiment_id, grid.name, created, total=0)
    now = utcnow()
    rows = _Rows(experiment_id, now, encoding=conn.connection.driver_connection.info.encoding)
    line = rows.copy_binary
    fresh: list[int] = []
    requeue: list[int] = []
    side = conn.engine.connect()
    try:
        with (
            conn.connection.driver_connection.cursor() as cur,
            cur.copy(_COPY_STATEMENT, writer=QueuedLibpqWriter(cur)) as copy,
        ):
            copy.write(BINARY_HEADER)
            for chunk, texts in grid.stream(LOOKUP_CHUNK):
                if progress is not None and not report.total:  # below the expansion's bar
                    progress("insert", 0, grid.upper)
                report.total += len(chunk)
                existing = _existing(side, [r.config_hash for r in chunk])
                new, again = _sort_out(chunk, existing, experiment_id, force, report)
                requeue.extend(again)
                if existing or texts is None:  # the texts line up with the chunk only
                    texts = [None] * len(new)
                ids = _new_ids(side, len(new)) if new else []
                for start in range(0, len(new), INSERT_CHUNK):
                    end = start + INSERT_CHUNK
                    copy.write(
                        b"".join(map(line, ids[start:end], new[start:end], texts[start:end]))
                    )
                fresh.extend(ids)
                if progress is not None:
                    progress("insert", report.total, max(grid.upper, report.total))
            copy.write(BINARY_TRAILER)
    finally:
        side.close()
    _requeue(conn, requeue)
    return report, fresh + requeue
