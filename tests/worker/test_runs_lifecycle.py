"""The run lifecycle data functions (service.store.runs) on SQLite and PostgreSQL."""

from __future__ import annotations

import io
import math
import subprocess
import threading
from datetime import datetime, timedelta
from typing import Any

import numpy as np
import pytest
from sqlalchemy import Engine, select
from worker_testlib import TINY_BACKPROP, add_runs, metric_steps, run_rows

from engine.metrics import RECORD_FIELDS
from service.queue import pending_ids
from service.store import (
    Artifact,
    ArtifactKind,
    Beat,
    Claim,
    Refusal,
    Run,
    RunStatus,
    cancel_experiment,
    claim_run,
    finish_run,
    heartbeat,
    metrics,
    prepare_resume,
    reap_stale,
    requeue_dead_owners,
    reset_finished,
    save_progress,
    utcnow,
    worker_identity,
)

STALE = 60.0


def _npz(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _records(steps: range) -> list[dict[str, float | int]]:
    return [{"step": s, "train_loss": 1.0 / s, "val_loss": 1.0 / s} for s in steps]


def _claim(engine: Engine, run_id: int, worker: str, **kw: object) -> Claim | Refusal:
    from service.store import session_scope

    kw.setdefault("stale_seconds", STALE)
    kw.setdefault("max_attempts", 3)
    with session_scope(engine) as session:
        return claim_run(session=session, run_id=run_id, worker=worker, **kw)


def _session(engine: Engine):
    from service.store import session_scope

    return session_scope(engine)


def test_claim_takes_a_queued_run_once(store_engine: Engine) -> None:
    (run_id,) = add_runs(store_engine, [TINY_BACKPROP])
    first = _claim(store_engine, run_id, "host-a:1")
    second = _claim(store_engine, run_id, "host-b:2")
    assert isinstance(first, Claim)
    assert first.attempt == 1
    assert first.config["dataset"] == "moons"
    assert isinstance(second, Refusal)
    assert "is running on host-a:1" in second.reason
    row = run_rows(store_engine)[run_id]
    assert (RunStatus(row.status), row.worker, row.attempt) == (RunStatus.running, "host-a:1", 1)
    assert row.started_at is not None and row.published


def test_claim_refuses_missing_and_finished_runs(store_engine: Engine) -> None:
    (run_id,) = add_runs(store_engine, [TINY_BACKPROP])
    missing = _claim(store_engine, run_id + 1000, "w:1")
    assert isinstance(missing, Refusal) and "does not exist" in missing.reason
    claim = _claim(store_engine, run_id, "w:1")
    with _session(store_engine) as session:
        assert finish_run(
            session=session,
            run_id=run_id,
            worker="w:1",
            attempt=claim.attempt,
            status=RunStatus.succeeded,
        )
    again = _claim(store_engine, run_id, "w:2")
    assert isinstance(again, Refusal) and "already succeeded" in again.reason


def test_a_pack_is_claimed_at_once_and_each_refusal_says_why(store_engine: Engine) -> None:
    from service.store import claim_runs

    queued, other, finished, stale, busy = add_runs(
        store_engine, [{**TINY_BACKPROP, "seed": seed} for seed in range(5)]
    )
    claim = _claim(store_engine, finished, "w:1")
    with _session(store_engine) as session:
        finish_run(
            session=session,
            run_id=finished,
            worker="w:1",
            attempt=claim.attempt,
            status=RunStatus.succeeded,
        )
    _claim(store_engine, stale, "gone:1", now=utcnow() - timedelta(seconds=STALE + 1))
    _claim(store_engine, busy, "busy:1")
    missing = busy + 1000
    with _session(store_engine) as session:
        got = claim_runs(
            session=session,
            run_ids=[queued, finished, missing, stale, busy, other],
            worker="w:2",
            stale_seconds=STALE,
            max_attempts=3,
        )
    assert [type(g).__name__ for g in got] == [
        "Claim",
        "Refusal",
        "Refusal",
        "Claim",
        "Refusal",
        "Claim",
    ]
    assert [g.run_id for g in got] == [queued, finished, missing, stale, busy, other]
    assert "already succeeded" in got[1].reason and "does not exist" in got[2].reason
    assert "is running on busy:1" in got[4].reason
    assert [g.attempt for g in (got[0], got[3], got[5])] == [1, 2, 1]
    assert got[5].config["seed"] == 1
    rows = run_rows(store_engine)
    assert {rows[i].worker for i in (queued, stale, other)} == {"w:2"}
    assert rows[busy].worker == "busy:1"


def test_stale_run_is_taken_over_and_the_old_worker_writes_nothing(store_engine: Engine) -> None:
    (run_id,) = add_runs(store_engine, [TINY_BACKPROP])
    old = _claim(store_engine, run_id, "host-a:1")
    assert isinstance(old, Claim)
    later = utcnow() + timedelta(seconds=STALE + 1)
    new = _claim(store_engine, run_id, "host-b:2", now=later)
    assert isinstance(new, Claim) and new.attempt == 2
    with _session(store_engine) as session:
        beat = save_progress(
            session=session,
            run_id=run_id,
            worker="host-a:1",
            attempt=1,
            records=_records(range(1, 4)),
        )
    assert beat is Beat.lost
    assert metric_steps(store_engine, run_id) == []
    with _session(store_engine) as session:
        assert not finish_run(
            session=session,
            run_id=run_id,
            worker="host-a:1",
            attempt=1,
            status=RunStatus.succeeded,
            weights=_npz(W0=np.zeros((2, 3))),
        )
    row = run_rows(store_engine)[run_id]
    assert (RunStatus(row.status), row.worker) == (RunStatus.running, "host-b:2")


def test_run_of_a_dead_local_process_is_taken_over_at_once(store_engine: Engine) -> None:
    (run_id,) = add_runs(store_engine, [TINY_BACKPROP])
    gone = subprocess.Popen(["true"])
    gone.wait()
    dead_owner = f"{worker_identity().rpartition(':')[0]}:{gone.pid}"
    assert isinstance(_claim(store_engine, run_id, dead_owner), Claim)
    taken = _claim(store_engine, run_id, worker_identity())
    assert isinstance(taken, Claim) and taken.attempt == 2


def test_runs_of_dead_local_processes_are_requeued_and_others_left_alone(
    store_engine: Engine,
) -> None:
    dead_run, live_run, remote_run = add_runs(
        store_engine, [{**TINY_BACKPROP, "seed": s} for s in range(3)]
    )
    gone = subprocess.Popen(["true"])
    gone.wait()
    host = worker_identity().rpartition(":")[0]
    _claim(store_engine, dead_run, f"{host}:{gone.pid}")
    _claim(store_engine, live_run, worker_identity())
    _claim(store_engine, remote_run, "elsewhere:1")
    with _session(store_engine) as session:
        assert requeue_dead_owners(session=session) == [dead_run]
    rows = run_rows(store_engine)
    assert RunStatus(rows[dead_run].status) is RunStatus.queued
    assert not rows[dead_run].published and rows[dead_run].attempt == 1
    assert {RunStatus(rows[i].status) for i in (live_run, remote_run)} == {RunStatus.running}


def test_run_that_used_up_its_attempts_is_failed_with_the_reason(store_engine: Engine) -> None:
    (run_id,) = add_runs(store_engine, [TINY_BACKPROP])
    now = utcnow()
    for attempt in range(1, 3):
        claim = _claim(store_engine, run_id, f"h:{attempt}", max_attempts=2, now=now)
        assert isinstance(claim, Claim) and claim.attempt == attempt
        now += timedelta(seconds=STALE + 1)
    refused = _claim(store_engine, run_id, "h:9", max_attempts=2, now=now)
    assert isinstance(refused, Refusal) and "used up 2 attempt" in refused.reason
    row = run_rows(store_engine)[run_id]
    assert RunStatus(row.status) is RunStatus.failed
    assert "gave up after 2 attempt" in row.error


def test_cancel_drops_queued_runs_and_asks_running_ones_to_stop(store_engine: Engine) -> None:
    queued, running = add_runs(store_engine, [TINY_BACKPROP, {**TINY_BACKPROP, "seed": 1}])
    claim = _claim(store_engine, running, "w:1")
    exp_id = run_rows(store_engine)[queued].experiment_id
    with _session(store_engine) as session:
        result = cancel_experiment(session=session, experiment_id=exp_id)
    assert (result.cancelled, result.requested) == (1, 1)
    refused = _claim(store_engine, queued, "w:2")
    assert isinstance(refused, Refusal) and "already cancelled" in refused.reason
    with _session(store_engine) as session:
        beat = heartbeat(session=session, run_id=running, worker="w:1", attempt=claim.attempt)
    assert beat is Beat.cancel


def test_progress_checkpoint_and_resume_keep_metric_steps_consistent(store_engine: Engine) -> None:
    (run_id,) = add_runs(store_engine, [TINY_BACKPROP])
    claim = _claim(store_engine, run_id, "w:1")
    ckpt = _npz(W0=np.ones((2, 8)), step=np.array(5))
    with _session(store_engine) as session:
        assert (
            save_progress(
                session=session,
                run_id=run_id,
                worker="w:1",
                attempt=claim.attempt,
                records=_records(range(1, 6)),
                checkpoint=ckpt,
                checkpoint_step=5,
            )
            is Beat.owned
        )
    with _session(store_engine) as session:
        save_progress(
            session=session,
            run_id=run_id,
            worker="w:1",
            attempt=claim.attempt,
            records=_records(range(6, 9)),
        )
    assert metric_steps(store_engine, run_id) == list(range(1, 9))
    with _session(store_engine) as session:
        resume = prepare_resume(session=session, run_id=run_id)
    assert resume.step == 5 and resume.checkpoint == ckpt
    # Steps after the checkpoint are written again by the resumed training.
    assert metric_steps(store_engine, run_id) == list(range(1, 6))
    with _session(store_engine) as session:
        shapes = session.execute(
            select(Artifact.shapes).where(Artifact.run_id == run_id)
        ).scalar_one()
    assert shapes == {"W0": [2, 8], "step": []}


def test_finish_writes_result_in_one_go_and_drops_the_checkpoint(store_engine: Engine) -> None:
    (run_id,) = add_runs(store_engine, [TINY_BACKPROP])
    claim = _claim(store_engine, run_id, "w:1")
    with _session(store_engine) as session:
        save_progress(
            session=session,
            run_id=run_id,
            worker="w:1",
            attempt=claim.attempt,
            records=_records(range(1, 3)),
            checkpoint=_npz(a=np.zeros(1)),
            checkpoint_step=2,
        )
    weights = _npz(W0=np.ones((2, 8)), b0=np.zeros(8))
    with _session(store_engine) as session:
        assert finish_run(
            session=session,
            run_id=run_id,
            worker="w:1",
            attempt=claim.attempt,
            status=RunStatus.succeeded,
            records=_records(range(3, 5)),
            weights=weights,
            summary={"final_val_loss": 0.25, "iterations": 4},
            stop_reason="max_steps",
        )
    row = run_rows(store_engine)[run_id]
    assert RunStatus(row.status) is RunStatus.succeeded
    assert (row.final_val_loss, row.iterations, row.stop_reason) == (0.25, 4, "max_steps")
    assert row.finished_at is not None
    assert metric_steps(store_engine, run_id) == [1, 2, 3, 4]
    with _session(store_engine) as session:
        arts = session.execute(
            select(Artifact.kind, Artifact.data).where(Artifact.run_id == run_id)
        ).all()
    assert [(ArtifactKind(k), d) for k, d in arts] == [(ArtifactKind.weights, weights)]


def _full_record(step: int) -> dict[str, Any]:
    """A record as the engine makes it: every field, None where a metric does not apply."""
    record: dict[str, Any] = dict.fromkeys(RECORD_FIELDS)
    record.update(
        step=step,
        train_loss=1 / (3 * step),
        val_loss=None if step == 5 else 2 / (7 * step),  # some steps only
        train_accuracy=np.float32(0.5),
        evaluations=step + 1,  # an int in a float column
        elapsed=math.inf if step == 6 else 1e-300 * step,
        grad_norm=-0.0,
    )
    return record


def test_final_metrics_keep_stored_steps_and_store_every_value_exactly(
    store_engine: Engine,
) -> None:
    (run_id,) = add_runs(store_engine, [TINY_BACKPROP])
    claim = _claim(store_engine, run_id, "w:1")
    with _session(store_engine) as session:
        save_progress(
            session=session,
            run_id=run_id,
            worker="w:1",
            attempt=claim.attempt,
            records=_records(range(1, 4)),
        )
    # Steps 2 and 3 again, with other values (a worker whose flush committed unseen).
    records = [_full_record(step) for step in range(2, 7)]
    with _session(store_engine) as session:
        assert finish_run(
            session=session,
            run_id=run_id,
            worker="w:1",
            attempt=claim.attempt,
            status=RunStatus.succeeded,
            records=records,
            has_artifacts=False,
        )
    with store_engine.connect() as conn:
        rows = conn.execute(select(metrics).where(metrics.c.run_id == run_id).order_by("step"))
        stored = {row.step: row._asdict() for row in rows}
    assert sorted(stored) == [1, 2, 3, 4, 5, 6]
    for step in (1, 2, 3):  # the first value stays
        assert (stored[step]["train_loss"], stored[step]["evaluations"]) == (1.0 / step, None)
    for step in (4, 5, 6):
        expected = {name: _full_record(step)[name] for name in RECORD_FIELDS}
        assert {name: stored[step][name] for name in RECORD_FIELDS} == expected


@pytest.mark.postgres
def test_final_metrics_keep_nan_and_negative_zero_on_postgresql(pg_store_url: str) -> None:
    from service.store import make_engine

    engine = make_engine(pg_store_url)
    try:
        (run_id,) = add_runs(engine, [TINY_BACKPROP])
        claim = _claim(engine, run_id, "w:1")
        record = {**_full_record(1), "val_accuracy": math.nan}
        with _session(engine) as session:
            assert finish_run(
                session=session,
                run_id=run_id,
                worker="w:1",
                attempt=claim.attempt,
                status=RunStatus.succeeded,
                records=[record],
            )
        with engine.connect() as conn:
            nan, zero = conn.execute(select(metrics.c.val_accuracy, metrics.c.grad_norm)).one()
        assert math.isnan(nan) and math.copysign(1.0, zero) == -1.0
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_a_lost_connection_is_invalidated_and_the_next_claim_reconnects(
    pg_store_url: str,
) -> None:
    from sqlalchemy.exc import DBAPIError

    from service.store import make_engine

    engine = make_engine(pg_store_url)
    try:
        first, second = add_runs(engine, [TINY_BACKPROP, {**TINY_BACKPROP, "seed": 1}])
        conn = engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        claim = claim_run(
            session=conn, run_id=first, worker="w:1", stale_seconds=STALE, max_attempts=3
        )
        assert isinstance(claim, Claim)
        pid = conn.connection.driver_connection.info.backend_pid
        with engine.connect() as admin:
            admin.exec_driver_sql(f"SELECT pg_terminate_backend({pid}, 10000)")
        with pytest.raises(DBAPIError) as lost:
            finish_run(
                session=conn,
                run_id=first,
                worker="w:1",
                attempt=claim.attempt,
                status=RunStatus.succeeded,
                records=_records(range(1, 3)),
            )
        assert lost.value.connection_invalidated and conn.invalidated
        again = claim_run(
            session=conn, run_id=second, worker="w:1", stale_seconds=STALE, max_attempts=3
        )
        assert isinstance(again, Claim)
        assert conn.connection.driver_connection.info.backend_pid != pid
        conn.close()
        assert RunStatus(run_rows(engine)[first].status) is RunStatus.running  # nothing written
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_a_refused_final_write_raises_and_leaves_the_connection_usable(pg_store_url: str) -> None:
    from sqlalchemy.exc import DataError

    from service.store import make_engine

    engine = make_engine(pg_store_url)
    try:
        (run_id,) = add_runs(engine, [TINY_BACKPROP])
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            claim = claim_run(
                session=conn, run_id=run_id, worker="w:1", stale_seconds=STALE, max_attempts=3
            )
            finish = dict(
                session=conn,
                run_id=run_id,
                worker="w:1",
                attempt=claim.attempt,
                status=RunStatus.failed,
            )
            with pytest.raises(DataError) as refused:
                finish_run(**finish, error="a NUL \x00 in the traceback")
            assert not refused.value.connection_invalidated and not conn.invalidated
            assert finish_run(**finish, error="the traceback")
        assert run_rows(engine)[run_id].error == "the traceback"
    finally:
        engine.dispose()


def test_reap_requeues_stale_runs_and_settles_cancelled_and_exhausted(
    store_engine: Engine,
) -> None:
    ids = add_runs(store_engine, [{**TINY_BACKPROP, "seed": s} for s in range(4)])
    for run_id in ids[:3]:
        _claim(store_engine, run_id, "gone:1")
    with _session(store_engine) as session:
        session.execute(
            Run.__table__.update().where(Run.id == ids[1]).values(cancel_requested=True)
        )
        session.execute(Run.__table__.update().where(Run.id == ids[2]).values(attempt=3))
    later = utcnow() + timedelta(seconds=STALE + 1)
    with _session(store_engine) as session:
        fresh = reap_stale(session=session, stale_seconds=STALE, max_attempts=3)
        result = reap_stale(session=session, stale_seconds=STALE, max_attempts=3, now=later)
    assert fresh.requeued == [] and fresh.failed == 0
    assert (result.requeued, result.cancelled, result.failed) == ([ids[0]], 1, 1)
    rows = run_rows(store_engine)
    assert [RunStatus(rows[i].status) for i in ids] == [
        RunStatus.queued,
        RunStatus.cancelled,
        RunStatus.failed,
        RunStatus.queued,
    ]
    # The requeued run waits, unsent, for the window beside the never-claimed one.
    assert pending_ids(engine=store_engine) == [ids[0], ids[3]]


def test_lost_runs_are_those_published_well_before_a_run_in_progress(
    store_engine: Engine,
) -> None:
    from service.queue import lost_runs, mark_for_resend

    ids = add_runs(store_engine, [{**TINY_BACKPROP, "seed": s} for s in range(4)])
    t0 = utcnow() - timedelta(seconds=100)
    with store_engine.begin() as conn:
        for run_id, age in zip(ids, (0, 3, 35, 40), strict=True):
            conn.execute(
                Run.__table__.update()
                .where(Run.id == run_id)
                .values(published=True, published_at=t0 + timedelta(seconds=age))
            )

    def lost(queue_empty: bool, now: datetime) -> list[int]:
        with store_engine.connect() as conn:
            return lost_runs(conn, grace_seconds=10, queue_empty=queue_empty, now=now)

    # Nothing in progress and a queue that holds messages: nothing can be told lost.
    assert lost(False, utcnow()) == []
    # The queue is empty: whatever went out over 10 s before now (+40 s) is gone.
    assert lost(True, t0 + timedelta(seconds=40)) == ids[:2]
    assert lost(True, t0 + timedelta(seconds=46)) == ids[:3]
    # Run 3 (published at +40 s) is training: runs published over 10 s before it were
    # skipped by the queue (oldest first), so their messages are gone; run 2 (+35 s) is not.
    _claim(store_engine, ids[3], "w:1")
    assert lost(False, utcnow()) == ids[:2]
    with store_engine.begin() as conn:
        assert mark_for_resend(conn, ids[:2]) == 2
        assert mark_for_resend(conn, ids[:2]) == 0  # unsent already
    assert pending_ids(engine=store_engine) == ids[:2]
    assert lost(False, utcnow()) == []


@pytest.mark.postgres
def test_two_reapers_racing_never_requeue_the_same_run(pg_store_url: str) -> None:
    from service.store import make_engine

    engine = make_engine(pg_store_url, pool_size=4)
    try:
        ids = add_runs(engine, [{**TINY_BACKPROP, "seed": s} for s in range(40)])
        for run_id in ids:
            _claim(engine, run_id, "gone:1")
        later = utcnow() + timedelta(seconds=STALE + 1)
        got: list[list[int]] = []
        barrier = threading.Barrier(2)

        def reap() -> None:
            barrier.wait()
            with _session(engine) as session:
                got.append(
                    reap_stale(
                        session=session, stale_seconds=STALE, max_attempts=3, now=later
                    ).requeued
                )

        threads = [threading.Thread(target=reap) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(got[0] + got[1]) == ids
        assert not set(got[0]) & set(got[1])
    finally:
        engine.dispose()


def test_reset_finished_starts_failed_runs_over(store_engine: Engine) -> None:
    failed, diverged = add_runs(store_engine, [TINY_BACKPROP, {**TINY_BACKPROP, "seed": 1}])
    for run_id, status in ((failed, RunStatus.failed), (diverged, RunStatus.diverged)):
        claim = _claim(store_engine, run_id, "w:1")
        with _session(store_engine) as session:
            finish_run(
                session=session,
                run_id=run_id,
                worker="w:1",
                attempt=claim.attempt,
                status=status,
                records=_records(range(1, 4)),
                error="boom",
            )
    exp_id = run_rows(store_engine)[failed].experiment_id
    with _session(store_engine) as session:
        ids = reset_finished(session=session, experiment_id=exp_id, statuses=[RunStatus.failed])
    assert ids == [failed]
    rows = run_rows(store_engine)
    assert RunStatus(rows[failed].status) is RunStatus.queued
    assert (rows[failed].attempt, rows[failed].error, rows[failed].published) == (0, None, False)
    assert RunStatus(rows[diverged].status) is RunStatus.diverged
    assert metric_steps(store_engine, failed) == []
    assert metric_steps(store_engine, diverged) == [1, 2, 3]
