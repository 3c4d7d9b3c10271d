"""Flower, Celery's monitoring UI, against our settings: it sees the workers and the runs."""

from __future__ import annotations

import ast
import base64
import json
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_workers_integration import Cluster
from worker_testlib import TINY_BACKPROP, MlpqWorker, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.redis, pytest.mark.postgres]


@pytest.fixture
def cluster(pg_store_url: str, redis_url: str, tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(pg_store_url, redis_url, tmp_path / "home", tmp_path)
    c.settings.update(task_events=True)
    try:
        yield c
    finally:
        c.close()


#: Flower's API answers only with authentication (compose sets the same option).
AUTH = ("watcher", "secret")


def _get(port: int, path: str) -> Any:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
    token = base64.b64encode(":".join(AUTH).encode()).decode()
    request.add_header("Authorization", f"Basic {token}")
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.loads(response.read())


def test_flower_lists_the_workers_and_the_train_tasks(
    cluster: Cluster, unused_port: int, tmp_path: Path
) -> None:
    from worker_testlib import worker_env

    worker = MlpqWorker(cluster.settings, cluster.log_dir, "watched", concurrency=2)
    log = open(tmp_path / "flower.log", "ab")  # noqa: SIM115
    flower = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "worker.app",
            "flower",
            f"--port={unused_port}",
            "--address=127.0.0.1",
            f"--basic-auth={':'.join(AUTH)}",
        ],
        env=worker_env(**cluster.settings),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for(lambda: "ready." in worker.log(), timeout=60, what="the worker to start")
        workers = wait_for(
            lambda: _try(lambda: _get(unused_port, "/api/workers?refresh=1")),
            timeout=60,
            what="Flower's API to list a worker",
        )
        assert any(name.startswith("watched@") for name in workers), workers

        def worker_events_seen() -> bool:
            alive = _try(lambda: _get(unused_port, "/api/workers?status=1")) or {}
            return any(up for name, up in alive.items() if name.startswith("watched@"))

        # The list above comes from a broadcast; tasks reach Flower as events, through a
        # receiver it binds on its own schedule. Runs that finish before it listens are
        # never seen (this failed once in CI): wait for the worker's own events first.
        wait_for(worker_events_seen, timeout=30, what="Flower to receive the worker's events")
        ids = cluster.submit([{**TINY_BACKPROP, "seed": i} for i in range(3)])
        cluster.wait_finished(ids, timeout=60)

        def train_tasks() -> list[dict[str, Any]] | None:
            tasks = _try(lambda: _get(unused_port, "/api/tasks"))
            done = [
                t
                for t in (tasks or {}).values()
                if t.get("name") == "mlpq.train" and t.get("state") == "SUCCESS"
            ]
            return done if sorted(_task_runs(done)) == ids else None

        done = wait_for(train_tasks, timeout=30, what="Flower to see the 3 runs' train tasks")
    finally:
        flower.terminate()
        flower.wait(timeout=20)
        log.close()
        worker.stop()
    # Each run in exactly one task (short runs share a message: one task may carry all three).
    assert sorted(_task_runs(done)) == ids
    assert all(t["worker"].startswith("watched@") for t in done)


def _task_runs(tasks: list[dict[str, Any]]) -> list[int]:
    """The run ids the train tasks carried, from Flower's repr of their arguments.

    A pack's repr is ``([1, 2, 3],) 3 runs`` (up to four ids shown; enough here).
    """
    runs: list[int] = []
    for task in tasks:
        shown, _, count = task["args"].partition(") ")
        (payload,) = ast.literal_eval(shown + ")")
        payload = payload if isinstance(payload, list) else [payload]
        assert count in ("", f"{len(payload)} runs"), task["args"]
        runs.extend(payload)
    return runs


def _try(call: Any) -> Any:
    try:
        return call() or None
    except (OSError, ValueError):
        return None
