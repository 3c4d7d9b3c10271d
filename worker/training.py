"""The runs of one message, start to finish, on this worker: what the train task calls.

A pack holds one pooled connection from its claim to its last final write, and every
write is a short transaction on it. Round trips for a pack of runs that each finish
within one flush interval on PostgreSQL: the claim of all of them (one UPDATE ...
RETURNING) and their final writes (one statement each: status and summary, metrics,
weights), sent together in one pipeline; all in autocommit, as prepared statements
(the first pack on a connection prepares them: one more round trip each). A single
run: the same two round trips. Longer runs add one transaction per flush or
heartbeat, and per checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import traceback
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlalchemy import Connection, Engine, event
from sqlalchemy.exc import DBAPIError

# Imported here, in the worker's main process, so forked children start with NumPy loaded.
from engine import TrainConfig, Trainer, load_dataset
from service.grids import TIME_LIMIT_KEY
from service.settings import Settings
from service.store import (
    Beat,
    Claim,
    Refusal,
    RunStatus,
    claim_runs,
    finish_run,
    finish_runs,
    get_engine,
    prepare_resume,
    record_resume,
    refresh_claims,
    release_claims,
    release_run,
    save_progress,
    worker_identity,
)
from worker import handback

log = logging.getLogger("mlpq.worker")


class StoreLost(Exception):
    """The store's connection stayed lost past ``MLPQ_STORE_RETRY_SECONDS`` during a run."""


def connection_lost(exc: BaseException) -> bool:
    """Whether ``exc`` says the store's connection broke (not that a statement was wrong).

    A terminated backend, a server restart, a network blip or a busy SQLite file:
    SQLAlchemy's disconnect flag and operational or interface errors, raised by
    SQLAlchemy or by the driver directly (the metric COPY goes to psycopg).
    """
    from sqlalchemy.exc import InterfaceError, OperationalError, ResourceClosedError

    if isinstance(exc, DBAPIError):
        return exc.connection_invalidated or isinstance(exc, OperationalError | InterfaceError)
    if isinstance(exc, ResourceClosedError):
        return True  # our connection, closed after an earlier loss
    try:
        import psycopg
    except ImportError:  # pragma: no cover - psycopg is a dependency
        return False
    return isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError)


def _first_line(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None) or exc
    lines = str(orig).strip().splitlines()
    return lines[0] if lines else type(orig).__name__


#: Outcome of a run handed back to the queue by a stopping worker.
HANDED_BACK = "handed_back"


@dataclass(frozen=True)
class Outcome:
    """What became of one message."""

    run_id: int
    status: str  # a RunStatus value, or "dropped" / "lost"
    detail: str = ""


def execute_run(*, run_id: int, settings: Settings, worker: str | None = None) -> Outcome:
    """Claim ``run_id``, train it and store the result; never raises for a run's own failure."""
    outcomes = execute_runs(run_ids=[run_id], settings=settings, worker=worker)
    return outcomes[0] if outcomes else Outcome(run_id, HANDED_BACK, "not started")


def execute_runs(
    *, run_ids: Sequence[int], settings: Settings, worker: str | None = None
) -> list[Outcome]:
    """Claim the runs of a pack together, train each in turn, and store their results.

    One statement claims them all, and the results of runs that end close together
    are written together (``_Pack.flush``): a pack of tiny runs costs two round trips
    and one synchronous commit, not two of each per run. Never raises for a run's
    own failure; raises when the store is unreachable for the claim (nothing is
    claimed then: the caller sends the pack again later).

    Returns one outcome per run, in order; fewer when this process is told to stop
    (``handback``) between two runs: the runs it claimed and did not start are
    queued again with their attempt given back, and the caller sends what has no
    outcome again (and the run of a last ``HANDED_BACK`` outcome, queued again too).
    """
    engine = get_engine(settings.database_url)
    worker = worker or worker_identity()
    if handback.requested():
        return []
    conn = _KEPT.pop((engine, os.getpid()), None)
    claims: list[Claim | Refusal] = []
    if conn is not None:
        try:
            claims = _claim(conn, run_ids, worker, settings)
        except Exception as exc:
            conn.close()
            if not connection_lost(exc):
                raise
            conn = None  # the kept connection died (a server restart): claim on a fresh one
    if conn is None:
        conn = _connect(engine)
        try:
            claims = _claim(conn, run_ids, worker, settings)
        except BaseException:
            conn.close()
            raise
    pack = _Pack(claims, settings, conn)
    try:
        outcomes = pack.run()
    except BaseException:
        pack.conn.close()
        raise
    _keep(engine, pack.conn)
    return outcomes


