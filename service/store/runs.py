"""The run lifecycle in SQL: claim, heartbeat, checkpoint, finish, cancel, retry, reap.

Every state change is one guarded UPDATE, so two workers (or two reapers) racing
on one run cannot both win: a worker owns a run while ``(worker, attempt)`` in
the row are its own, and every write it makes (metrics, checkpoint, result)
checks that in the same transaction. A worker that lost its run (it was too slow
to heartbeat and another worker took over, or the run was cancelled or reset)
writes nothing more.

Times are Python UTC timestamps, so every comparison uses one clock per writer;
``stale_seconds`` should be far above the clock skew between machines.
"""

from __future__ import annotations

import enum
import json
import os
import socket
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Any

from sqlalchemy import Connection, and_, bindparam, delete, func, insert, or_, select, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from engine.metrics import RECORD_FIELDS
from service.exceptions import NotFoundError
from service.store.models import (
    FINISHED,
    SUMMARY_COLUMNS,
    Artifact,
    ArtifactKind,
    Experiment,
    Run,
    RunStatus,
    metrics,
    utcnow,
)

# Stored in runs.error when a run used up its attempts without finishing.
ATTEMPTS_EXHAUSTED = (
    "gave up after {n} attempt(s): the worker running it stopped (killed, out of memory, "
    "lost machine or time limit) before it finished each time"
)


def worker_identity() -> str:
    """``host:pid`` of this process: what ``runs.worker`` holds while it trains a run."""
    return f"{socket.gethostname()}:{os.getpid()}"


def owner_is_dead(owner: str | None) -> bool:
    """True when ``owner`` (``host:pid``) is a process of this machine that no longer runs.

    Lets a worker take over at once a run whose previous worker process was
    killed on this machine (its message is redelivered immediately), instead of
    waiting for the heartbeat to go stale. Owners on other machines are never
    judged here: the stale heartbeat decides for them.
    """
    if not owner or ":" not in owner:
        return False
    host, _, pid_text = owner.rpartition(":")
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    try:
        # A killed child stays a zombie until its parent reaps it.
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (OSError, IndexError):
        return False


@dataclass(frozen=True)
class Claim:
    """A run this worker now owns."""

    run_id: int
    attempt: int
    worker: str
    config: dict[str, Any]
    #: Step of the checkpoint a worker handed the run back at (None: not handed back).
    handed_back_at: int | None = None

    @property
    def resumes(self) -> bool:
        """Whether an earlier attempt may have left a checkpoint to resume from."""
        return self.attempt > 1 or self.handed_back_at is not None


@dataclass(frozen=True)
class Refusal:
    """Why a message was dropped without training."""

    run_id: int
    reason: str


_runs = Run.__table__
_artifacts = Artifact.__table__
# The statements of a run's hot path are built once, with bind parameters: building
# SQLAlchemy statements per call costs more than a tiny run's training.
_CLAIM_VALUES: dict[str, Any] = {
    "status": RunStatus.running,
    "attempt": _runs.c.attempt + 1,
    "worker": bindparam("b_worker"),
    "heartbeat_at": bindparam("b_now"),
    "started_at": func.coalesce(_runs.c.started_at, bindparam("b_now")),
    "published": True,
}
# What makes a run claimable: queued, or running with a stale heartbeat; attempts left.
_CLAIMABLE = (
    or_(
        _runs.c.status == RunStatus.queued,
        and_(_runs.c.status == RunStatus.running, _runs.c.heartbeat_at < bindparam("b_cutoff")),
    ),
    _runs.c.attempt < bindparam("b_max_attempts"),
    ~_runs.c.cancel_requested,
)
_CLAIM = (
    update(_runs)
    .where(_runs.c.id == bindparam("b_id"), *_CLAIMABLE)
    .values(_CLAIM_VALUES)
    .returning(_runs.c.attempt, _runs.c.config, _runs.c.resumed_from_step)
)
# _CLAIM as PostgreSQL text for the driver (see _pg_first_row).
_PG_CLAIM = (
    f"UPDATE runs SET status = '{RunStatus.running.value}', attempt = attempt + 1, "
    "worker = %(b_worker)s, heartbeat_at = %(b_now)s, "
    "started_at = coalesce(started_at, %(b_now)s), published = true "
    f"WHERE id = %(b_id)s AND (status = '{RunStatus.queued.value}' "
    f"OR (status = '{RunStatus.running.value}' AND heartbeat_at < %(b_cutoff)s)) "
    "AND attempt < %(b_max_attempts)s AND NOT cancel_requested "
    "RETURNING attempt, config, resumed_from_step"
)
# The claim of every run of a pack at once: _CLAIM for a list of ids.
_CLAIM_MANY = (
    update(_runs)
    .where(_runs.c.id.in_(bindparam("b_ids", expanding=True)), *_CLAIMABLE)
    .values(_CLAIM_VALUES)
    .returning(_runs.c.id, _runs.c.attempt, _runs.c.config, _runs.c.resumed_from_step)
)
_PG_CLAIM_MANY = _PG_CLAIM.replace(
    "WHERE id = %(b_id)s", "WHERE id = ANY(%(b_ids)s::int4[])"
).replace("RETURNING attempt", "RETURNING id, attempt")
# Guards of every write a worker makes to a run it claimed.
_OWNED = (
    _runs.c.id == bindparam("b_id"),
    _runs.c.worker == bindparam("b_worker"),
    _runs.c.attempt == bindparam("b_attempt"),
    _runs.c.status == RunStatus.running,
)
_HEARTBEAT = (
    update(_runs)
    .where(*_OWNED)
    .values(heartbeat_at=bindparam("b_now"))
    .returning(_runs.c.cancel_requested)
)
_FINISH = (
    update(_runs)
    .where(*_OWNED)
    .values(
        status=bindparam("b_status"),
        finished_at=bindparam("b_now"),
        heartbeat_at=bindparam("b_now"),
        stop_reason=bindparam("b_stop_reason"),
        error=bindparam("b_error"),
        **{name: bindparam(f"b_{name}") for name in SUMMARY_COLUMNS},
    )
    .returning(_runs.c.id)
)
_DROP_ARTIFACTS = delete(_artifacts).where(_artifacts.c.run_id == bindparam("b_id"))
# A plain INSERT: finish_run drops the run's artifacts first (service.store.ingest.save_artifact's
# upsert costs more to build than a tiny run's whole final write).
_INSERT_WEIGHTS = insert(_artifacts).values(
    run_id=bindparam("b_id"),
    kind=ArtifactKind.weights,
    format="npz",
    shapes=bindparam("b_shapes"),
    step=None,
    data=bindparam("b_data"),
    size=bindparam("b_size"),
    created_at=bindparam("b_now"),
)
_RECORD_RESUME = update(_runs).where(*_OWNED).values(resumed_from_step=bindparam("b_step"))

