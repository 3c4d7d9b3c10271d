"""The window with real workers: Redis holds a few messages, the store the grid.

Real ``celery worker`` processes (prefork) on a PostgreSQL schema and a Redis of
the test's own; a 5,000-run grid of tiny runs submitted through ``submit`` with a
window of 50 messages: the workers top the window up from SQL as they finish.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy import text
from test_workers_integration import Cluster
from worker_testlib import wait_for

from service.grids import expand_grid, parse_grid
from service.queue import QUEUE, pending_ids, submit
from service.store import RunStatus, cancel_experiment, session_scope

pytestmark = [pytest.mark.slow, pytest.mark.redis, pytest.mark.postgres]

WINDOW = 50


def tiny_grid(runs: int, name: str = "window"):
    data = {
        "name": name,
        "datasets": ["moons"],
        "model": {"hidden": [[8]], "activation": "tanh"},
        "seeds": runs,
        "budget": {"epochs": 5},
        "optimizers": [{"optimizer": "backprop", "learning_rate": 0.1, "batch_size": 64}],
    }
    return expand_grid(parse_grid(data, source="grid.yaml"))


def windowed(store_url: str, broker_url: str, tmp_path: Path) -> Cluster:
    c = Cluster(store_url, broker_url, tmp_path / "home", tmp_path)
    # About three tiny runs a message; stale age 3 s (a lost message is re-sent within it).
    c.settings.update(window=WINDOW, pack_seconds=0.01)
    from service.queue import make_app
    from service.settings import load_settings

    c.app = make_app(load_settings(**c.settings))
    return c


class QueuePeak:
    """The longest the train queue got, sampled every 10 ms in a thread."""

    def __init__(self, url: str) -> None:
        self.client = redis.Redis.from_url(url)
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            with contextlib.suppress(redis.RedisError):  # the server is being restarted
                self.peak = max(self.peak, self.client.llen(QUEUE))

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(timeout=5)
        self.client.close()
        return self.peak


def counts_by_status(c: Cluster, experiment_id: int) -> dict[str, int]:
    with c.engine.connect() as conn:
        rows = conn.execute(
            text("SELECT status, count(*) FROM runs WHERE experiment_id = :e GROUP BY status"),
            {"e": experiment_id},
        )
        return {RunStatus(s).value if not isinstance(s, str) else s: n for s, n in rows}


def assert_each_run_once_with_contiguous_metrics(c: Cluster, experiment_id: int) -> None:
    with c.engine.connect() as conn:
        bad = conn.execute(
            text(
                "SELECT r.id, r.max_steps, count(m.step), min(m.step), max(m.step) "
                "FROM runs r LEFT JOIN metrics m ON m.run_id = r.id "
                "WHERE r.experiment_id = :e GROUP BY r.id, r.max_steps "
                "HAVING count(m.step) <> r.max_steps OR min(m.step) <> 1 "
                "OR max(m.step) <> r.max_steps"
            ),
            {"e": experiment_id},
        ).all()
        artifacts = conn.execute(
            text(
                "SELECT a.kind, count(*), count(DISTINCT a.run_id) FROM artifacts a "
                "JOIN runs r ON r.id = a.run_id WHERE r.experiment_id = :e GROUP BY a.kind"
            ),
            {"e": experiment_id},
        ).all()
    assert bad == [], bad[:5]
    runs = sum(counts_by_status(c, experiment_id).values())
    assert [(k, n, d) for k, n, d in artifacts] == [("weights", runs, runs)]


@pytest.fixture
def cluster(pg_store_url: str, redis_url: str, tmp_path: Path) -> Iterator[Cluster]:
    c = windowed(pg_store_url, redis_url, tmp_path)
    try:
        yield c
    finally:
        c.close()


def finished(c: Cluster, experiment_id: int, total: int, timeout: float) -> dict[str, int]:
    def done() -> bool:
        counts = counts_by_status(c, experiment_id)
        return counts.get("queued", 0) + counts.get("running", 0) == 0 and (
            sum(counts.values()) == total
        )

    try:
        wait_for(done, timeout=timeout, what=f"{total} runs to finish", every=0.25)
    except AssertionError:
        logs = "\n".join(w.log()[-3000:] for w in c.workers)
        raise AssertionError(
            f"not finished: {counts_by_status(c, experiment_id)}\n{logs}"
        ) from None
    return counts_by_status(c, experiment_id)


def test_a_windowed_grid_runs_each_run_once_while_a_worker_child_is_killed(
    cluster: Cluster, redis_url: str
) -> None:
    c = cluster
    c.start_worker("w1")
    peak = QueuePeak(redis_url)
    report = submit(grid=tiny_grid(5000), engine=c.engine, app=c.app)
    # Submit stored the grid and sent only the window: the rest waits in SQL.
    assert report.new == 5000 and 0 < report.published < 5000
    assert report.unsent == 5000 - report.published
    wait_for(
        lambda: counts_by_status(c, report.experiment_id).get("succeeded", 0) >= 1500,
        timeout=120,
        what="a third of the runs",
        every=0.1,
    )

    def kill_a_training_process() -> list[int]:
        """SIGKILL a worker child in the middle of a pack; the runs it held unwritten.

        The rows of the runs it claimed are locked first: it can neither write their
        results nor finish its pack and claim another before it dies, so the set is exact.
        Without waiting (NOWAIT): while the child is writing results, it holds some of
        those rows, and waiting for them could deadlock with it; then try again.
        """
        from sqlalchemy.exc import OperationalError

        try:
            return lock_and_kill()
        except OperationalError as exc:
            if getattr(exc.orig, "sqlstate", None) != "55P03":  # lock_not_available
                raise
            return []

    def lock_and_kill() -> list[int]:
        with c.engine.connect() as conn, conn.begin():
            # A tiny run trains for milliseconds: between two packs no run is running.
            owner = conn.execute(
                text("SELECT worker FROM runs WHERE status = 'running' LIMIT 1")
            ).scalar()
            if owner is None:
                return []
            held = (
                conn.execute(
                    text(
                        "SELECT id FROM runs WHERE status = 'running' AND worker = :owner "
                        "FOR UPDATE NOWAIT"
                    ),
                    {"owner": owner},
                )
                .scalars()
                .all()
            )
            if held:
                os.kill(int(owner.rpartition(":")[2]), signal.SIGKILL)
            return list(held)

    held = wait_for(kill_a_training_process, timeout=30, what="a run in training", every=0.005)

    counts = finished(c, report.experiment_id, 5000, timeout=240)
    assert peak.stop() <= WINDOW
    assert counts == {"succeeded": 5000}
    assert_each_run_once_with_contiguous_metrics(c, report.experiment_id)
    with c.engine.connect() as conn:
        attempts = dict(conn.execute(text("SELECT id, attempt FROM runs")).all())
    # Only runs of the pack the killed child held (claimed, results not written) were
    # claimed twice; every other run once.
    twice = {run_id for run_id, attempt in attempts.items() if attempt == 2}
    assert set(attempts.values()) <= {1, 2}
    assert twice <= set(held), (sorted(twice), sorted(held))
    # The workers topped the window up: many publishes, none above the window.
    with c.engine.connect() as conn:
        rounds = conn.execute(text("SELECT count(DISTINCT published_at) FROM runs")).scalar()
    assert rounds > 20


def test_cancel_in_the_middle_of_a_windowed_grid_stops_it(cluster: Cluster, redis_url: str) -> None:
    c = cluster
    c.start_worker("w1")
    report = submit(grid=tiny_grid(5000), engine=c.engine, app=c.app)
    wait_for(
        lambda: counts_by_status(c, report.experiment_id).get("succeeded", 0) >= 300,
        timeout=120,
        what="the first runs",
        every=0.1,
    )
    with session_scope(c.engine) as session:
        result = cancel_experiment(session=session, experiment_id=report.experiment_id)
    cancelled_at = time.time()
    assert result.cancelled > 4000
    counts = finished(c, report.experiment_id, 5000, timeout=60)
    assert counts.get("succeeded", 0) < 1000 and counts["cancelled"] >= result.cancelled
    assert pending_ids(engine=c.engine) == []  # nothing left for the window
    client = redis.Redis.from_url(redis_url)
    # The messages left in the window are taken and dropped (their runs are cancelled).
    wait_for(lambda: client.llen(QUEUE) == 0, timeout=30, what="the window to drain")
    client.close()
    with c.engine.connect() as conn:
        late = conn.execute(
            text(
                "SELECT count(*) FROM runs WHERE started_at > to_timestamp(:t) "
                "AND status = 'succeeded'"
            ),
            {"t": cancelled_at + 1.0},
        ).scalar()
    assert late == 0


def test_a_redis_restart_without_persistence_mid_window_still_finishes_the_grid(
    pg_store_url: str, volatile_redis_server: Any, tmp_path: Path
) -> None:
    server = volatile_redis_server
    c = windowed(pg_store_url, server.url, tmp_path)
    try:
        c.start_worker("w1")
        report = submit(grid=tiny_grid(2000), engine=c.engine, app=c.app)
        wait_for(
            lambda: counts_by_status(c, report.experiment_id).get("succeeded", 0) >= 300,
            timeout=120,
            what="the first runs",
            every=0.1,
        )
        server.stop()  # nothing on disk: the window's messages are gone
        time.sleep(1.0)
        server.start()
        counts = finished(c, report.experiment_id, 2000, timeout=150)
        assert counts == {"succeeded": 2000}
        assert_each_run_once_with_contiguous_metrics(c, report.experiment_id)
        # The runs of the lost messages were found by the store and sent again.
        lost = [int(n) for n in re.findall(r"\((\d+) whose message was lost\)", c.workers[0].log())]
        assert sum(lost) > 0, c.workers[0].log()[-3000:]
    finally:
        c.close()
        server.stop()