def _claim(
    conn: Connection, run_ids: Sequence[int], worker: str, settings: Settings
) -> list[Claim | Refusal]:
    with _one_write(conn):
        return claim_runs(
            session=conn,
            run_ids=run_ids,
            worker=worker,
            stale_seconds=settings.stale_seconds,
            max_attempts=settings.max_attempts,
        )


@dataclass
class _Final:
    """A run's result, trained and not written yet: ``finish_run``'s arguments."""

    run: _ClaimedRun
    status: RunStatus
    stop_reason: str | None
    kwargs: dict[str, Any]


class _Pack:
    """The claimed runs of one message, trained in turn on one connection.

    A result waits to be written with the next ones while runs keep ending close
    together: it is written when the pack ends, before any run's first progress
    write (a run long enough to write progress flushes what waits), and before
    runs are handed back. A worker killed meanwhile loses only results not written
    yet, and their runs are claimed again like the one it was training.
    """

    def __init__(self, claims: list[Claim | Refusal], settings: Settings, conn: Connection):
        self.claims = claims
        self.settings = settings
        self._conn = conn
        self._current: _ClaimedRun | None = None
        self.outcomes: list[Outcome | None] = []
        self.pending: list[tuple[int, _Final]] = []

    @property
    def conn(self) -> Connection:
        return self._current.conn if self._current is not None else self._conn

    @conn.setter
    def conn(self, conn: Connection) -> None:
        if self._current is not None:
            self._current.conn = conn
        self._conn = conn

    def run(self) -> list[Outcome]:
        settings = self.settings
        autocommit = self.conn.dialect.name == "postgresql"
        claimed_at = time.monotonic()
        beats: dict[int, Beat] = {}
        for i, claim in enumerate(self.claims):
            if isinstance(claim, Refusal):
                log.info("run %d: message dropped: %s", claim.run_id, claim.reason)
                self.outcomes.append(Outcome(claim.run_id, "dropped", claim.reason))
                continue
            if i and handback.requested():  # told to stop between two runs
                self.flush()
                self._release(self._claims_from(i))
                break
            if time.monotonic() - claimed_at >= settings.heartbeat_seconds:
                # Runs claimed and not started yet keep their claim fresh, and learn of a cancel.
                beats = self._refresh(self._claims_from(i))
                claimed_at = time.monotonic()
            beat = beats.get(claim.run_id, Beat.owned)
            if beat is Beat.lost:
                log.warning("run %d: no longer ours (reset or taken over); skipped", claim.run_id)
                self.outcomes.append(Outcome(claim.run_id, "lost"))
                continue
            log.info(
                "run %d: claimed by %s (attempt %d)", claim.run_id, claim.worker, claim.attempt
            )
            run = _ClaimedRun(
                claim, settings, self.conn, autocommit=autocommit, before_progress=self.flush
            )
            self._current = run
            try:
                if beat is Beat.cancel:
                    result: Outcome | _Final = run.unstarted(RunStatus.cancelled, "cancelled")
                else:
                    result = run.train()
            except StoreLost as exc:
                # Not the runs' failure: they stay running, their heartbeats go stale, and the
                # reaper queues them again (to resume from their last checkpoints).
                log.warning(
                    "run %d: the store stayed unreachable (%s); it and the %d run(s) after it "
                    "are left for the stale-run reaper",
                    claim.run_id,
                    exc,
                    len(self._claims_from(i)) - 1,
                )
                self.outcomes.extend(Outcome(c.run_id, "lost", str(exc)) for c in self.claims[i:])
                break
            except Exception:
                error = traceback.format_exc()
                log.error("run %d: failed:\n%s", claim.run_id, error)
                result = run.fail(error)
            finally:
                self._conn, self._current = run.conn, None
            if isinstance(result, _Final):
                self.pending.append((len(self.outcomes), result))
                self.outcomes.append(None)
                continue
            self.outcomes.append(result)
            if result.status == HANDED_BACK:
                self.flush()
                self._release(self._claims_from(i + 1))
                break
        self.flush()
        return [outcome for outcome in self.outcomes if outcome is not None]

    def _claims_from(self, i: int) -> list[Claim]:
        """The claims of run ``i`` of the pack and of the runs after it."""
        return [c for c in self.claims[i:] if isinstance(c, Claim)]

    def flush(self) -> None:
        """Write the results waiting: together in one transaction, or else one by one."""
        if not self.pending:
            return
        pending, self.pending = self.pending, []
        owned: list[bool] | None = None
        if len(pending) > 1:
            try:
                with _one_write(self.conn):
                    owned = finish_runs(
                        session=self.conn, finals=[final.kwargs for _, final in pending]
                    )
            except Exception as exc:
                # Written one by one below: a lost connection is retried there, and a
                # result the store refuses fails its own run only.
                log.info("results of %d runs: written one by one (%s)", len(pending), exc)
                if self.conn.invalidated:
                    with contextlib.suppress(Exception):
                        self.conn.close()
        lost: StoreLost | None = None
        for k, (i, final) in enumerate(pending):
            run = final.run
            if owned is not None:
                self.outcomes[i] = run.finished(final, owned[k])
                continue
            if lost is not None:
                self.outcomes[i] = Outcome(run.claim.run_id, "lost", str(lost))
                continue
            run.conn = self.conn
            try:
                self.outcomes[i] = run.write_final(final)
            except StoreLost as exc:
                log.warning(
                    "run %d: the store stayed unreachable (%s); left for the stale-run reaper",
                    run.claim.run_id,
                    exc,
                )
                lost = exc
                self.outcomes[i] = Outcome(run.claim.run_id, "lost", str(exc))
            except Exception:
                error = traceback.format_exc()
                log.error("run %d: failed:\n%s", run.claim.run_id, error)
                self.outcomes[i] = run.fail(error)
            self.conn = run.conn

    def _refresh(self, claims: list[Claim]) -> dict[int, Beat]:
        def refresh() -> dict[int, Beat]:
            with _one_write(self.conn):
                return refresh_claims(session=self.conn, claims=claims)

        return self._retrying("heartbeat", claims, refresh, {})

    def _release(self, claims: list[Claim]) -> None:
        def release() -> None:
            with _one_write(self.conn):
                released = release_claims(session=self.conn, claims=claims)
            if released:
                log.info("runs %s: not started; queued again (worker stopping)", released)

        self._retrying("hand-back", claims, release, None)

    def _retrying(
        self, what: str, claims: list[Claim], write: Callable[[], Any], default: Any
    ) -> Any:
        if not claims:
            return default
        run = self._current = _ClaimedRun(claims[0], self.settings, self.conn)
        try:
            return run._retrying(what, write)
        except StoreLost as exc:
            ids = [c.run_id for c in claims]
            log.warning("runs %s: %s; left for the stale-run reaper", ids, exc)
            return default
        finally:
            self._conn, self._current = run.conn, None