# PostgreSQL's final write (see finish_run): parameters of the metric columns (arrays).
_PG_METRIC_PARAMS = tuple(f"m_{name}" for name in RECORD_FIELDS)


def _pg_first_row(conn: Connection, statement: str, params: dict[str, Any]) -> tuple | None:
    """``_pg_rows``' first row, or None."""
    rows = _pg_rows(conn, statement, params, first=True)
    return rows[0] if rows else None


def _pg_rows(
    conn: Connection, statement: str, params: dict[str, Any], *, first: bool = False
) -> list[tuple]:
    """Execute ``statement`` (psycopg ``%(name)s`` style) on ``conn``'s driver; its rows.

    The claim and the final write of a run skip SQLAlchemy's execution machinery,
    which costs more client CPU than psycopg itself (about 0.15 ms a statement), so
    no ``before_cursor_execute`` hook sees them. Prepared on first use. Errors are
    raised as ``exec_driver_sql`` would: a driver error as SQLAlchemy's, and a lost
    connection is invalidated first (``DBAPIError.connection_invalidated``: the
    worker reconnects on it).
    """
    driver = conn.connection.driver_connection
    if not (driver.autocommit or conn.in_transaction()):
        # Let SQLAlchemy begin the transaction, so the caller's commit() covers this statement.
        result = conn.exec_driver_sql(statement, params)
        if not first:
            return [tuple(row) for row in result.all()]
        row = result.first()  # and closes the result
        return [] if row is None else [tuple(row)]
    with _driver_errors(conn, statement, params), driver.cursor() as cursor:
        cursor.execute(statement, params, prepare=True)
        if not first:
            return cursor.fetchall()
        row = cursor.fetchone()
        return [] if row is None else [row]


@contextmanager
def _driver_errors(
    conn: Connection, statement: str, params: dict[str, Any] | None
) -> Iterator[None]:
    """Raise the driver's errors inside as ``exec_driver_sql`` would.

    A driver error becomes SQLAlchemy's, and a lost connection is invalidated first
    (``DBAPIError.connection_invalidated``: the worker reconnects on it).
    """
    driver_error = conn.dialect.loaded_dbapi.Error
    try:
        yield
    except driver_error as exc:
        lost = conn.dialect.is_disconnect(exc, conn.connection.driver_connection, None)
        if lost:
            conn.invalidate(exc)
        raise DBAPIError.instance(
            statement,
            params,
            exc,
            driver_error,
            hide_parameters=conn.engine.hide_parameters,
            connection_invalidated=lost,
            dialect=conn.dialect,
        ) from exc
    except BaseException as exc:
        if not isinstance(exc, Exception):
            # Interrupted mid-statement (SystemExit, KeyboardInterrupt): the connection's
            # state is unknown, so SQLAlchemy would not reuse it either.
            conn.invalidate(exc)
        raise


