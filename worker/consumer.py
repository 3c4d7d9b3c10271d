"""The worker's message consumer: Celery's, with two faults made harmless.

- Celery acknowledges a message whose body cannot be decoded (not JSON, not UTF-8)
  and logs it at CRITICAL with a traceback and the body. A malformed message is
  not the worker's fault: it is dropped with one log line and acknowledged, like a
  train message whose payload is not a run id (``worker.tasks``).
- When the connection to Redis drops (a restart), Celery closes it before it
  reconnects, and closing a Redis channel restores its unacknowledged messages.
  Now and then kombu's transport has already let go of the connection's details
  by then, and the restore raises ``AttributeError: 'NoneType' object has no
  attribute 'hostname'``, which Celery does not expect there: the worker stopped
  with "Unrecoverable error" (seen once in 18 Redis restarts under load). The
  close now logs that and goes on to reconnect; the messages it could not
  restore are the store's to re-send (``service.queue.window.lost_runs``).
- The same AttributeError comes from acknowledging, after the reconnect, a message
  that arrived on the connection that dropped (its task finished meanwhile): kombu
  looks for that connection's details to reach Redis, and they are gone. Raised in
  the event loop, it stopped the consumer for good: the worker took no more
  messages ("Requeuing undeliverable message ... No consumers"; seen once, likely
  twice, in 56 runs of
  ``test_a_redis_restart_without_persistence_mid_window_still_finishes_the_grid``).
  An acknowledgement logs the errors it is given and raises the others; this one is
  now among those it logs. Such an acknowledgement is moot anyway: the Redis that
  held the message restarted without it, or, if only the connection dropped, the
  message comes back after its visibility timeout and its claim is refused.
"""

from __future__ import annotations

import logging
import reprlib
from typing import Any

from celery.worker.consumer import Consumer

log = logging.getLogger("mlpq.worker")

_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 60


def tolerate_released_client(connection: Any) -> None:
    """Make ``connection.close()`` log, not raise, kombu's AttributeError of a released client."""
    if connection is None or getattr(connection, "_mlpq_tolerant", False):
        return
    close = connection.close

    def close_tolerantly() -> None:
        try:
            close()
        except AttributeError as exc:
            log.warning(
                "broker connection lost: its unacknowledged messages could not be restored "
                "on closing (%s); the store re-sends what they carried",
                exc,
            )

    connection.close = close_tolerantly
    connection._mlpq_tolerant = True


#: A message's callbacks that Celery schedules with ``call_soon_ack(p, logger, errors, ...)``.
ACK_CALLBACKS = ("ack_log_error", "reject_log_error")


class QuietConsumer(Consumer):
    def call_soon_ack(self, p: Any, *args: Any, **kwargs: Any) -> Any:
        # ``errors`` are what the acknowledgement logs instead of raising: kombu's
        # released-client AttributeError joins the connection's own. The callback itself
        # is passed on as it is, so Celery still knows it for an acknowledgement (its
        # pool runs those before it joins, at shutdown).
        if getattr(p, "__name__", None) in ACK_CALLBACKS and len(args) >= 2:
            logger, errors, *rest = args
            if AttributeError not in errors:
                args = (logger, (*errors, AttributeError), *rest)
        return super().call_soon_ack(p, *args, **kwargs)

    def on_connection_error_after_connected(self, exc: Exception) -> None:
        tolerate_released_client(self.connection)
        super().on_connection_error_after_connected(exc)

    def on_decode_error(self, message: Any, exc: Exception) -> None:
        lines = str(exc).strip().splitlines()
        task = (message.headers or {}).get("task") if isinstance(message.headers, dict) else None
        log.error(
            "message dropped: its body cannot be decoded as %s (%s); task=%s",
            message.content_type,
            _REPR.repr(lines[0] if lines else type(exc).__name__),
            _REPR.repr(task),
        )
        message.ack()
