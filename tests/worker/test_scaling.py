"""Scaling down: a worker told to stop (SIGTERM) hands its runs back at once.

Real ``celery worker`` processes on a Redis db and a PostgreSQL schema of the
test's own, started with the environment `mlpq worker` gives them
(``REMAP_SIGTERM=SIGQUIT``). The stale age is left long (60 s), so a run that
moves on within seconds was handed back, not reaped.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from test_workers_integration import (
    LONG_RUN,
    Cluster,
    _artifact_kinds,
    _assert_steps_contiguous,
    _loss_series,
    _reference_series,
)
from worker_testlib import MlpqWorker, run_rows, wait_for

from service.store import RunStatus

pytestmark = [pytest.mark.slow, pytest.mark.redis, pytest.mark.postgres]

#: Stale age of these tests: far above the seconds a hand-back may take.
STALE_SECONDS = 60


@pytest.fixture
def cluster(pg_store_url: str, redis_url: str, tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(pg_store_url, redis_url, tmp_path / "home", tmp_path)
    c.settings.update(stale_seconds=STALE_SECONDS, checkpoint_seconds=30)
    try:
        yield c
    finally:
        c.close()


def test_sigterm_hands_running_runs_back_and_another_worker_resumes_them_from_checkpoints(
    cluster: Cluster,
) -> None:
    configs = [LONG_RUN, {**LONG_RUN, "seed": 8}]
    leaving = cluster.start_worker("leaving", concurrency=2, app="paced_app")
    ids = cluster.submit(configs)

    def both_past_step_100() -> bool:
        rows = run_rows(cluster.engine, ids)
        return all(
            r.status == RunStatus.running and r.heartbeat_at is not None for r in rows.values()
        ) and all(_last_step(cluster, i) >= 100 for i in ids)

    wait_for(both_past_step_100, timeout=60, what="both runs to train 100 steps")
    # No checkpoint yet (checkpoint_seconds=30): the hand-back must write one itself.
    assert all(_artifact_kinds(cluster.engine, i) == [] for i in ids)

    stopped_at = time.monotonic()
    leaving.proc.send_signal(signal.SIGTERM)
    leaving.proc.wait(timeout=15)
    exit_seconds = time.monotonic() - stopped_at
    log = leaving.log()
    rows = run_rows(cluster.engine, ids)
    for run_id in ids:
        assert f"run {run_id}: handed back at step" in log, log[-3000:]
        row = rows[run_id]
        assert RunStatus(row.status) is RunStatus.queued
        assert row.worker is None and row.attempt == 0
        assert row.resumed_from_step > 0
        assert _artifact_kinds(cluster.engine, run_id) == ["checkpoint"]
    assert exit_seconds < 10, f"the stopping worker took {exit_seconds:.1f}s to exit"
    print(f"hand-back: SIGTERM to worker exit {exit_seconds:.2f}s")

    taker = cluster.start_worker("taker", concurrency=2)
    done = cluster.wait_finished(ids, timeout=STALE_SECONDS - 10)
    for run_id, config in zip(ids, configs, strict=True):
        row = done[run_id]
        assert RunStatus(row.status) is RunStatus.succeeded, row.error
        assert row.attempt == 1  # the hand-back gave its attempt back
        assert row.worker.startswith("taker") or "taker" in taker.log()
        assert f"run {run_id}: resuming from step {rows[run_id].resumed_from_step}" in taker.log()
        _assert_steps_contiguous(cluster.engine, run_id, config["max_steps"])
        assert _artifact_kinds(cluster.engine, run_id) == ["weights"]
        np.testing.assert_allclose(
            _loss_series(cluster.engine, run_id), _reference_series(config), rtol=1e-9
        )


def _last_step(cluster: Cluster, run_id: int) -> int:
    from sqlalchemy import func, select

    from service.store import metrics

    with cluster.engine.connect() as conn:
        return conn.execute(
            select(func.coalesce(func.max(metrics.c.step), 0)).where(metrics.c.run_id == run_id)
        ).scalar_one()


# --- many workers, one store ---------------------------------------------------------------

#: Short runs of the 200-run grid, and the long ones the test stops and kills workers in.
SHORT_RUN = {**LONG_RUN, "max_steps": 30}
LONG_EVERY = 5  # every 5th of the first 100 runs is a LONG_RUN (1,500 steps)


def _running_long_run(cluster: Cluster, worker: MlpqWorker, ids: list[int]) -> int | None:
    """A long run one of ``worker``'s processes trains past step 100, if any."""
    children = {str(pid) for pid in worker.children()}
    for run_id, row in run_rows(cluster.engine, ids).items():
        if (
            row.status == RunStatus.running
            and row.config["max_steps"] == LONG_RUN["max_steps"]
            and (row.worker or "").rpartition(":")[2] in children
            and _last_step(cluster, run_id) > 100
        ):
            return run_id
    return None