@lru_cache(maxsize=8)
def _pg_finish_statement(*, metrics: bool, weights: bool, drop: bool) -> str:
    """The one statement of a run's final write on PostgreSQL (psycopg placeholders).

    ``fin`` is the guarded UPDATE; every other part reads its id, so a worker that
    no longer owns the run writes nothing. Metric rows arrive as one binary array per
    column (``service.store.pg_ingest.pg_metric_arrays``); steps already stored stay.
    """
    summary = ", ".join(f"{name} = %(s_{name})s" for name in SUMMARY_COLUMNS)
    parts = [
        "fin AS (UPDATE runs SET status = %(status)s, finished_at = %(now)s, "
        "heartbeat_at = %(now)s, stop_reason = %(stop_reason)s, error = %(error)s, "
        f"{summary} WHERE id = %(id)s AND worker = %(worker)s AND attempt = %(attempt)s "
        f"AND status = '{RunStatus.running.value}' RETURNING id)"
    ]
    if drop:
        # The checkpoint goes. A weights row (none before a finish) is replaced by the
        # upsert below: one statement must not both delete and insert one row.
        keep = f" AND kind <> '{ArtifactKind.weights.value}'" if weights else ""
        parts.append(f"old AS (DELETE FROM artifacts WHERE run_id = (SELECT id FROM fin){keep})")
    if metrics:
        types = ["int4"] + ["float8"] * (len(RECORD_FIELDS) - 1)
        arrays = ", ".join(f"%({p})b::{t}[]" for p, t in zip(_PG_METRIC_PARAMS, types, strict=True))
        parts.append(
            f"m AS (INSERT INTO metrics (run_id, {', '.join(RECORD_FIELDS)}) "
            f"SELECT fin.id, u.* FROM fin, unnest({arrays}) AS u "
            "ON CONFLICT (run_id, step) DO NOTHING)"
        )
    if weights:
        parts.append(
            "w AS (INSERT INTO artifacts (run_id, kind, format, shapes, step, data, size, "
            f"created_at) SELECT id, '{ArtifactKind.weights.value}', 'npz', %(shapes)s::json, "
            "NULL, %(data)s::bytea, %(size)s, %(now)s FROM fin ON CONFLICT (run_id, kind) DO "
            "UPDATE SET format = excluded.format, shapes = excluded.shapes, step = NULL, "
            "data = excluded.data, size = excluded.size, created_at = excluded.created_at)"
        )
    # The commit does not wait for the WAL flush (synchronous_commit off for this one
    # transaction): a result lost to a server crash leaves the run `running` with the
    # heartbeat of its claim, and the stale-run reaper sends it again, so the result
    # is never lost, only trained twice. The claim, which nothing would repair, stays
    # synchronous.
    return (
        "WITH " + ", ".join(parts) + " SELECT fin.id FROM fin, "
        "(SELECT set_config('synchronous_commit', 'off', true)) AS async_commit"
    )


def claim_run(
    *,
    session: Session | Connection,
    run_id: int,
    worker: str,
    stale_seconds: float,
    max_attempts: int,
    now: datetime | None = None,
) -> Claim | Refusal:
    """Take ``run_id`` for ``worker`` if nobody else may be training it.

    A run is claimable when it is queued, or running with a heartbeat older than
    ``stale_seconds`` (or whose owner process is known dead on this machine). The
    common case is one UPDATE ... RETURNING; only a refused claim reads the row
    to say why (and fails a run that used up ``max_attempts``, or cancels a
    stale run whose cancel was requested).
    """
    now = now or utcnow()
    cutoff = now - timedelta(seconds=stale_seconds)
    params = {
        "b_id": run_id,
        "b_worker": worker,
        "b_now": now,
        "b_cutoff": cutoff,
        "b_max_attempts": max_attempts,
    }
    conn = session.connection() if isinstance(session, Session) else session
    if conn.dialect.name == "postgresql":
        row = _pg_first_row(conn, _PG_CLAIM, params)
    else:
        row = conn.execute(_CLAIM, params).first()
    if row is not None:
        attempt, config, handed_back_at = row
        return Claim(run_id, attempt, worker, config, handed_back_at)

    seen = session.execute(
        select(
            _runs.c.status,
            _runs.c.attempt,
            _runs.c.worker,
            _runs.c.heartbeat_at,
            _runs.c.cancel_requested,
        ).where(_runs.c.id == run_id)
    ).first()
    if seen is None:
        return Refusal(run_id, f"run {run_id} does not exist")
    status = RunStatus(seen.status)
    if status in FINISHED:
        return Refusal(run_id, f"run {run_id} is already {status.value}")
    heartbeat = _aware(seen.heartbeat_at)
    owner_gone = status is RunStatus.queued or (
        heartbeat is None or heartbeat < cutoff or owner_is_dead(seen.worker)
    )
    if not owner_gone:
        age = (now - heartbeat).total_seconds()
        return Refusal(
            run_id, f"run {run_id} is running on {seen.worker} (heartbeat {age:.1f}s ago)"
        )
    # Compare-and-set on what was read: if anyone changed the row since, this matches nothing.
    same_row = update(_runs).where(
        _runs.c.id == run_id,
        _runs.c.status == status,
        _runs.c.attempt == seen.attempt,
        _runs.c.worker.is_(None) if seen.worker is None else _runs.c.worker == seen.worker,
    )
    if seen.cancel_requested:
        values: dict[str, Any] = {"status": RunStatus.cancelled, "finished_at": now}
        outcome = f"run {run_id} was cancelled while its worker was gone; marked cancelled"
    elif seen.attempt >= max_attempts:
        values = {
            "status": RunStatus.failed,
            "finished_at": now,
            "error": ATTEMPTS_EXHAUSTED.format(n=seen.attempt),
        }
        outcome = f"run {run_id} used up {seen.attempt} attempt(s); marked failed"
    else:
        row = session.execute(
            same_row.values(_CLAIM_VALUES).returning(
                _runs.c.attempt, _runs.c.config, _runs.c.resumed_from_step
            ),
            {"b_worker": worker, "b_now": now},
        ).first()
        if row is None:
            return Refusal(run_id, f"run {run_id} was claimed by another worker meanwhile")
        return Claim(run_id, row.attempt, worker, row.config, row.resumed_from_step)
    session.execute(same_row.values(values))
    return Refusal(run_id, outcome)


