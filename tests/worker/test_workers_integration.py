"""Real Celery worker processes against real Redis and PostgreSQL: the failure cases.

Each test starts its own ``celery -A worker.app worker`` subprocesses (prefork)
on a Redis db and a PostgreSQL schema of its own, with heartbeats, checkpoints
and the stale age shrunk to fractions of a second, and stops them at the end.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import Engine, select
from worker_testlib import (
    TINY_BACKPROP,
    WorkerProcess,
    add_runs,
    metric_steps,
    run_rows,
    status_counts,
    wait_for,
    worker_env,
)

from service.store import Artifact, ArtifactKind, RunStatus, metrics

pytestmark = [pytest.mark.slow, pytest.mark.redis, pytest.mark.postgres]

HERE = Path(__file__).parent
FINISHED = {"succeeded", "failed", "diverged", "cancelled"}
# Killed, cancelled or redelivered mid-run by the tests below, on workers that pace their
# runs (paced_app: at least 3 s for this one; about 1 s unpaced on a fast machine).
LONG_RUN: dict[str, Any] = {
    "dataset": "moons",
    "optimizer": "backprop",
    "hidden": [32],
    "activation": "tanh",
    "batch_size": 8,
    "learning_rate": 0.05,
    "max_steps": 1500,
    "seed": 7,
}


class Cluster:
    """A store, a broker, settings for both, and the worker processes a test starts."""

    def __init__(self, store_url: str, broker_url: str, home: Path, log_dir: Path) -> None:
        from service.queue import make_app
        from service.settings import load_settings
        from service.store import make_engine

        self.settings = {
            "database_url": store_url,
            "broker_url": broker_url,
            "home": home,
            "heartbeat_seconds": 0.2,
            "checkpoint_seconds": 0.3,
            "metrics_flush_seconds": 0.3,
            "stale_seconds": 3,
            "max_attempts": 3,
        }
        self.engine: Engine = make_engine(store_url)
        self.app = make_app(load_settings(**self.settings))
        self.log_dir = log_dir
        self.workers: list[WorkerProcess] = []

    def start_worker(
        self, name: str, *, concurrency: int = 2, app: str = "worker.app"
    ) -> WorkerProcess:
        proc = WorkerProcess(
            worker_env(**self.settings),
            self.log_dir / f"{name}.log",
            concurrency=concurrency,
            name=name,
            app=app,
            extra_path=HERE,
        )
        self.workers.append(proc)
        wait_for(
            lambda: "ready." in proc.log() or proc.proc.poll() is not None,
            timeout=30,
            what=f"worker {name} to start",
        )
        assert proc.proc.poll() is None, proc.log()
        return proc

    def submit(self, configs: list[dict[str, Any]], name: str = "exp") -> list[int]:
        from service.queue import publish_runs

        # Marked sent as they are stored: a running worker's window feeder must not
        # publish them too (one message per run, as a test of messages counts them).
        ids = add_runs(self.engine, configs, name=name, published=True)
        publish_runs(self.app, ids, engine=self.engine)
        return ids

    def wait_finished(self, ids: list[int], *, timeout: float) -> dict[int, Any]:
        def done() -> bool:
            counts = status_counts(self.engine, ids)
            return sum(n for s, n in counts.items() if s in FINISHED) == len(ids)

        try:
            wait_for(done, timeout=timeout, what=f"{len(ids)} runs to finish", every=0.2)
        except AssertionError:
            logs = "\n".join(w.log()[-3000:] for w in self.workers)
            raise AssertionError(
                f"runs not finished: {status_counts(self.engine, ids)}\n{logs}"
            ) from None
        return run_rows(self.engine, ids)

    def close(self) -> None:
        for proc in self.workers:
            proc.stop()
        self.app.close()
        self.engine.dispose()


@pytest.fixture
def cluster(pg_store_url: str, redis_url: str, tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(pg_store_url, redis_url, tmp_path / "home", tmp_path)
    try:
        yield c
    finally:
        c.close()


def _assert_steps_contiguous(engine: Engine, run_id: int, last: int) -> None:
    assert metric_steps(engine, run_id) == list(range(1, last + 1))


def _artifact_kinds(engine: Engine, run_id: int) -> list[str]:
    with engine.connect() as conn:
        kinds = conn.execute(select(Artifact.kind).where(Artifact.run_id == run_id)).scalars()
        return sorted(ArtifactKind(k).value for k in kinds)


def _loss_series(engine: Engine, run_id: int) -> np.ndarray:
    with engine.connect() as conn:
        rows = conn.execute(
            select(metrics.c.train_loss, metrics.c.val_loss)
            .where(metrics.c.run_id == run_id)
            .order_by(metrics.c.step)
        ).all()
    return np.array(rows, dtype=float)


def _reference_series(config: dict[str, Any]) -> np.ndarray:
    """The losses of one uninterrupted training of ``config``, in this process."""
    from engine import TrainConfig, Trainer, load_dataset

    cfg = TrainConfig.from_dict(config)
    data = load_dataset(cfg.dataset, seed=cfg.seed, val_fraction=cfg.val_fraction, dtype=cfg.dtype)
    records = [r for r in Trainer(cfg, data).steps() if r is not None]
    return np.array([(r["train_loss"], r["val_loss"]) for r in records], dtype=float)


def test_grid_of_both_methods_succeeds_with_every_metric_step_and_one_weights_each(
    cluster: Cluster,
) -> None:
    configs = [{**TINY_BACKPROP, "seed": s, "max_steps": 15} for s in range(25)] + [
        {
            "dataset": "moons",
            "optimizer": "random_walk",
            "hidden": [8],
            "max_steps": 25,
            "step_size": 0.1,
            "candidates": 4,
            "seed": s,
        }
        for s in range(25)
    ]
    cluster.start_worker("w1")
    ids = cluster.submit(configs)
    rows = cluster.wait_finished(ids, timeout=90)
    assert {RunStatus(r.status).value for r in rows.values()} == {"succeeded"}
    for run_id, row in rows.items():
        _assert_steps_contiguous(cluster.engine, run_id, row.max_steps)
        assert _artifact_kinds(cluster.engine, run_id) == ["weights"]
        assert row.attempt == 1 and row.iterations == row.max_steps


def test_worker_child_killed_mid_run_resumes_from_checkpoint_and_stores_one_training(
    cluster: Cluster,
) -> None:
    worker = cluster.start_worker("w1", app="paced_app")
    (run_id,) = cluster.submit([LONG_RUN])

    def checkpointed_owner() -> str | None:
        row = run_rows(cluster.engine, [run_id])[run_id]
        return row.worker if "checkpoint" in _artifact_kinds(cluster.engine, run_id) else None

    owner = wait_for(checkpointed_owner, timeout=30, what="a first checkpoint")
    child = int(owner.rpartition(":")[2])
    assert child in worker.children()
    os.kill(child, signal.SIGKILL)

    row = cluster.wait_finished([run_id], timeout=60)[run_id]
    assert RunStatus(row.status) is RunStatus.succeeded
    assert row.attempt == 2 and row.resumed_from_step > 0
    assert row.worker != owner
    _assert_steps_contiguous(cluster.engine, run_id, LONG_RUN["max_steps"])
    assert _artifact_kinds(cluster.engine, run_id) == ["weights"]
    np.testing.assert_allclose(
        _loss_series(cluster.engine, run_id), _reference_series(LONG_RUN), rtol=1e-9
    )


def test_redelivery_after_visibility_timeout_is_refused_while_the_run_still_trains(
    cluster: Cluster,
) -> None:
    # Two workers whose Redis transport re-delivers an unacked message after 1 s.
    first = cluster.start_worker("w1", concurrency=1, app="shortvis_app")
    second = cluster.start_worker("w2", concurrency=1, app="shortvis_app")
    (run_id,) = cluster.submit([LONG_RUN])
    row = cluster.wait_finished([run_id], timeout=60)[run_id]
    logs = first.log() + second.log()
    assert f"run {run_id}: message dropped: run {run_id} is running on" in logs
    assert RunStatus(row.status) is RunStatus.succeeded
    assert row.attempt == 1 and row.resumed_from_step is None
    _assert_steps_contiguous(cluster.engine, run_id, LONG_RUN["max_steps"])
    np.testing.assert_allclose(
        _loss_series(cluster.engine, run_id), _reference_series(LONG_RUN), rtol=1e-9
    )


def test_huge_learning_rate_diverges_and_the_other_runs_are_unaffected(cluster: Cluster) -> None:
    sine = {
        "dataset": "sine",
        "optimizer": "backprop",
        "hidden": [8],
        "activation": "relu",
        "max_steps": 30,
    }
    configs = [{**sine, "learning_rate": 100.0}] + [
        {**sine, "learning_rate": 0.05, "seed": s} for s in range(3)
    ]
    cluster.start_worker("w1")
    bad, *good = cluster.submit(configs)
    rows = cluster.wait_finished([bad, *good], timeout=60)
    assert RunStatus(rows[bad].status) is RunStatus.diverged
    assert rows[bad].stop_reason == "diverged"
    assert rows[bad].iterations < 30
    assert _artifact_kinds(cluster.engine, bad) == ["weights"]
    for run_id in good:
        assert RunStatus(rows[run_id].status) is RunStatus.succeeded
        _assert_steps_contiguous(cluster.engine, run_id, 30)


def test_message_for_a_missing_run_is_dropped_with_a_log_line_and_the_worker_goes_on(
    cluster: Cluster,
) -> None:
    from service.queue import TRAIN_TASK

    worker = cluster.start_worker("w1", concurrency=1)
    cluster.app.send_task(TRAIN_TASK, args=[987654])
    cluster.app.send_task(TRAIN_TASK, args=["not-an-id"])
    (run_id,) = cluster.submit([TINY_BACKPROP])
    row = cluster.wait_finished([run_id], timeout=30)[run_id]
    assert RunStatus(row.status) is RunStatus.succeeded
    log = worker.log()
    assert "run 987654: message dropped: run 987654 does not exist" in log
    assert (
        "expected a run id or a list of run ids (integers from 1 to 2147483647), got "
        "args=('not-an-id',)"
    ) in log
    assert worker.proc.poll() is None


def test_every_malformed_payload_is_dropped_with_one_line_and_acked_never_a_traceback(
    cluster: Cluster, redis_url: str
) -> None:
    import redis

    from service.queue import QUEUE, TRAIN_TASK

    worker = cluster.start_worker("w1", concurrency=1)
    payloads: list[tuple[list, dict]] = [
        ([2**70], {}),
        ([-1], {}),
        ([0], {}),
        ([2**31], {}),
        ([1.5], {}),
        ([True], {}),
        ([None], {}),
        (["12"], {}),
        ([[1, "2"]], {}),  # a pack with junk in it
        ([[]], {}),  # an empty pack
        ([{"run": 1}], {}),
        ([], {}),
        ([1, 2], {}),
        ([], {"run_id": 1}),
        ([[[[[[[[1]]]]]]]] * 1000, {}),
    ]
    for args, kwargs in payloads:
        cluster.app.send_task(TRAIN_TASK, args=args, kwargs=kwargs)
    (run_id,) = cluster.submit([TINY_BACKPROP])
    row = cluster.wait_finished([run_id], timeout=60)[run_id]
    assert RunStatus(row.status) is RunStatus.succeeded
    log = worker.log()
    assert log.count("train: message dropped: expected a run id or a list") == len(payloads)
    assert "Traceback" not in log and "ERROR/ForkPoolWorker" not in log.replace(
        "ERROR/ForkPoolWorker-1] train: message dropped", ""
    )
    # Acked: nothing waits in the queue or in Redis's unacked set.
    client = redis.Redis.from_url(redis_url)
    wait_for(lambda: client.hlen("unacked") == 0, timeout=10, what="no unacked message")
    assert client.llen(QUEUE) == 0
    assert worker.proc.poll() is None


def test_cancel_stops_the_running_run_keeping_its_metrics_and_queued_runs_never_start(
    cluster: Cluster,
) -> None:
    from service.store import cancel_experiment, session_scope

    cluster.start_worker("w1", concurrency=1, app="paced_app")
    running, *queued = cluster.submit([LONG_RUN, TINY_BACKPROP, {**TINY_BACKPROP, "seed": 1}])
    wait_for(
        lambda: len(metric_steps(cluster.engine, running)) > 0,
        timeout=30,
        what="the first metrics of the long run",
    )
    exp_id = run_rows(cluster.engine, [running])[running].experiment_id
    with session_scope(cluster.engine) as session:
        result = cancel_experiment(session=session, experiment_id=exp_id)
    assert (result.cancelled, result.requested) == (2, 1)
    rows = cluster.wait_finished([running, *queued], timeout=30)
    assert {RunStatus(r.status) for r in rows.values()} == {RunStatus.cancelled}
    steps = metric_steps(cluster.engine, running)
    assert 0 < len(steps) < LONG_RUN["max_steps"]
    assert steps == list(range(1, len(steps) + 1))
    for run_id in queued:
        assert rows[run_id].attempt == 0 and metric_steps(cluster.engine, run_id) == []


def test_run_of_a_killed_worker_is_reaped_and_resumed_by_another_worker(
    cluster: Cluster,
) -> None:
    doomed = cluster.start_worker("w1", concurrency=1, app="paced_app")
    (run_id,) = cluster.submit([LONG_RUN])
    wait_for(
        lambda: "checkpoint" in _artifact_kinds(cluster.engine, run_id),
        timeout=30,
        what="a first checkpoint",
    )
    # The whole worker dies: nobody rejects the message, Redis keeps it unacked for hours.
    doomed.kill()
    cluster.start_worker("w2", concurrency=1)
    row = cluster.wait_finished([run_id], timeout=60)[run_id]
    assert RunStatus(row.status) is RunStatus.succeeded
    assert row.attempt == 2 and row.resumed_from_step > 0
    _assert_steps_contiguous(cluster.engine, run_id, LONG_RUN["max_steps"])
    assert "reaper: re-enqueued 1 run(s)" in cluster.workers[-1].log()


def test_redis_restart_mid_grid_every_run_completes(
    pg_store_url: str, tmp_path: Path, redis_server: Any
) -> None:
    server = redis_server
    c = Cluster(pg_store_url, server.url, tmp_path / "home", tmp_path)
    try:
        configs = [
            {**TINY_BACKPROP, "seed": s, "max_steps": 200, "batch_size": 16} for s in range(30)
        ]
        c.start_worker("w1")
        ids = c.submit(configs)

        def some_done() -> bool:
            return status_counts(c.engine, ids).get("succeeded", 0) >= 4

        wait_for(some_done, timeout=30, what="the first runs to finish")
        server.stop()
        time.sleep(1.0)
        server.start()
        rows = c.wait_finished(ids, timeout=120)
        assert {RunStatus(r.status).value for r in rows.values()} == {"succeeded"}
        done_before = sum(1 for r in rows.values() if r.attempt == 1)
        assert done_before >= 4
        for run_id in ids:
            _assert_steps_contiguous(c.engine, run_id, 200)
    finally:
        c.close()
        server.stop()


def test_message_waits_while_the_store_is_unreachable_and_the_run_trains_once_it_is_back(
    redis_url: str, tmp_path: Path
) -> None:
    from sqlalchemy.engine import make_url

    from service.queue import TRAIN_TASK
    from service.store import make_engine, upgrade

    name = f"mlpq_test_down_{os.getpid()}_{int(time.time())}"
    # The PostgreSQL server the shared fixtures use (tests/conftest.py).
    server = os.environ.get("MLPQ_TEST_PG_URL", "postgresql+psycopg://root@127.0.0.1:5432/test")
    url = make_url(server).set(database=name).render_as_string(hide_password=False)
    c = Cluster(url, redis_url, tmp_path / "home", tmp_path)
    admin = make_engine(server, isolation_level="AUTOCOMMIT")
    try:
        worker = c.start_worker("w1", concurrency=1)
        # The store's database does not exist yet: the claim cannot even connect.
        c.app.send_task(TRAIN_TASK, args=[1])
        wait_for(
            lambda: "run 1: store unreachable" in worker.log(),
            timeout=30,
            what="the worker to find the store unreachable",
        )
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
        store = make_engine(url)
        upgrade(store)
        (run_id,) = add_runs(store, [TINY_BACKPROP])
        assert run_id == 1
        row = c.wait_finished([run_id], timeout=30)[run_id]
        assert RunStatus(row.status) is RunStatus.succeeded and row.attempt == 1
        store.dispose()
    finally:
        c.close()
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


def test_a_queued_run_whose_message_the_broker_lost_is_sent_again_by_the_reaper(
    cluster: Cluster,
) -> None:
    from sqlalchemy import update

    from service.store import Run, utcnow

    ids = add_runs(cluster.engine, [TINY_BACKPROP, {**TINY_BACKPROP, "seed": 1}])
    # Stored and marked published, but no message ever reached the queue (as after a
    # broker restart that lost its last writes), a while ago.
    with cluster.engine.begin() as conn:
        conn.execute(
            update(Run)
            .where(Run.id.in_(ids))
            .values(published=True, published_at=utcnow() - timedelta(seconds=30))
        )
    worker = cluster.start_worker("w1")
    rows = cluster.wait_finished(ids, timeout=30)
    assert {RunStatus(r.status) for r in rows.values()} == {RunStatus.succeeded}
    assert all(r.attempt == 1 for r in rows.values())
    assert f"reaper: re-enqueued 2 run(s) {ids}" in worker.log()


def test_a_message_whose_body_is_not_json_is_dropped_and_acked(
    cluster: Cluster, redis_url: str
) -> None:
    import redis

    from service.queue import QUEUE, TRAIN_TASK

    worker = cluster.start_worker("w1", concurrency=1)
    with cluster.app.producer_or_acquire() as producer:
        for body in (b"{not json", b"\xff\xfe", b"[1, 2"):
            producer.publish(
                body,
                routing_key=QUEUE,
                serializer=None,
                content_type="application/json",
                content_encoding="utf-8",
                headers={"task": TRAIN_TASK, "id": f"bad-{body[:2].hex()}", "lang": "py"},
            )
    (run_id,) = cluster.submit([TINY_BACKPROP])
    row = cluster.wait_finished([run_id], timeout=60)[run_id]
    assert RunStatus(row.status) is RunStatus.succeeded  # the worker went on
    client = redis.Redis.from_url(redis_url)
    wait_for(lambda: client.hlen("unacked") == 0, timeout=10, what="no unacked message")
    assert client.llen(QUEUE) == 0
    log = worker.log()
    assert log.count("message dropped: its body cannot be decoded as application/json") == 3
    assert "Traceback" not in log and "CRITICAL" not in log
    assert worker.proc.poll() is None


def test_short_runs_share_messages_and_a_failing_run_fails_alone(cluster: Cluster) -> None:
    import base64
    import json

    import redis

    from service.queue import publish_runs

    configs = [{**TINY_BACKPROP, "seed": s} for s in range(200)]
    configs[5] = {**configs[5], "bogus_key": 1}  # refused by the worker: this run fails
    ids = add_runs(cluster.engine, configs)
    client = redis.Redis.from_url(cluster.settings["broker_url"])
    assert publish_runs(cluster.app, ids, engine=cluster.engine) == 200
    messages = [json.loads(m)["body"] for m in client.lrange("mlpq", 0, -1)]
    packs = []
    for body in messages:
        (payload,), _kwargs, _embed = json.loads(base64.b64decode(body))
        packs.append(payload if isinstance(payload, list) else [payload])
    # Packed, and spread over enough messages for every worker process to get some, in
    # packs of at least MIN_PACK_SECONDS of estimated training (here 200 runs of about
    # 3 ms: about 19 packs of 10 runs).
    assert 16 <= len(packs) <= 24 and max(map(len, packs)) > 1
    assert sorted(i for p in packs for i in p) == ids  # every run exactly once
    assert {r.published for r in run_rows(cluster.engine, ids).values()} == {True}

    cluster.start_worker("w1")
    rows = cluster.wait_finished(ids, timeout=60)
    statuses = {run_id: RunStatus(r.status).value for run_id, r in rows.items()}
    assert statuses.pop(ids[5]) == "failed" and "bogus_key" in rows[ids[5]].error
    assert set(statuses.values()) == {"succeeded"}  # its pack-mates trained
    for run_id in statuses:
        _assert_steps_contiguous(cluster.engine, run_id, TINY_BACKPROP["max_steps"])
