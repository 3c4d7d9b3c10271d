"""Scaling down: a worker told to stop (SIGTERM) hands its runs back at once.

Real ``celery worker`` processes on a Redis db and a PostgreSQL schema of the
test's own, started with the environment `mlpq worker` gives them
(``REMAP_SIGTERM=SIGQUIT``). The stale age is left long (60 s), so a run that
moves on within seconds was handed back, not reaped.
"""

from __future__ import annotations

import signal
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
from worker_testlib import run_rows, wait_for

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