def claim_runs(
    *,
    session: Session | Connection,
    run_ids: Sequence[int],
    worker: str,
    stale_seconds: float,
    max_attempts: int,
    now: datetime | None = None,
) -> list[Claim | Refusal]:
    """``claim_run`` for the runs of a pack, in their order: one statement claims them all.

    The common case (every run queued) is one UPDATE ... RETURNING, so a pack's claims
    cost one round trip and one synchronous commit together. A run the statement
    did not take goes through ``claim_run`` on its own, which says why or takes over
    a run whose owner is gone.
    """
    if len(run_ids) == 1:
        return [
            claim_run(
                session=session,
                run_id=run_ids[0],
                worker=worker,
                stale_seconds=stale_seconds,
                max_attempts=max_attempts,
                now=now,
            )
        ]
    now = now or utcnow()
    params = {
        "b_ids": list(run_ids),
        "b_worker": worker,
        "b_now": now,
        "b_cutoff": now - timedelta(seconds=stale_seconds),
        "b_max_attempts": max_attempts,
    }
    conn = session.connection() if isinstance(session, Session) else session
    if conn.dialect.name == "postgresql":
        rows = _pg_rows(conn, _PG_CLAIM_MANY, params)
    else:
        rows = conn.execute(_CLAIM_MANY, params).all()
    taken = {row[0]: Claim(row[0], row[1], worker, row[2], row[3]) for row in rows}
    return [
        taken.pop(run_id, None)
        or claim_run(
            session=session,
            run_id=run_id,
            worker=worker,
            stale_seconds=stale_seconds,
            max_attempts=max_attempts,
            now=now,
        )
        for run_id in run_ids
    ]


_REFRESH_CLAIMS = (
    f"UPDATE runs SET heartbeat_at = %(now)s FROM unnest(%(ids)s::int4[], %(attempts)s::int4[]) "
    "AS c(id, attempt) WHERE runs.id = c.id AND runs.attempt = c.attempt "
    f"AND worker = %(worker)s AND status = '{RunStatus.running.value}' "
    "RETURNING runs.id, cancel_requested"
)


def refresh_claims(
    *, session: Session | Connection, claims: Sequence[Claim], now: datetime | None = None
) -> dict[int, Beat]:
    """Heartbeat of claimed runs not started yet: what each ``heartbeat`` would say, at once."""
    if not claims:
        return {}
    now = now or utcnow()
    conn = session.connection() if isinstance(session, Session) else session
    if conn.dialect.name == "postgresql":
        params = {
            "now": now,
            "ids": [c.run_id for c in claims],
            "attempts": [c.attempt for c in claims],
            "worker": claims[0].worker,
        }
        rows = {row[0]: row[1] for row in _pg_rows(conn, _REFRESH_CLAIMS, params)}
        beats = {}
        for claim in claims:
            cancel = rows.get(claim.run_id)
            beats[claim.run_id] = (
                Beat.lost if cancel is None else Beat.cancel if cancel else Beat.owned
            )
        return beats
    return {
        c.run_id: heartbeat(
            session=session, run_id=c.run_id, worker=c.worker, attempt=c.attempt, now=now
        )
        for c in claims
    }