def test_four_workers_share_a_grid_one_stopped_one_child_killed_every_run_once(
    cluster: Cluster,
) -> None:
    cluster.settings.update(checkpoint_seconds=0.5)
    configs = [
        {**(LONG_RUN if i < 100 and i % LONG_EVERY == 0 else SHORT_RUN), "seed": i}
        for i in range(200)
    ]
    workers = [
        MlpqWorker(cluster.settings, cluster.log_dir, f"w{i}", concurrency=2) for i in range(4)
    ]
    try:
        for w in workers:
            wait_for(lambda w=w: "ready." in w.log(), timeout=60, what=f"{w.name} to start")
        started = time.monotonic()
        ids = cluster.submit(configs)

        def checkpointed_long_run() -> tuple[MlpqWorker, int] | None:
            for w in workers:
                run_id = _running_long_run(cluster, w, ids)
                if run_id is not None and "checkpoint" in _artifact_kinds(cluster.engine, run_id):
                    return w, run_id
            return None

        crashing, killed = wait_for(checkpointed_long_run, timeout=60, what="a checkpoint")
        owner = run_rows(cluster.engine, [killed])[killed].worker
        os.kill(int(owner.rpartition(":")[2]), signal.SIGKILL)

        def long_run_elsewhere() -> tuple[MlpqWorker, int] | None:
            for w in workers:
                run_id = _running_long_run(cluster, w, ids) if w is not crashing else None
                if run_id is not None:
                    return w, run_id
            return None

        leaving, handed = wait_for(long_run_elsewhere, timeout=60, what="a long run elsewhere")
        stopped = time.monotonic()
        leaving.stop()
        assert f"run {handed}: handed back at step" in leaving.log()
        # Taken up again within seconds (it is queued with its message back), not after
        # the stale age: another worker claims it and resumes from the hand-back checkpoint.
        wait_for(
            lambda: any(f"run {handed}: resuming from step" in w.log() for w in workers),
            timeout=15,
            what="another worker to resume the handed-back run",
        )
        resumed_after = time.monotonic() - stopped
        print(f"hand-back: SIGTERM to resumed on another worker {resumed_after:.2f}s")

        rows = cluster.wait_finished(ids, timeout=STALE_SECONDS - 5)
        elapsed = time.monotonic() - started
    finally:
        for w in workers:
            w.stop()
    # Every run succeeded exactly once: one weights artifact, contiguous steps from 1.
    assert {RunStatus(r.status) for r in rows.values()} == {RunStatus.succeeded}
    for run_id, config in zip(ids, configs, strict=True):
        _assert_steps_contiguous(cluster.engine, run_id, config["max_steps"])
        assert _artifact_kinds(cluster.engine, run_id) == ["weights"]
    # Spread over all four; the handed-back and the killed run finished on other workers.
    claims = [w.claimed() for w in workers]
    assert all(claims), [len(c) for c in claims]
    assert rows[handed].resumed_from_step > 0 and rows[handed].attempt == 1
    assert rows[killed].resumed_from_step > 0 and rows[killed].attempt == 2
    assert rows[killed].worker != owner
    # Nothing waited for the stale timeout.
    assert resumed_after < STALE_SECONDS / 4 and elapsed < STALE_SECONDS


# --- connection budget ---------------------------------------------------------------------


def _pg_sockets_by_pid(pids: set[int]) -> dict[int, int]:
    """Open TCP connections to PostgreSQL's port, per process of ``pids`` (from ``ss -tnp``)."""
    out = subprocess.run(
        ["ss", "-Htnp", "state", "established", "dport", "= :5432"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    counts = dict.fromkeys(pids, 0)
    for pid_text in re.findall(r"pid=(\d+)", out):
        if int(pid_text) in counts:
            counts[int(pid_text)] += 1
    return counts


def test_sixteen_worker_processes_hold_at_most_one_postgresql_connection_each(
    cluster: Cluster, pg_store_url: str
) -> None:
    from sqlalchemy import text
    from sqlalchemy.engine import make_url

    worker = MlpqWorker(cluster.settings, cluster.log_dir, "wide", concurrency=16)
    try:
        wait_for(lambda: "ready." in worker.log(), timeout=90, what="16 processes to start")
        ids = cluster.submit([{**SHORT_RUN, "seed": i} for i in range(96)])
        cluster.wait_finished(ids, timeout=STALE_SECONDS)
        children = worker.children()
        assert len(children) == 16
        per_process = _pg_sockets_by_pid({worker.proc.pid, *children})
        app_name = make_url(pg_store_url).query["application_name"]
        with cluster.engine.connect() as conn:
            in_server = conn.execute(
                text(
                    "SELECT count(*) FROM pg_stat_activity "
                    "WHERE application_name = :app AND pid <> pg_backend_pid()"
                ),
                {"app": app_name},
            ).scalar_one()
    finally:
        worker.stop()
    assert max(per_process.values()) <= 1, per_process
    # The runs spread over the processes, each on its one kept connection.
    assert sum(per_process.values()) >= 8
    # The server agrees: the worker's 17 processes, plus this test's own engine's pool.
    assert in_server <= 17 + 1