@contextmanager
def _one_write(conn: Connection) -> Iterator[None]:
    """The transaction of a claim or a final write.

    On PostgreSQL the connection is in autocommit and each of the two is one statement,
    atomic on its own: no BEGIN or COMMIT is sent, and SQLAlchemy's begin/commit
    bookkeeping (about 0.1 ms of CPU a run, for nothing) is skipped too. Only a
    refused claim, which reads the row through SQLAlchemy, leaves a transaction
    open there to end. Elsewhere (SQLite), an ordinary transaction.
    """
    if conn.dialect.name != "postgresql":
        with conn.begin():
            yield
        return
    try:
        yield
    except BaseException:
        if conn.in_transaction() and not conn.invalidated:
            conn.rollback()
        raise
    if conn.in_transaction():
        conn.commit()


# The connection a worker process runs its runs on, per store, kept from one run to the
# next: checking one out of the pool first pings the server (pool_pre_ping), a round trip
# per run. A kept connection found dead at the claim is replaced (see execute_run).
_KEPT: dict[tuple[Engine, int], Connection] = {}


@contextmanager
def kept_connection(engine: Engine) -> Iterator[Connection]:
    """This process's kept connection to the store, for work between two runs.

    A worker process holds one connection to the store; whatever it does besides
    its runs (topping the window up, handing runs back) borrows that one.
    """
    conn = _KEPT.pop((engine, os.getpid()), None)
    if conn is None or conn.closed or conn.invalidated:
        conn = _connect(engine)
    try:
        yield conn
    finally:
        if conn.in_transaction():
            conn.rollback()
        _keep(engine, conn)