def release_claims(*, session: Session | Connection, claims: Sequence[Claim]) -> list[int]:
    """Give back claimed runs this worker did not start (it is stopping); the ids released.

    Each is queued again as it was before the claim: attempt given back, any hand-back
    step kept.
    """
    released = []
    for claim in claims:
        if release_run(
            session=session,
            run_id=claim.run_id,
            worker=claim.worker,
            attempt=claim.attempt,
            step=claim.handed_back_at,
        ):
            released.append(claim.run_id)
    return released


class Beat(enum.StrEnum):
    """What a heartbeat learned."""

    owned = "owned"  # keep training
    cancel = "cancel"  # cancel requested: stop and keep what was trained
    lost = "lost"  # another worker owns the run now (or it was reset): stop, write nothing


def heartbeat(
    *,
    session: Session | Connection,
    run_id: int,
    worker: str,
    attempt: int,
    now: datetime | None = None,
) -> Beat:
    """Refresh the heartbeat of a run this worker owns and say whether to go on."""
    row = session.execute(
        _HEARTBEAT,
        {"b_id": run_id, "b_worker": worker, "b_attempt": attempt, "b_now": now or utcnow()},
    ).first()
    if row is None:
        return Beat.lost
    return Beat.cancel if row.cancel_requested else Beat.owned


def save_progress(
    *,
    session: Session | Connection,
    run_id: int,
    worker: str,
    attempt: int,
    records: Sequence[dict[str, Any]],
    checkpoint: bytes | None = None,
    checkpoint_step: int | None = None,
) -> Beat:
    """Heartbeat, write buffered metric rows and optionally the checkpoint, in one transaction.

    The ownership check comes first: a worker that lost the run writes nothing.
    Metrics are written before the checkpoint, so a stored checkpoint never holds
    a step whose metrics are missing.
    """
    from service.store.ingest import save_artifact, write_metrics

    beat = heartbeat(session=session, run_id=run_id, worker=worker, attempt=attempt)
    if beat is Beat.lost:
        return beat
    if records:
        write_metrics(session, run_id, records)
    if checkpoint is not None:
        save_artifact(session, run_id, ArtifactKind.checkpoint, checkpoint, step=checkpoint_step)
    return beat


def release_run(
    *, session: Session | Connection, run_id: int, worker: str, attempt: int, step: int
) -> bool:
    """Hand a run this worker owns back to the queue, to resume from its checkpoint at ``step``.

    For a worker that is stopping (SIGTERM): the run is queued again with its
    claim cleared, and the attempt it used is given back (a scale-down is not a
    failure, so it does not count towards ``max_attempts``); ``resumed_from_step``
    tells the next claim to resume. False if the run was no longer ours.
    """
    result = session.execute(
        update(_runs)
        .where(*_OWNED)
        .values(
            status=RunStatus.queued,
            worker=None,
            heartbeat_at=None,
            attempt=_runs.c.attempt - 1,
            resumed_from_step=bindparam("b_step"),
        ),
        {"b_id": run_id, "b_worker": worker, "b_attempt": attempt, "b_step": step},
    )
    return result.rowcount == 1


@dataclass(frozen=True)
class Resume:
    """Where a reclaimed run starts again."""

    checkpoint: bytes | None
    step: int  # last step the checkpoint holds; 0 = start over


def prepare_resume(*, session: Session | Connection, run_id: int) -> Resume:
    """The run's last checkpoint, with metric rows after it deleted.

    Rows after the checkpoint came from a worker that died before its next
    checkpoint; the resumed training writes those steps again.
    """
    from service.store.ingest import load_artifact

    stored = load_artifact(session, run_id, ArtifactKind.checkpoint)
    step = int(stored.step or 0) if stored is not None else 0
    session.execute(delete(metrics).where(metrics.c.run_id == run_id, metrics.c.step > step))
    return Resume(checkpoint=stored.data if stored is not None else None, step=step)


def record_resume(
    *, session: Session | Connection, run_id: int, worker: str, attempt: int, step: int
) -> None:
    """Note in the run row the step a reclaimed run resumed from."""
    session.execute(
        _RECORD_RESUME, {"b_id": run_id, "b_worker": worker, "b_attempt": attempt, "b_step": step}
    )


