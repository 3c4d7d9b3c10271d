"""The window: the broker holds the next few messages of the queue, never the grid.

The SQL store is the one truth about what is queued. ``mlpq submit`` stores every
run with ``published = false`` and calls ``feed``, which hands the broker only a
window of messages; whoever is alive calls ``feed`` again as runs finish and
tops the window up from SQL: every worker process after each message it
finishes, each worker's reaper thread every few seconds, and ``mlpq run`` while it
waits. So a grid finishes with the submitting command long gone, and Redis holds
at most ``window`` messages whatever the size of the grid.

One feeder at a time, under a lock held in the store (a PostgreSQL advisory
lock keyed by the schema, a file lock beside an SQLite database). Workers only
try it: a worker that finds it held goes on, since the holder is filling the same
window; and a worker looks at the queue's length first, doing nothing more while
it holds at least half the window. The feeder counts the messages waiting in the broker's queue, and
publishes enough of the oldest unsent runs (``ix_runs_unsent``, id order) to
bring it up to the window, packed by their estimated cost
(``service.queue.packing``). Runs put back in the queue (retried, reaped,
handed back, or whose message the broker lost) are marked unsent and go out
through the same window, oldest first.

The default window is ``DEFAULT_WINDOW`` messages, and at least
``RUNNING_FACTOR`` times the runs in progress, so a cluster of many workers is
never starved by it (``MLPQ_WINDOW`` sets it).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import Any

from celery import Celery
from sqlalchemy import Connection, Engine, func, select, text

from service.exceptions import BrokerError
from service.queue.enqueue import Progress, publish_packs
from service.queue.names import QUEUE
from service.queue.packing import estimated_costs, pack

try:
    import fcntl
except ImportError:  # Windows: SQLite feeders are not serialized there
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("mlpq.window")

#: Messages in the broker when neither MLPQ_WINDOW nor the runs in progress ask for more.
DEFAULT_WINDOW = 64
#: The automatic window is at least this many times the runs in progress.
RUNNING_FACTOR = 4
#: Unsent runs read per message of room, at first (more when their packs come out short).
ROWS_PER_MESSAGE = 64

_COUNT_RUNNING = text("SELECT count(*) FROM runs WHERE status = 'running'")
# Whether any run waits for the window (the first entry of ix_runs_unsent, if any).
_ANY_UNSENT = text("SELECT 1 FROM runs WHERE status = 'queued' AND NOT published LIMIT 1")
_NEXT_UNSENT = text(
    "SELECT id, est_seconds FROM runs WHERE status = 'queued' AND NOT published "
    "ORDER BY id LIMIT :n"
)


def queue_size(app: Celery) -> int | None:
    """Messages waiting in the train queue (not those a worker holds), None if unknown."""
    from amqp.exceptions import NotFound
    from kombu.exceptions import ChannelError

    # A connection of the app's broker pool: a worker asks after every message, and a
    # new connection each time (connect, channel, LLEN) was most of what the ask cost.
    with app.pool.acquire(block=True) as conn:
        try:
            channel = conn.default_channel
            size = getattr(channel, "_size", None)  # kombu's virtual transports: Redis, files
            if size is not None:
                return int(size(QUEUE))
            return int(channel.queue_declare(queue=QUEUE, passive=True).message_count)
        except (ChannelError, NotFound):
            return 0  # no such queue yet (Redis drops an empty list): nothing in it
        except Exception as exc:
            # Back to the pool closed: the next ask connects afresh (a broker restarted).
            conn.collect()
            log.debug("window: cannot read the queue's size: %s", exc)
            return None


def window_size(app: Celery, running: int) -> int:
    """Messages the broker should hold: ``mlpq_window``, or the automatic size."""
    configured = int(app.conf.get("mlpq_window") or 0)
    if configured > 0:
        return configured
    return max(DEFAULT_WINDOW, RUNNING_FACTOR * running)


def low_water(app: Celery) -> int:
    """Messages in the queue below which a worker tops the window up: half the window."""
    configured = int(app.conf.get("mlpq_window") or 0)
    return max(1, (configured or DEFAULT_WINDOW) // 2)


@contextmanager
def feed_lock(engine: Engine, *, block: bool) -> Iterator[bool]:
    """Hold the store's feeder lock on a connection of its own (tests, tools)."""
    with engine.connect() as conn, _locked(conn, block=block) as held:
        yield held


#: The feeder lock's key: one per store (schema), computed in the statement that takes it.
_FEED_LOCK_KEY = "hashtext(current_schema() || '.mlpq.feed')"