def _connect(engine: Engine) -> Connection:
    conn = engine.connect()
    if conn.dialect.name == "postgresql":
        # The claim and a run's final write are single statements there (atomic on their
        # own): without BEGIN and COMMIT each is one round trip. See _ClaimedRun.transaction.
        conn.execution_options(isolation_level="AUTOCOMMIT")
    return conn


def _keep(engine: Engine, conn: Connection) -> None:
    if conn.closed:
        return
    if conn.invalidated or conn.in_transaction():
        conn.close()
        return
    if not event.contains(engine, "engine_disposed", _drop_kept):
        event.listen(engine, "engine_disposed", _drop_kept)
    if _KEPT.setdefault((engine, os.getpid()), conn) is not conn:
        conn.close()  # another thread of this process kept one first


def _drop_kept(engine: Engine) -> None:
    # Only this process's: a forked child must not close the sockets of its parent's.
    conn = _KEPT.pop((engine, os.getpid()), None)
    if conn is not None:
        conn.close()


class _ClaimedRun:
    """The worker's side of one claimed run: the metric buffer, the clocks and the writes."""

    def __init__(
        self,
        claim: Claim,
        settings: Settings,
        conn: Connection,
        *,
        autocommit: bool = False,
        before_progress: Callable[[], None] | None = None,
    ) -> None:
        self.claim = claim
        self.before_progress = before_progress
        self.settings = settings
        self.conn = conn
        self.engine = conn.engine
        self.autocommit = autocommit
        self.buffer: list[dict[str, Any]] = []
        # Whether the run may have artifacts to replace: a checkpoint of this or an earlier attempt.
        self.has_artifacts = claim.resumes

    def train(self) -> Outcome | _Final:
        """Train the run: its result to write (``write_final``), or what became of it."""
        claim, settings = self.claim, self.settings
        raw = dict(claim.config)
        time_limit = raw.pop(TIME_LIMIT_KEY, None)
        config = TrainConfig.from_dict(raw)
        data = _load_data(config, self.conn.engine)
        state = self._resume() if claim.resumes else None
        trainer = Trainer(config, data, state=state)

        start = time.monotonic()
        next_flush = start + settings.metrics_flush_seconds
        next_beat = start + settings.heartbeat_seconds
        next_checkpoint = start + settings.checkpoint_seconds
        deadline = start + float(time_limit) if time_limit else None
        batch_rows = settings.metrics_batch_rows
        stop_reason: str | None = None
        status: RunStatus | None = None
        for record in trainer.steps():
            if record is not None:
                self.buffer.append(record)
            if handback.requested():
                return self._hand_back(trainer)
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                status, stop_reason = RunStatus.succeeded, "time_limit"
                break
            checkpoint_due = now >= next_checkpoint
            if not (
                checkpoint_due
                or now >= next_beat
                or len(self.buffer) >= batch_rows
                or (self.buffer and now >= next_flush)
            ):
                continue
            checkpoint = trainer.checkpoint() if checkpoint_due else None
            beat = self._save(checkpoint, trainer.step)
            now = time.monotonic()
            next_flush = now + settings.metrics_flush_seconds
            next_beat = now + settings.heartbeat_seconds
            if checkpoint_due:
                next_checkpoint = now + settings.checkpoint_seconds
            if beat is Beat.lost:
                log.warning("run %d: no longer ours (reset or taken over); stopping", claim.run_id)
                return Outcome(claim.run_id, "lost")
            if beat is Beat.cancel:
                status, stop_reason = RunStatus.cancelled, "cancelled"
                break

        # A cancelled or time-limited run keeps the weights and summary it reached.
        result = trainer.result()
        if status is None:
            status, stop_reason = RunStatus(result.outcome), result.stop_reason

        return self._final(
            status,
            stop_reason,
            records=self.buffer,
            weights=result.weights,
            weight_shapes=result.shapes,
            summary=result.summary,
        )

    def unstarted(self, status: RunStatus, stop_reason: str) -> _Final:
        """The result of a claimed run ended before it started (cancelled while it waited)."""
        return self._final(status, stop_reason)

    def _final(self, status: RunStatus, stop_reason: str | None, **result: Any) -> _Final:
        claim = self.claim
        kwargs = {
            "run_id": claim.run_id,
            "worker": claim.worker,
            "attempt": claim.attempt,
            "status": status,
            "stop_reason": stop_reason,
            "has_artifacts": self.has_artifacts,
            **result,
        }
        return _Final(self, status, stop_reason, kwargs)

    def write_final(self, final: _Final) -> Outcome:
        """Write the run's result on its own (retried while the store's connection is lost)."""

        def finish() -> bool:
            with _one_write(self.conn):
                return finish_run(session=self.conn, **final.kwargs)

        owned = self._retrying("final write", finish)
        if not owned and self._finished_by_us(final.status):
            owned = True  # an earlier try committed; only its reply was lost with the connection
        return self.finished(final, owned)

    def finished(self, final: _Final, owned: bool) -> Outcome:
        """What became of the run once its result was written (``owned``) or refused."""
        run_id = self.claim.run_id
        if not owned:
            log.warning("run %d: finished but no longer ours; result discarded", run_id)
            return Outcome(run_id, "lost")
        log.info("run %d: %s (%s)", run_id, final.status.value, final.stop_reason)
        return Outcome(run_id, final.status.value, final.stop_reason or "")

    def _hand_back(self, trainer: Trainer) -> Outcome:
        """This worker is stopping: checkpoint now and queue the run again, to resume elsewhere."""
        claim = self.claim
        step = trainer.step
        if self._save(trainer.checkpoint(), step) is Beat.lost:
            return Outcome(claim.run_id, "lost")
        with self.transaction():
            released = release_run(
                session=self.conn,
                run_id=claim.run_id,
                worker=claim.worker,
                attempt=claim.attempt,
                step=step,
            )
        if not released:
            return Outcome(claim.run_id, "lost")
        log.info("run %d: handed back at step %d (worker stopping)", claim.run_id, step)
        return Outcome(claim.run_id, HANDED_BACK, f"step {step}")

    def fail(self, error: str) -> Outcome:
        claim = self.claim
        if self.conn.in_transaction():
            self.conn.rollback()
        # Keep the buffered metrics if they can be written; they help explain the failure.
        for records in (self.buffer, []):
            try:
                with self.conn.begin():
                    owned = finish_run(
                        session=self.conn,
                        run_id=claim.run_id,
                        worker=claim.worker,
                        attempt=claim.attempt,
                        status=RunStatus.failed,
                        records=records,
                        stop_reason="error",
                        error=error,
                        has_artifacts=self.has_artifacts,
                    )
                return Outcome(claim.run_id, "failed" if owned else "lost", error.splitlines()[-1])
            except Exception:
                log.exception("run %d: could not record the failure", claim.run_id)
        return Outcome(claim.run_id, "lost", "could not record the failure")

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """A transaction for several statements, also on a connection otherwise in autocommit."""
        conn = self.conn
        if self.autocommit:
            conn.execution_options(isolation_level=conn.default_isolation_level)
        try:
            with conn.begin():
                yield
        finally:
            if self.autocommit:
                conn.execution_options(isolation_level="AUTOCOMMIT")

    def _retrying(self, what: str, write: Callable[[], Any]) -> Any:
        """``write()``, again on a new connection while the store's connection is lost.

        Every write of a run is safe to repeat: metric rows keep their first value, a
        checkpoint replaces the last, and the final write and the heartbeat are guarded
        by the claim. Waits grow from 0.1 s to 5 s; after ``MLPQ_STORE_RETRY_SECONDS``
        the last error is raised (``StoreLost``: the run is left to the reaper).
        """
        started = time.monotonic()
        deadline = started + self.settings.store_retry_seconds
        delay = 0.1
        lost = False
        while True:
            try:
                if self.conn.closed:  # the last reconnection found the store still down
                    self.conn = _connect(self.engine)
                result = write()
                if lost:
                    log.info(
                        "run %d: store reconnected; the %s stalled %.2fs",
                        self.claim.run_id,
                        what,
                        time.monotonic() - started,
                    )
                return result
            except Exception as exc:
                lost = True
                if not connection_lost(exc):
                    raise
                if time.monotonic() + delay > deadline:
                    raise StoreLost(f"{what}: {_first_line(exc)}") from exc
                log.warning(
                    "run %d: store connection lost during the %s (%s); reconnecting in %.1fs",
                    self.claim.run_id,
                    what,
                    _first_line(exc),
                    delay,
                )
                with contextlib.suppress(Exception):
                    self.conn.close()
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    def _finished_by_us(self, status: RunStatus) -> bool:
        """Whether the run is already final with this claim's attempt (a write whose reply
        was lost)."""
        from sqlalchemy import select

        from service.store import Run

        row = self.conn.execute(
            select(Run.status, Run.attempt).where(Run.id == self.claim.run_id)
        ).first()
        if self.conn.in_transaction():
            self.conn.rollback()
        return row is not None and row.status == status and row.attempt == self.claim.attempt

    def _resume(self) -> bytes | None:
        return self._retrying("resume", self._resume_once)

    def _resume_once(self) -> bytes | None:
        claim = self.claim
        with self.transaction():
            resume = prepare_resume(session=self.conn, run_id=claim.run_id)
            record_resume(
                session=self.conn,
                run_id=claim.run_id,
                worker=claim.worker,
                attempt=claim.attempt,
                step=resume.step,
            )
        log.info("run %d: resuming from step %d", claim.run_id, resume.step)
        return resume.checkpoint

    def _save(self, checkpoint: bytes | None, step: int) -> Beat:
        if self.before_progress is not None:
            self.before_progress()  # results of the pack's earlier runs go first
        return self._retrying("progress write", lambda: self._save_once(checkpoint, step))

    def _save_once(self, checkpoint: bytes | None, step: int) -> Beat:
        claim = self.claim
        with self.transaction():
            beat = save_progress(
                session=self.conn,
                run_id=claim.run_id,
                worker=claim.worker,
                attempt=claim.attempt,
                records=self.buffer,
                checkpoint=checkpoint,
                checkpoint_step=step if checkpoint is not None else None,
            )
        if beat is not Beat.lost:
            self.buffer = []
            self.has_artifacts = self.has_artifacts or checkpoint is not None
        return beat