def finish_run(
    *,
    session: Session | Connection,
    run_id: int,
    worker: str,
    attempt: int,
    status: RunStatus,
    records: Sequence[dict[str, Any]] = (),
    weights: bytes | None = None,
    summary: dict[str, Any] | None = None,
    stop_reason: str | None = None,
    error: str | None = None,
    has_artifacts: bool = True,
    weight_shapes: Mapping[str, Sequence[int]] | None = None,
    now: datetime | None = None,
) -> bool:
    """Write a run's outcome in one transaction: status, summary, last metrics, weights.

    Returns False (and writes nothing) when this worker no longer owns the run.
    The checkpoint goes: a finished run is never resumed. ``has_artifacts=False``
    (a first attempt that saved no checkpoint: every reset deletes a run's
    artifacts) skips that DELETE. ``weight_shapes`` (default: read from
    ``weights``) are the npz's array shapes, which the trainer knows.

    On PostgreSQL all of it is ONE statement (data-modifying CTEs guarded by the
    ownership UPDATE), so it is atomic even outside a transaction: a worker runs
    it in autocommit, one round trip for a run's whole result.
    """
    from service.store.ingest import write_metrics

    now, summary, weight_shapes = _final_defaults(now, summary, weights, weight_shapes)
    conn = session.connection() if isinstance(session, Session) else session
    if conn.dialect.name == "postgresql":
        return _finish_postgresql(
            conn,
            run_id=run_id,
            worker=worker,
            attempt=attempt,
            status=status,
            records=records,
            weights=weights,
            weight_shapes=weight_shapes,
            summary=summary,
            stop_reason=stop_reason,
            error=error,
            has_artifacts=has_artifacts,
            now=now,
        )
    params: dict[str, Any] = {
        "b_id": run_id,
        "b_worker": worker,
        "b_attempt": attempt,
        "b_status": status,
        "b_now": now,
        "b_stop_reason": stop_reason,
        "b_error": error,
        **{f"b_{name}": summary.get(name) for name in SUMMARY_COLUMNS},
    }
    if session.execute(_FINISH, params).first() is None:
        return False
    if records:
        write_metrics(session, run_id, records)
    if has_artifacts:
        session.execute(_DROP_ARTIFACTS, {"b_id": run_id})
    if weights is not None:
        session.execute(
            _INSERT_WEIGHTS,
            {
                "b_id": run_id,
                "b_shapes": {name: list(shape) for name, shape in weight_shapes.items()},
                "b_data": weights,
                "b_size": len(weights),
                "b_now": now,
            },
        )
    return True


def _final_defaults(
    now: datetime | None,
    summary: dict[str, Any] | None,
    weights: bytes | None,
    weight_shapes: Mapping[str, Sequence[int]] | None,
) -> tuple[datetime, dict[str, Any], Mapping[str, Sequence[int]] | None]:
    """``finish_run``'s defaults: now, no summary, the shapes read from the weights' npz."""
    from service.store.ingest import npz_shapes

    if weights is not None and weight_shapes is None:
        weight_shapes = npz_shapes(weights)
    return now or utcnow(), summary or {}, weight_shapes


def _finish_postgresql(conn: Connection, **kwargs: Any) -> bool:
    return _pg_first_row(conn, *_pg_finish(conn, **kwargs)) is not None


def _pg_finish(
    conn: Connection,
    *,
    run_id: int,
    worker: str,
    attempt: int,
    status: RunStatus,
    records: Sequence[dict[str, Any]],
    weights: bytes | None,
    weight_shapes: Mapping[str, Sequence[int]] | None,
    summary: dict[str, Any],
    stop_reason: str | None,
    error: str | None,
    has_artifacts: bool,
    now: datetime,
) -> tuple[str, dict[str, Any]]:
    """The statement of a run's final write on PostgreSQL, and its parameters."""
    from service.store.pg_ingest import pg_metric_arrays, register_pg_arrays

    statement = _pg_finish_statement(
        metrics=bool(records), weights=weights is not None, drop=has_artifacts
    )
    params: dict[str, Any] = {
        "id": run_id,
        "worker": worker,
        "attempt": attempt,
        "status": status.value,
        "now": now,
        "stop_reason": stop_reason,
        "error": error,
        **{f"s_{name}": summary.get(name) for name in SUMMARY_COLUMNS},
    }
    if records:
        register_pg_arrays(conn.connection.driver_connection)
        arrays = pg_metric_arrays(run_id, records)
        params.update(zip(_PG_METRIC_PARAMS, arrays, strict=True))
    if weights is not None:
        shapes = {name: list(shape) for name, shape in (weight_shapes or {}).items()}
        params.update(shapes=json.dumps(shapes), data=weights, size=len(weights))
    return statement, params


#: finish_run's optional arguments and their defaults.
_FINAL_OPTIONAL: dict[str, Any] = {
    "records": (),
    "weights": None,
    "summary": None,
    "stop_reason": None,
    "error": None,
    "has_artifacts": True,
    "weight_shapes": None,
    "now": None,
}


