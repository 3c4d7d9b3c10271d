"""A lost store connection never fails a run: real workers, real PostgreSQL, killed backends.

The test terminates every backend of the workers' store (by their application name)
again and again while a grid trains; the runs reconnect and carry on. Its own
queries go through a connection of another application name, which the killing
spares. The stale age is long, so nothing here is rescued by the reaper.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url
from test_workers_integration import (
    LONG_RUN,
    Cluster,
    _assert_steps_contiguous,
    _loss_series,
    _reference_series,
)

from service.store import RunStatus, make_engine

pytestmark = [pytest.mark.slow, pytest.mark.redis, pytest.mark.postgres]


@pytest.fixture
def cluster(pg_store_url: str, redis_url: str, tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(pg_store_url, redis_url, tmp_path / "home", tmp_path)
    c.settings.update(stale_seconds=60, heartbeat_seconds=0.1, metrics_flush_seconds=0.1)
    # The test's own connection is not one of the workers'.
    observer = make_url(pg_store_url).update_query_dict({"application_name": "mlpq-observer"})
    c.engine.dispose()
    c.engine = make_engine(observer.render_as_string(hide_password=False))
    try:
        yield c
    finally:
        c.close()


class Terminator(threading.Thread):
    """Terminates the backends of ``app_name`` every ``every`` seconds until stopped."""

    def __init__(self, url: str, app_name: str, every: float) -> None:
        super().__init__(daemon=True)
        admin_url = make_url(url).update_query_dict({"application_name": "mlpq-terminator"})
        self.engine = make_engine(admin_url.render_as_string(hide_password=False))
        self.app_name, self.every = app_name, every
        self.killed = 0
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.wait(self.every):
            with self.engine.begin() as conn:
                self.killed += sum(
                    conn.execute(
                        text(
                            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                            "WHERE application_name = :app AND pid <> pg_backend_pid()"
                        ),
                        {"app": self.app_name},
                    ).scalars()
                )

    def stop(self) -> None:
        self.halt.set()
        self.join(timeout=10)
        self.engine.dispose()


def test_terminated_store_connections_never_fail_a_run(cluster: Cluster, pg_store_url: str) -> None:
    configs = [{**LONG_RUN, "seed": seed, "max_steps": 600} for seed in range(6)]
    workers = [cluster.start_worker(f"w{i}", concurrency=2, app="paced_app") for i in range(2)]
    app_name = make_url(pg_store_url).query["application_name"]
    terminator = Terminator(pg_store_url, app_name, every=0.7)
    ids = cluster.submit(configs)
    terminator.start()
    started = time.monotonic()
    try:
        rows = cluster.wait_finished(ids, timeout=120)
    finally:
        terminator.stop()
    elapsed = time.monotonic() - started
    logs = "".join(w.log() for w in workers)
    assert terminator.killed >= 6, terminator.killed
    assert "store connection lost during the" in logs  # a kill landed mid-run
    for run_id, config in zip(ids, configs, strict=True):
        row = rows[run_id]
        assert RunStatus(row.status) is RunStatus.succeeded, row.error
        assert row.attempt == 1  # carried on in place: no run was retried or reaped
        _assert_steps_contiguous(cluster.engine, run_id, config["max_steps"])
        np.testing.assert_allclose(
            _loss_series(cluster.engine, run_id), _reference_series(config), rtol=1e-9
        )
    print(
        f"store faults: {terminator.killed} backends terminated, grid done in {elapsed:.1f}s; "
        f"{_stalls(logs)}"
    )


def _stalls(logs: str) -> str:
    """How long the runs' writes waited for the store, from the workers' reconnect lines."""
    import re

    stalls = sorted(float(s) for s in re.findall(r"stalled ([0-9.]+)s", logs))
    if not stalls:
        return "no write stalled"
    median = stalls[len(stalls) // 2]
    return f"{len(stalls)} writes stalled, median {median:.2f}s, longest {stalls[-1]:.2f}s"


# -- a PostgreSQL server of the test's own, restarted mid-grid ------------------------------


class OwnPostgres:
    """A throwaway PostgreSQL cluster (initdb) on a free port, run as the postgres user."""

    def __init__(self, root: Path, port: int) -> None:
        import glob
        import shutil

        bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
        if not bins or not shutil.which("runuser"):
            pytest.fail("a PostgreSQL server of the test's own needs pg_ctl and runuser")
        self.bin = Path(bins[-1]).parent
        self.root, self.port = root, port
        self.data = root / "data"
        root.mkdir(parents=True, exist_ok=True)
        shutil.chown(root, "postgres", "postgres")
        self._as_postgres(
            str(self.bin / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "root", "--no-sync"
        )
        self.url = f"postgresql+psycopg://root@127.0.0.1:{port}/postgres"

    def _as_postgres(self, *argv: str) -> None:
        import subprocess

        subprocess.run(
            ["runuser", "-u", "postgres", "--", *argv], check=True, capture_output=True, timeout=60
        )

    def _ctl(self, *args: str) -> None:
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._as_postgres(
            str(self.bin / "pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.root / "log"),
            "-o",
            options,
            "-w",
            *args,
        )

    def start(self) -> None:
        self._ctl("start")

    def restart(self) -> None:
        self._ctl("-m", "fast", "restart")

    def stop(self) -> None:
        self._ctl("-m", "immediate", "stop")


@pytest.fixture
def own_postgres(unused_port: int) -> Iterator[OwnPostgres]:
    import shutil
    import tempfile

    # Not under pytest's tmp_path: the postgres user must be able to reach the folder.
    root = Path(tempfile.mkdtemp(prefix="mlpq-pg-"))
    root.chmod(0o755)
    server = OwnPostgres(root / "pg", unused_port)
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_a_store_server_restart_mid_grid_fails_no_run(
    own_postgres: OwnPostgres, redis_url: str, tmp_path: Path
) -> None:
    from service.store import upgrade

    engine = make_engine(own_postgres.url)
    upgrade(engine)
    engine.dispose()
    cluster = Cluster(own_postgres.url, redis_url, tmp_path / "home", tmp_path)
    cluster.settings.update(stale_seconds=60, heartbeat_seconds=0.1, metrics_flush_seconds=0.1)
    try:
        configs = [{**LONG_RUN, "seed": seed, "max_steps": 600} for seed in range(4)]
        workers = [cluster.start_worker("w1", concurrency=2, app="paced_app")]
        ids = cluster.submit(configs)
        time.sleep(1.0)  # the first runs are training
        restarted = time.monotonic()
        own_postgres.restart()
        down = time.monotonic() - restarted
        rows = cluster.wait_finished(ids, timeout=120)
        logs = "".join(w.log() for w in workers)
        assert "store connection lost during the" in logs
        for run_id, config in zip(ids, configs, strict=True):
            row = rows[run_id]
            assert RunStatus(row.status) is RunStatus.succeeded, row.error
            assert row.attempt == 1
            _assert_steps_contiguous(cluster.engine, run_id, config["max_steps"])
        assert "store reconnected" in logs
        print(f"store restart: server down {down:.2f}s, grid done; {_stalls(logs)}")
    finally:
        cluster.close()