@contextmanager
def _locked(conn: Connection, *, block: bool) -> Iterator[bool]:
    """The feeder lock; yields False at once if another holds it and ``block`` is off.

    PostgreSQL: a session advisory lock keyed by the schema (it works on a connection
    in autocommit, a worker's, and goes with the session if the process dies).
    SQLite: a file lock beside the database (one machine).
    """
    if conn.dialect.name == "postgresql":
        call = "pg_advisory_lock" if block else "pg_try_advisory_lock"
        got = conn.execute(text(f"SELECT {call}({_FEED_LOCK_KEY})")).scalar()
        held = True if block else bool(got)
        try:
            yield held
        finally:
            if held:
                conn.execute(text(f"SELECT pg_advisory_unlock({_FEED_LOCK_KEY})"))
            if conn.in_transaction():
                conn.commit()
        return
    database = conn.engine.url.database
    if not database or database == ":memory:" or fcntl is None:
        yield True
        return
    with open(f"{database}.feed-lock", "a+b") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX if block else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def feed(
    app: Celery,
    engine: Engine,
    *,
    block: bool = False,
    progress: Progress | None = None,
    conn: Connection | None = None,
) -> int:
    """Top the broker's window up from the store; returns the runs published.

    ``block``: wait for another feeder to finish (submit, retry, a hand-back), rather
    than leave the window to it (a worker between two messages). ``conn``: the
    connection to use (a worker process keeps to one connection to the store);
    the lock, the reads and the marks all go through it. A broker failure raises
    ``PublishError`` (from ``publish_packs``), the runs sent before it marked and the
    others left unsent.
    """
    if not block:
        # A worker between two messages: while the queue holds at least half the window,
        # one look at its length is all (no lock, no query).
        waiting = queue_size(app)
        if waiting is None or waiting >= low_water(app):
            return 0
    if conn is None:
        with engine.connect() as own:
            return feed(app, engine, block=block, progress=progress, conn=own)
    try:
        if conn.execute(_ANY_UNSENT).first() is None:
            # Nothing waits in the store (the tail of every grid): no lock, no counts.
            # A run marked unsent after this look is fed by whoever marked it.
            return 0
        with _locked(conn, block=block) as held:
            # Counted again under the lock: another feeder may have filled it meanwhile.
            packs = _packs_for_room(app, conn) if held else []
            if not packs:
                return 0
            return publish_packs(app, packs, engine=engine, conn=conn, progress=progress)
    finally:
        if conn.in_transaction():
            conn.commit()  # the marks of what went out (SQLite: and its write lock)


def _packs_for_room(app: Celery, conn: Connection) -> list[list[int]]:
    waiting = queue_size(app)
    if waiting is None:
        return []  # the broker cannot be asked: the next feed tries again
    running = int(conn.execute(_COUNT_RUNNING).scalar() or 0)
    room = window_size(app, running) - waiting
    if room <= 0:
        return []
    return _next_packs(conn, room, float(app.conf.get("mlpq_pack_seconds") or 0))


def _next_packs(conn: Connection, room: int, target: float) -> list[list[int]]:
    """The next ``room`` messages' worth of unsent runs, oldest first, packed."""
    limit = room * (ROWS_PER_MESSAGE if target > 0 else 1)
    while True:
        rows = conn.execute(_NEXT_UNSENT, {"n": limit}).all()
        known = {run_id: float(est) for run_id, est in rows if est is not None}
        costs = estimated_costs(conn, [run_id for run_id, _ in rows], known)
        everything = len(rows) < limit  # the rest of the queue: spread it over the workers
        packs = pack(costs, target, spread=everything)
        if everything or len(packs) > room:
            return packs[:room]
        limit *= 8  # the packs came out longer than the rows read: read further


def feed_quietly(
    app: Celery, engine: Engine, *, block: bool = False, conn: Connection | None = None
) -> int:
    """``feed``, logging rather than raising a broker or store failure (callers go on)."""
    from sqlalchemy.exc import SQLAlchemyError

    try:
        return feed(app, engine, block=block, conn=conn)
    except (BrokerError, SQLAlchemyError, OSError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        log.warning("window: topping up failed (the next feed tries again): %s", first)
        return 0


# -- messages the broker lost --------------------------------------------------------------------

_IN_BROKER = text("status = 'queued' AND published")


def _runs() -> Any:
    from service.store import Run

    return Run.__table__


def _queued() -> Any:
    from service.store import RunStatus

    return RunStatus.queued


def _running() -> Any:
    from service.store import RunStatus

    return RunStatus.running


def mark_for_resend(conn: Connection, run_ids: list[int]) -> int:
    """Mark queued runs as not in the broker, so the next feed publishes them again."""
    runs = _runs()
    done = 0
    for start in range(0, len(run_ids), 5000):
        chunk = run_ids[start : start + 5000]
        done += conn.execute(
            runs.update()
            .where(runs.c.id.in_(chunk), runs.c.status == _queued(), runs.c.published)
            .values(published=False)
        ).rowcount
    return done


def lost_runs(
    conn: Connection, *, grace_seconds: float, queue_empty: bool, now: datetime
) -> list[int]:
    """Queued runs whose message the broker no longer holds, by what SQL knows.

    The queue hands messages out oldest first, so a run published over
    ``grace_seconds`` before a run that is training now was skipped: its message
    is gone (a broker restart without its last writes, a message in flight). When
    the queue is empty, any run published over ``grace_seconds`` ago is lost too.
    A run sent twice is trained once (the claim decides).
    """
    runs = _runs()
    cutoffs: list[datetime] = []
    newest = conn.execute(
        select(func.max(runs.c.published_at)).where(runs.c.status == _running())
    ).scalar()
    if newest is not None:
        cutoffs.append(_aware(newest) - timedelta(seconds=grace_seconds))
    if queue_empty:
        cutoffs.append(now - timedelta(seconds=grace_seconds))
    if not cutoffs:
        return []
    # The predicate spelled as ix_runs_in_broker's, so the planner can take that index.
    query = (
        select(runs.c.id).where(_IN_BROKER, runs.c.published_at < max(cutoffs)).order_by(runs.c.id)
    )
    return list(conn.execute(query).scalars())


def _aware(value: datetime) -> datetime:
    from datetime import UTC

    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)