def finish_runs(*, session: Session | Connection, finals: Sequence[dict[str, Any]]) -> list[bool]:
    """``finish_run`` for several runs (each a dict of its arguments) in one transaction.

    On PostgreSQL the statements go in one pipeline: one round trip and one commit for
    a pack's results. All or nothing: an error writes none of them (the caller then
    writes them one by one, so one bad result fails its run alone). Returns, per
    final, whether the run was still ours (False: nothing of it written).
    """
    conn = session.connection() if isinstance(session, Session) else session
    if conn.dialect.name != "postgresql" or len(finals) < 2:
        return [finish_run(session=session, **final) for final in finals]
    statements = []
    for final in finals:
        final = {**_FINAL_OPTIONAL, **final}
        final["now"], final["summary"], final["weight_shapes"] = _final_defaults(
            final["now"], final["summary"], final["weights"], final["weight_shapes"]
        )
        statements.append(_pg_finish(conn, **final))
    driver = conn.connection.driver_connection
    if not driver.autocommit:
        return [_pg_first_row(conn, *statement) is not None for statement in statements]
    cursors = []
    try:
        # Autocommit: the statements up to the pipeline's one Sync are one implicit
        # transaction, committed at the Sync (asynchronously: see _pg_finish_statement).
        with _driver_errors(conn, statements[0][0], None):
            with driver.pipeline():
                for statement, params in statements:
                    cursor = driver.cursor()
                    cursors.append(cursor)
                    cursor.execute(statement, params, prepare=True)
            return [cursor.fetchone() is not None for cursor in cursors]
    finally:
        for cursor in cursors:
            cursor.close()


# --- experiment-level operations (cancel, retry, reap) --------------------------------


def get_experiment(*, session: Session, name: str) -> Experiment:
    """The experiment called ``name`` (or with id ``name``); NotFoundError otherwise."""
    exp = session.execute(select(Experiment).where(Experiment.name == name)).scalar_one_or_none()
    if exp is None and name.isdigit():
        exp = session.get(Experiment, int(name))
    if exp is None:
        raise NotFoundError(f"experiment: no experiment named {name!r} (see `mlpq ls`)")
    return exp


def status_counts(*, session: Session, experiment_id: int) -> dict[RunStatus, int]:
    """Number of runs of the experiment in each status (every status present as a key)."""
    counts = dict.fromkeys(RunStatus, 0)
    rows = session.execute(
        select(Run.status, func.count())
        .where(Run.experiment_id == experiment_id)
        .group_by(Run.status)
    )
    for status, n in rows:
        counts[RunStatus(status)] = n
    return counts


@dataclass(frozen=True)
class CancelResult:
    cancelled: int  # queued runs now cancelled (they will never start)
    requested: int  # running runs asked to stop at their next heartbeat


def cancel_experiment(
    *, session: Session, experiment_id: int, now: datetime | None = None
) -> CancelResult:
    """Cancel every unfinished run of an experiment.

    Queued runs become cancelled at once (a worker that receives their message
    drops it); running runs get ``cancel_requested`` and their worker stops them
    at its next heartbeat, keeping the metrics written so far.
    """
    now = now or utcnow()
    queued = session.execute(
        update(Run)
        .where(Run.experiment_id == experiment_id, Run.status == RunStatus.queued)
        .values(status=RunStatus.cancelled, finished_at=now, stop_reason="cancelled")
        .execution_options(synchronize_session=False)
    ).rowcount
    running = session.execute(
        update(Run)
        .where(
            Run.experiment_id == experiment_id,
            Run.status == RunStatus.running,
            ~Run.cancel_requested,
        )
        .values(cancel_requested=True)
        .execution_options(synchronize_session=False)
    ).rowcount
    return CancelResult(cancelled=queued, requested=running)


#: Chunk of run ids per statement (SQLite caps the parameters of one statement).
ID_CHUNK = 10_000

#: A run put back in the queue to start over: nothing of its earlier attempts remains.
RESET_TO_QUEUED: dict[str, Any] = {
    "status": RunStatus.queued,
    "published": False,
    "attempt": 0,
    "worker": None,
    "heartbeat_at": None,
    "started_at": None,
    "finished_at": None,
    "cancel_requested": False,
    "resumed_from_step": None,
    "stop_reason": None,
    "error": None,
    **dict.fromkeys(SUMMARY_COLUMNS),
}


def reset_finished(
    *, session: Session, experiment_id: int, statuses: Sequence[RunStatus]
) -> list[int]:
    """Put finished runs with one of ``statuses`` back in the queue, to start over.

    Their metrics and artifacts are deleted: a failed or diverged run resumed
    from its checkpoint would most likely fail the same way, and a fresh start
    keeps "one run = one training" true in the store. Returns their ids (still
    to be published).
    """
    if not statuses:
        return []
    ids = list(
        session.execute(
            update(Run)
            .where(Run.experiment_id == experiment_id, Run.status.in_(list(statuses)))
            .values(RESET_TO_QUEUED)
            .returning(Run.id)
            .execution_options(synchronize_session=False)
        ).scalars()
    )
    _delete_results(session, ids)
    return ids


