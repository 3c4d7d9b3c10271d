"""Shared utilities of the worker tests: runs in a store, worker processes, polling."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, func, insert, select

from service.store import Experiment, Run, RunStatus, metrics

REPO = Path(__file__).resolve().parents[2]

TINY_BACKPROP: dict[str, Any] = {
    "dataset": "moons",
    "optimizer": "backprop",
    "hidden": [8],
    "activation": "tanh",
    "max_steps": 20,
    "learning_rate": 0.1,
    "seed": 0,
}


def add_runs(
    engine: Engine, configs: Iterable[dict[str, Any]], name: str = "exp", *, published: bool = False
) -> list[int]:
    """Insert an experiment with one queued run per config; returns the run ids.

    Unpublished runs are the window's to send: a running worker's feeder may publish
    them at any moment. ``published`` marks them sent, for a caller that publishes
    them itself (``publish_runs``) beside running workers.
    """
    from datetime import UTC, datetime

    configs = list(configs)
    sent_at = datetime.now(UTC) if published else None
    with engine.begin() as conn:
        exp_id = conn.execute(
            insert(Experiment)
            .values(name=name, spec={"runs": len(configs)})
            .returning(Experiment.id)
        ).scalar_one()
        rows = []
        for cfg in configs:
            text = json.dumps(cfg, sort_keys=True)
            rows.append(
                {
                    "experiment_id": exp_id,
                    "config": cfg,
                    "config_hash": hashlib.sha256(text.encode()).hexdigest(),
                    "optimizer": cfg["optimizer"],
                    "dataset": cfg["dataset"],
                    "hidden": "x".join(str(h) for h in cfg.get("hidden", [32])),
                    "activation": cfg.get("activation", "relu"),
                    "seed": cfg.get("seed", 0),
                    "max_steps": cfg.get("max_steps", 100),
                    "learning_rate": cfg.get("learning_rate"),
                    "step_size": cfg.get("step_size"),
                    "status": RunStatus.queued,
                    "published": published,
                    "published_at": sent_at,
                    "attempt": 0,
                    "cancel_requested": False,
                }
            )
        ids = conn.execute(insert(Run).returning(Run.id), rows).scalars().all()
    return sorted(ids)


def run_rows(engine: Engine, ids: Iterable[int] | None = None) -> dict[int, Any]:
    with engine.connect() as conn:
        query = select(Run.__table__)
        if ids is not None:
            query = query.where(Run.id.in_(list(ids)))
        return {row.id: row for row in conn.execute(query)}


def metric_steps(engine: Engine, run_id: int) -> list[int]:
    with engine.connect() as conn:
        return list(
            conn.execute(
                select(metrics.c.step).where(metrics.c.run_id == run_id).order_by(metrics.c.step)
            ).scalars()
        )


def status_counts(engine: Engine, ids: Iterable[int]) -> dict[str, int]:
    with engine.connect() as conn:
        rows = conn.execute(
            select(Run.status, func.count()).where(Run.id.in_(list(ids))).group_by(Run.status)
        )
        return {RunStatus(s).value: n for s, n in rows}


def wait_for(predicate: Callable[[], Any], *, timeout: float, what: str, every: float = 0.1) -> Any:
    """Poll ``predicate`` until it returns a truthy value; fail the test after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(every)


def worker_env(**settings: object) -> dict[str, str]:
    """A worker subprocess's environment, as `mlpq worker` sets it, plus ``MLPQ_*`` settings."""
    from worker.local import worker_environment

    env = {k: v for k, v in worker_environment().items() if not k.startswith("MLPQ_")}
    for key, value in settings.items():
        env[f"MLPQ_{key.upper()}"] = str(value)
    return env


class WorkerProcess:
    """A real ``celery worker`` subprocess (prefork), logging to a file."""

    def __init__(
        self,
        env: dict[str, str],
        log_path: Path,
        *,
        concurrency: int = 2,
        name: str = "w1",
        app: str = "worker.app",
        extra_path: Path | None = None,
    ) -> None:
        self.log_path = log_path
        env = dict(env)
        if extra_path is not None:
            env["PYTHONPATH"] = os.pathsep.join([str(extra_path), env.get("PYTHONPATH", "")])
        cmd = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            app,
            "worker",
            "--concurrency",
            str(concurrency),
            "--pool",
            "prefork",
            "--loglevel",
            "INFO",
            "--hostname",
            f"{name}@%h",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
        ]
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=self._log, stderr=subprocess.STDOUT
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def children(self) -> list[int]:
        path = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        try:
            return [int(p) for p in path.read_text().split()]
        except OSError:
            return []

    def stop(self, timeout: float = 20) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log.close()

    def kill(self) -> None:
        children = self.children()
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


class MlpqWorker(WorkerProcess):
    """`mlpq worker --concurrency N --hostname NAME@%h`, as a scaled container runs it."""

    def __init__(
        self, settings: dict[str, Any], log_dir: Path, name: str, *, concurrency: int
    ) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        mlpq = str(Path(sys.executable).with_name("mlpq"))
        self.proc = subprocess.Popen(
            [mlpq, "worker", "--concurrency", str(concurrency), "--hostname", f"{name}@%h"],
            env=worker_env(**settings),
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def claimed(self) -> set[int]:
        return {int(m) for m in re.findall(r"run (\d+): claimed by", self.log())}
