"""The worker's message consumer: Celery's, except that an undecodable message is one line.

Celery acknowledges a message whose body cannot be decoded (not JSON, not UTF-8)
and logs it at CRITICAL with a traceback and the body. A malformed message is
not the worker's fault: it is dropped with one log line and acknowledged, like a
train message whose payload is not a run id (``worker.tasks``).
"""

from __future__ import annotations

import logging
import reprlib
from typing import Any

from celery.worker.consumer import Consumer

log = logging.getLogger("mlpq.worker")

_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 60


class QuietConsumer(Consumer):
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
