"""Starting worker processes: `mlpq worker` and the local workers of `mlpq run`.

Workers are real ``celery worker`` processes (prefork pool) started with the
environment they need *before* NumPy is imported: one BLAS thread per process.
Nothing here imports the Celery app, so the CLI can use it cheaply.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from service.queue.names import TRAIN_TASK

if TYPE_CHECKING:  # importing the settings (pydantic) costs `mlpq run` a tenth of a second
    from service.settings import Settings

#: The app module celery loads (``celery -A``).
APP_MODULE = "worker.app"
#: BLAS/OpenMP thread counts pinned to 1 in every worker process.
BLAS_THREAD_VARS: tuple[str, ...] = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def worker_command(
    *, concurrency: int, loglevel: str = "INFO", hostname: str | None = None
) -> list[str]:
    """argv of a prefork Celery worker consuming the mlpq queue (``python -m worker``)."""
    argv = [sys.executable, "-m", "worker", "--concurrency", str(concurrency)]
    argv += ["--loglevel", loglevel]
    if hostname:
        argv += ["--hostname", hostname]
    return argv


def worker_environment(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: ours) with one BLAS thread per process."""
    env = dict(os.environ if base is None else base)
    for var in BLAS_THREAD_VARS:
        env[var] = "1"
    # SIGTERM is Celery's cold shutdown: runs in progress are handed back at once
    # (worker.handback) instead of holding the worker until they finish.
    env["REMAP_SIGTERM"] = "SIGQUIT"
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def exec_worker(*, concurrency: int, loglevel: str = "INFO", hostname: str | None = None) -> None:
    """Replace this process by a Celery worker (signals then reach celery directly)."""
    argv = worker_command(concurrency=concurrency, loglevel=loglevel, hostname=hostname)
    os.execve(sys.executable, argv, worker_environment())


def log_file(home: Path) -> Path:
    """Where local workers started now log: ``<home>/logs/worker-<date>-<time>.log``."""
    from datetime import datetime

    return home / "logs" / f"worker-{datetime.now().strftime('%Y%m%d-%H%M%S')}.log"


def _stop_with_parent() -> None:
    # Runs in the child before exec: on Linux the worker gets SIGTERM (a warm shutdown)
    # when the process that started it dies, even by SIGKILL, so no worker is orphaned.
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


class LocalWorkers:
    """One ``celery worker`` subprocess with ``concurrency`` children, logging to a file."""

    def __init__(self, *, concurrency: int, log_path: Path, loglevel: str = "INFO") -> None:
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            worker_command(
                concurrency=concurrency, loglevel=loglevel, hostname=f"local-{os.getpid()}@%h"
            ),
            env=worker_environment(),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            # Own session: a Ctrl-C in the terminal reaches us, and we stop the workers.
            start_new_session=True,
            preexec_fn=_stop_with_parent,
        )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def kill(self) -> int | None:
        """Stop the worker and its children at once (for when nothing is in flight)."""
        if self.alive():
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def stop(self, *, timeout: float = 60.0) -> int | None:
        """SIGTERM: runs in progress are handed back (worker.handback); a kill after ``timeout``."""
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while self.alive() and time.monotonic() < deadline:
                time.sleep(0.05)
            if self.alive():
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


def embedded_queue_run_ids(settings: Settings) -> set[int]:
    """Run ids of the train messages waiting in the embedded filesystem queue.

    A message file disappears when a worker fetches it, so a worker killed with
    a fetched message in hand (before the claim) loses that run's message; the
    run stays queued. ``mlpq run`` compares these ids with the store's queued
    runs and publishes the missing ones again (a duplicate is dropped by the claim).
    """
    ids: set[int] = set()
    folder = settings.queue_dir / "out"
    for path in folder.glob("*.msg") if folder.is_dir() else ():
        try:
            message = json.loads(path.read_bytes())
            if message.get("headers", {}).get("task") != TRAIN_TASK:
                continue
            payload = json.loads(base64.b64decode(message["body"]))[0][0]
            ids.update(int(i) for i in (payload if isinstance(payload, list) else [payload]))
        except (OSError, ValueError, KeyError, IndexError, TypeError):
            continue  # fetched meanwhile, or not ours
    return ids
