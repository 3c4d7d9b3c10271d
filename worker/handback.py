"""Handing runs back when a worker is told to stop (SIGTERM from `docker stop`, a scale-down).

The worker runs with ``REMAP_SIGTERM=SIGQUIT`` (set by ``worker.local``), so
Celery treats SIGTERM as its cold shutdown: after ``worker_soft_shutdown_timeout``
it cancels the tasks in progress by sending SIGQUIT to their pool processes,
and on closing the broker connection the Redis transport restores the messages
they had not acknowledged. Billiard's own SIGQUIT handler would end the process
at once, wherever it is; while a run trains, ``training`` replaces it with one
that only raises a flag. The training loop sees the flag after the current
step, saves a checkpoint with the metrics buffered so far, queues the run again
in SQL (``service.store.release_run``), and the task publishes its message, so
another worker resumes it within seconds instead of after ``MLPQ_STALE_SECONDS``.
The process then exits, as billiard's handler would have made it.
"""

from __future__ import annotations

import os
import signal
from types import FrameType
from typing import Any

#: Signals that stop a pool process: Celery's cancel and billiard's pool stop (SIGQUIT when
#: SIGTERM is remapped), and SIGTERM itself.
STOP_SIGNALS = (signal.SIGQUIT, signal.SIGTERM)

_requested = False


def requested() -> bool:
    """Whether this process was told to stop while it trains a run."""
    return _requested


def _on_stop(_signum: int, _frame: FrameType | None) -> None:
    global _requested
    _requested = True


class training:
    """While a run trains in this process, a stop signal asks for a hand-back instead."""

    def __enter__(self) -> None:
        self._previous: dict[int, Any] = {}
        for sig in STOP_SIGNALS:
            previous = signal.getsignal(sig)
            if previous is not signal.SIG_IGN:
                self._previous[sig] = signal.signal(sig, _on_stop)

    def __exit__(self, *exc: object) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        if _requested:
            # Told to stop: the run is handed back (or finished); take no further task.
            os._exit(0)