def reset_runs(*, session: Session | Connection, run_ids: Sequence[int]) -> None:
    """Put ``run_ids`` back in the queue to start over (metrics and artifacts deleted)."""
    ids = list(run_ids)
    for start in range(0, len(ids), ID_CHUNK):
        chunk = ids[start : start + ID_CHUNK]
        session.execute(
            update(Run)
            .where(Run.id.in_(chunk))
            .values(RESET_TO_QUEUED)
            .execution_options(synchronize_session=False)
        )
    _delete_results(session, ids)


def _delete_results(session: Session | Connection, ids: list[int]) -> None:
    for start in range(0, len(ids), ID_CHUNK):
        chunk = ids[start : start + ID_CHUNK]
        session.execute(delete(metrics).where(metrics.c.run_id.in_(chunk)))
        session.execute(delete(Artifact.__table__).where(Artifact.__table__.c.run_id.in_(chunk)))


@dataclass(frozen=True)
class ReapResult:
    requeued: list[int]  # stale runs back in the queue (still to be published)
    failed: int  # stale runs that used up their attempts
    cancelled: int  # stale runs whose cancel had been requested


def reap_stale(
    *,
    session: Session | Connection,
    stale_seconds: float,
    max_attempts: int,
    experiment_id: int | None = None,
    now: datetime | None = None,
) -> ReapResult:
    """Find running runs whose heartbeat is older than ``stale_seconds`` and settle them.

    Their worker is presumed dead and their message may be gone (embedded queue,
    lost broker data), so they go back to the queue with their checkpoint kept
    (the next worker resumes it), unless they used up their attempts (failed) or
    were asked to cancel (cancelled). Each run is moved by one UPDATE ...
    RETURNING, so of two reapers racing only one gets (and publishes) it.
    """
    now = now or utcnow()
    cutoff = now - timedelta(seconds=stale_seconds)
    stale = [Run.status == RunStatus.running, Run.heartbeat_at < cutoff]
    if experiment_id is not None:
        stale.append(Run.experiment_id == experiment_id)
    cancelled = session.execute(
        update(Run)
        .where(*stale, Run.cancel_requested)
        .values(status=RunStatus.cancelled, finished_at=now, stop_reason="cancelled")
        .execution_options(synchronize_session=False)
    ).rowcount
    failed = session.execute(
        update(Run)
        .where(*stale, Run.attempt >= max_attempts)
        .values(
            status=RunStatus.failed,
            finished_at=now,
            error=ATTEMPTS_EXHAUSTED.format(n=max_attempts),
        )
        .execution_options(synchronize_session=False)
    ).rowcount
    requeued = list(
        session.execute(
            update(Run)
            .where(*stale)
            .values(status=RunStatus.queued, published=False, worker=None, heartbeat_at=None)
            .returning(Run.id)
            .execution_options(synchronize_session=False)
        ).scalars()
    )
    return ReapResult(requeued=sorted(requeued), failed=failed, cancelled=cancelled)


def requeue_dead_owners(*, session: Session | Connection) -> list[int]:
    """Put back in the queue the running runs whose worker process is dead on this machine.

    No need to wait for their heartbeat to go stale: ``owner_is_dead`` knows. Each
    run moves by a compare-and-set on its (worker, attempt), so a run another
    worker took meanwhile is left alone. Returns their ids (still to be published).
    """
    running = session.execute(
        select(_runs.c.id, _runs.c.worker, _runs.c.attempt).where(
            _runs.c.status == RunStatus.running
        )
    ).all()
    ids = []
    for run_id, owner, attempt in running:
        if not owner_is_dead(owner):
            continue
        moved = session.execute(
            update(_runs)
            .where(
                _runs.c.id == run_id,
                _runs.c.worker == owner,
                _runs.c.attempt == attempt,
                _runs.c.status == RunStatus.running,
            )
            .values(status=RunStatus.queued, published=False, worker=None, heartbeat_at=None)
        ).rowcount
        if moved:
            ids.append(run_id)
    return ids


def mark_unsent(*, session: Session | Connection, experiment_id: int) -> int:
    """Mark the experiment's queued runs as never sent, so the next publish sends them all.

    For messages the broker lost; a run whose message arrives twice is still
    trained once (the claim drops the second).
    """
    return session.execute(
        update(_runs)
        .where(_runs.c.experiment_id == experiment_id, _runs.c.status == RunStatus.queued)
        .values(published=False)
    ).rowcount


def queued_published(
    *, session: Session | Connection, published_before: datetime | None = None
) -> list[int]:
    """Ids of queued runs whose message was handed to the broker (and not yet claimed).

    ``published_before``: only runs whose message went out before then (a message just
    published may be in a worker's hands, between the broker and the claim).
    """
    query = select(Run.id).where(Run.status == RunStatus.queued, Run.published)
    if published_before is not None:
        query = query.where(Run.published_at < published_before)
    return list(session.execute(query.order_by(Run.id)).scalars())


def _aware(value: datetime | None) -> datetime | None:
    # SQLite hands back naive datetimes (stored in UTC); PostgreSQL aware ones.
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)
