"""The stale-run reaper: a thread in every worker's main process.

A run whose worker died keeps ``status=running`` with a heartbeat that stops
moving. On Redis its message comes back after the visibility timeout (hours, to
outlast the task time limit); on the embedded filesystem queue it is gone for
good. So every worker's main process looks for stale runs every few seconds and
re-enqueues them (``service.store.runs.reap_stale`` moves each run with one UPDATE ...
RETURNING: of two reapers racing, only one gets it). Nobody has to notice a lost run.

The same sweep finds queued runs whose message the broker lost
(``service.queue.window.lost_runs``) and tops the broker's window up from the
store, so a grid goes on when no run has finished for a while.
"""

from __future__ import annotations

import logging
import threading

from celery import Celery, bootsteps

from service.settings import Settings, get_settings

log = logging.getLogger("mlpq.reaper")

#: Seconds from a worker's start to its first sweep.
FIRST_SWEEP_SECONDS = 2.0


def reap_interval(settings: Settings) -> float:
    """Seconds between two sweeps: a quarter of the stale age, within [0.5, 30]."""
    return min(30.0, max(0.5, settings.stale_seconds / 4))


def reap_once(app: Celery, settings: Settings | None = None) -> list[int]:
    """Settle stale runs, find runs whose message the broker lost, and top the window up.

    Returns the ids of the runs put back in the queue (they go out through the window).
    """
    from service.queue import feed_quietly, lost_runs, mark_for_resend, queue_size
    from service.store import get_engine, reap_stale, requeue_dead_owners, session_scope, utcnow

    settings = settings or get_settings()
    engine = get_engine(settings.database_url)
    with session_scope(engine) as session:
        result = reap_stale(
            session=session,
            stale_seconds=settings.stale_seconds,
            max_attempts=settings.max_attempts,
        )
        dead = requeue_dead_owners(session=session)
        # Queued runs whose message is nowhere: the broker lost it (a restart without its
        # last writes, a message in flight). Sent again; a duplicate is a no-op claim.
        conn = session.connection()
        lost = lost_runs(
            conn,
            grace_seconds=settings.stale_seconds,
            queue_empty=queue_size(app) == 0,
            now=utcnow(),
        )
        mark_for_resend(conn, lost)
    ids = sorted(set(result.requeued) | set(dead) | set(lost))
    feed_quietly(app, engine)
    if ids or result.failed or result.cancelled:
        log.warning(
            "reaper: re-enqueued %d run(s) %s (%d whose message was lost); "
            "%d used up their attempts (failed); %d cancelled",
            len(ids),
            ids[:20],
            len(lost),
            result.failed,
            result.cancelled,
        )
    return ids


class Reaper(bootsteps.StartStopStep):
    """Worker bootstep running ``reap_once`` every ``reap_interval`` seconds in a thread."""

    requires = ("celery.worker.components:Pool",)

    def __init__(self, parent: object, **kwargs: object) -> None:
        super().__init__(parent, **kwargs)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, parent: object) -> None:
        app = parent.app  # type: ignore[attr-defined]
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._loop, args=(app,), name="mlpq-reaper", daemon=True
        )
        self._thread.start()

    def stop(self, parent: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def _loop(self, app: Celery) -> None:
        settings = get_settings()
        interval = reap_interval(settings)
        # The first sweep soon: a worker joining a grid whose feeders are gone (every
        # worker was stopped) tops the window up within seconds.
        wait = min(interval, FIRST_SWEEP_SECONDS)
        while not self._stop.wait(wait):
            wait = interval
            try:
                reap_once(app, settings)
            except Exception:
                # A database or broker hiccup must not kill the thread; the next sweep retries.
                log.exception("reaper: sweep failed")