def _load_data(config: TrainConfig, engine: Engine) -> Any:
    c = config
    # A CSV's name is the hash of its bytes: the name stands for them in the key, and
    # the bytes are fetched only to load a split that is not kept already.
    csv = c.dataset.removeprefix("csv:") if c.dataset.startswith("csv:") else None
    return _DATASETS.get(
        (c.dataset, c.seed, c.val_fraction, c.dtype, c.target, c.task),
        lambda: load_dataset(
            c.dataset,
            seed=c.seed,
            val_fraction=c.val_fraction,
            dtype=c.dtype,
            csv=None if csv is None else _csv_bytes(csv, engine),
            target=c.target,
            task=c.task,
        ),
    )


#: Bytes of datasets a worker process keeps loaded (most recently used first).
DATASET_CACHE_BYTES = 64 * 2**20
#: Bytes of stored CSV files a worker process keeps, to split again without a read.
CSV_CACHE_BYTES = 64 * 2**20


def _freeze(data: Any) -> int:
    """Make ``data``'s arrays read-only (runs share it); their bytes."""
    nbytes = 0
    for array in vars(data).values():
        if isinstance(array, np.ndarray):
            array.setflags(write=False)
            nbytes += array.nbytes
    return nbytes


class _SizedCache:
    """Values by key, least recently used out once their sizes pass ``limit`` bytes.

    The runs of a grid share (dataset, seed) pairs, often far apart in the queue (a
    grid of 3 learning rates x 100 seeds puts 100 runs between the two of one
    seed): a worker process loads each pair once while its copies fit in
    ``limit`` bytes, however many small ones that is. ``measure`` gives a new
    value's size (for datasets, ``_freeze``: their arrays become read-only, so no
    run can change another's data). A value larger than ``limit`` is kept alone.
    """

    def __init__(self, limit: int, measure: Callable[[Any], int] = _freeze) -> None:
        self.limit = limit
        self.measure = measure
        self.size = 0
        self._items: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()

    def get(self, key: Hashable, load: Callable[[], Any]) -> Any:
        hit = self._items.get(key)
        if hit is not None:
            self._items.move_to_end(key)
            return hit[0]
        value = load()
        nbytes = self.measure(value)
        self._items[key] = (value, nbytes)
        self.size += nbytes
        while self.size > self.limit and len(self._items) > 1:
            _, (_, dropped) = self._items.popitem(last=False)
            self.size -= dropped
        return value


_DATASETS = _SizedCache(DATASET_CACHE_BYTES)
_CSVS = _SizedCache(CSV_CACHE_BYTES, len)


def _csv_bytes(sha256: str, engine: Engine) -> bytes:
    # Content-addressed, so a kept copy can never be out of date, whichever store it came from.
    from service.store import load_dataset_bytes

    return _CSVS.get(sha256, lambda: load_dataset_bytes(engine, sha256))
