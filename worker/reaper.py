"""The stale-run reaper: a thread in every worker's main process.

A run whose worker died keeps ``status=running`` with a heartbeat that stops
moving. On Redis its message comes back after the visibility timeout (hours, to
outlast the task time limit); on the embedded filesystem queue it is gone for
good. So every worker's main process looks for stale runs every few seconds and
re-enqueues them (``service.store.runs.reap_stale`` moves each run with one UPDATE ...
RETURNING: of two reapers racing, only one gets and publishes it). Nobody has to
notice a lost run.
"""

from __future__ import annotations

import logging
import threading
from datetime import timedelta

from celery import Celery, bootsteps

from service.settings import Settings, get_settings

log = logging.getLogger("mlpq.reaper")


def reap_interval(settings: Settings) -> float:
    """Seconds between two sweeps: a quarter of the stale age, within [0.5, 30]."""
    return min(30.0, max(0.5, settings.stale_seconds / 4))


def reap_once(app: Celery, settings: Settings | None = None) -> list[int]:
    """Settle stale runs and (re)publish them and long-unsent queued runs; returns the ids sent."""
    from service.queue import publish_runs
    from service.store import (
        get_engine,
        orphans,
        queued_published,
        reap_stale,
        requeue_dead_owners,
        session_scope,
        utcnow,
    )

    settings = settings or get_settings()
    engine = get_engine(settings.database_url)
    with session_scope(engine) as session:
        result = reap_stale(
            session=session,
            stale_seconds=settings.stale_seconds,
            max_attempts=settings.max_attempts,
        )
        dead = requeue_dead_owners(session=session)
        unsent = orphans(session=session, older_than=settings.stale_seconds)
        lost: list[int] = []
        if _broker_queue_empty(app):
            # Queued runs whose message is nowhere: the broker lost it (a restart without
            # its last writes, a message in flight). Sent again; a duplicate is a no-op claim.
            cutoff = utcnow() - timedelta(seconds=settings.stale_seconds)
            lost = queued_published(session=session, created_before=cutoff)
    ids = sorted(set(result.requeued) | set(dead) | set(unsent) | set(lost))
    if ids:
        publish_runs(app, ids, engine=engine)
    if ids or result.failed or result.cancelled:
        log.warning(
            "reaper: re-enqueued %d run(s) %s; %d used up their attempts (failed); %d cancelled",
            len(ids),
            ids[:20],
            result.failed,
            result.cancelled,
        )
    return ids


def _broker_queue_empty(app: Celery) -> bool:
    """Whether the train queue holds no message (False when the broker cannot tell)."""
    from amqp.exceptions import NotFound
    from kombu.exceptions import ChannelError

    from service.queue import QUEUE

    try:
        with app.connection_for_read() as conn:
            channel = conn.default_channel
            size = getattr(channel, "_size", None)  # kombu's virtual transports: Redis, files
            if size is not None:
                return size(QUEUE) == 0
            declared = channel.queue_declare(queue=QUEUE, passive=True)
            return declared.message_count == 0
    except (ChannelError, NotFound):
        return True  # no such queue yet (Redis drops an empty list): nothing in it
    except Exception:
        return False


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
        while not self._stop.wait(interval):
            try:
                reap_once(app, settings)
            except Exception:
                # A database or broker hiccup must not kill the thread; the next sweep retries.
                log.exception("reaper: sweep failed")
