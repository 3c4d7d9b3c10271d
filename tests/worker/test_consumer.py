"""The consumer's tolerance of kombu's released-client error when a broker connection drops."""

from __future__ import annotations

import logging

import pytest
from celery.worker.consumer import Consumer
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


class _Channel:
    """A channel whose acknowledgement fails as kombu's Redis channel's does once the
    connection the message came on is gone (``conninfo.hostname`` on None)."""

    no_ack_consumers = None

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc
        self.acked: list[str] = []

    def basic_ack(self, delivery_tag: str, multiple: bool = False) -> None:
        self.acked.append(delivery_tag)
        raise self.exc


class _Hub:
    def __init__(self) -> None:
        self.ready: list = []

    def call_soon(self, callback) -> None:
        self.ready.append(callback)


def _scheduled_ack(consumer_class: type, exc: BaseException):
    """The callback Celery's event loop runs for a finished task's late ack, and its channel."""
    from kombu.message import Message

    consumer = consumer_class.__new__(consumer_class)  # no broker: only call_soon_ack is used
    consumer.hub = _Hub()
    channel = _Channel(exc)
    message = Message(body=b"{}", delivery_tag="tag-1", channel=channel)
    # As celery.worker.request does: on_ack(logger, connection_errors).
    consumer.call_soon_ack(message.ack_log_error, logging.getLogger("celery"), (OSError,))
    (callback,) = consumer.hub.ready
    return callback, channel


def test_an_ack_on_a_released_connection_is_logged_not_raised_in_the_event_loop(
    caplog: pytest.LogCaptureFixture,
) -> None:
    callback, channel = _scheduled_ack(QuietConsumer, RELEASED)
    with caplog.at_level(logging.CRITICAL, logger="celery"):
        callback()
    assert channel.acked == ["tag-1"]
    assert "Couldn't ack" in caplog.text and "hostname" in caplog.text


def test_without_it_the_ack_error_escapes_into_the_event_loop() -> None:
    # Why it exists: the loop lets it through, and the consumer stops taking messages.
    callback, _ = _scheduled_ack(Consumer, RELEASED)
    with pytest.raises(AttributeError, match="hostname"):
        callback()


def test_other_ack_errors_are_not_hidden() -> None:
    callback, _ = _scheduled_ack(QuietConsumer, ValueError("something else"))
    with pytest.raises(ValueError, match="something else"):
        callback()


def test_celerys_pool_still_knows_the_callback_for_an_ack() -> None:
    # At shutdown the pool runs the pending acks before it joins; it finds them by the
    # callback's function, which stays the message's own ack_log_error.
    from celery.concurrency.prefork import _is_ack_callback

    callback, _ = _scheduled_ack(QuietConsumer, RELEASED)
    assert _is_ack_callback(callback)
