"""The consumer's tolerance of kombu's released-client error when a broker connection drops."""

from __future__ import annotations

import logging

import pytest
from kombu import Connection
from kombu.common import ignore_errors

from worker.consumer import QuietConsumer, tolerate_released_client

RELEASED = AttributeError("'NoneType' object has no attribute 'hostname'")


def _raising(exc: BaseException):
    calls = []

    def close() -> None:
        calls.append(1)
        raise exc

    return close, calls


def test_closing_a_lost_connection_logs_kombus_released_client_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    conn = Connection("redis://127.0.0.1:1/0")
    conn.close, calls = _raising(RELEASED)
    tolerate_released_client(conn)
    tolerate_released_client(conn)  # wrapped once, however often the connection drops
    with caplog.at_level(logging.WARNING, logger="mlpq.worker"):
        ignore_errors(conn, conn.close)  # as Celery closes it before reconnecting
    assert calls == [1]
    assert "could not be restored on closing" in caplog.text and "hostname" in caplog.text


def test_other_errors_on_closing_are_not_hidden() -> None:
    conn = Connection("redis://127.0.0.1:1/0")
    conn.close, _ = _raising(ValueError("something else"))
    tolerate_released_client(conn)
    with pytest.raises(ValueError, match="something else"):
        ignore_errors(conn, conn.close)


def test_without_the_wrapper_the_error_escapes_celerys_cleanup() -> None:
    # Why the wrapper exists: ignore_errors() lets an AttributeError through, and the
    # worker stops with "Unrecoverable error".
    conn = Connection("redis://127.0.0.1:1/0")
    conn.close, _ = _raising(RELEASED)
    with pytest.raises(AttributeError):
        ignore_errors(conn, conn.close)


def test_the_worker_consumer_wraps_its_connection_before_celery_closes_it() -> None:
    assert "on_connection_error_after_connected" in vars(QuietConsumer)
