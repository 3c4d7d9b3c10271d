"""Ctrl-C and SIGTERM for the commands that wait on the store.

Python's ``sqlite3`` calls back into Python while it prepares and runs a
statement: the read-only connections' authorizer, the store's SQL functions
(``stddev``). A signal handled during such a callback raises its
``KeyboardInterrupt`` inside it, and ``sqlite3`` swallows the exception: the
statement fails as "access to runs.status is prohibited" or "user-defined
function raised exception", and the interrupt is gone. ``mlpq run`` stopped by
SIGTERM then exited 1 with that error instead of 130 with its workers handed
back (once in twenty tries).

Inside :func:`interrupts`, Ctrl-C (and SIGTERM, where asked) raises
``KeyboardInterrupt`` and is remembered: an error that leaves the block after a signal leaves it as
``KeyboardInterrupt``, and :func:`check_interrupt` raises one for a signal whose
exception was swallowed without an error.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

_received: list[int] = []


def _handler(signum: int, _frame: FrameType | None) -> None:
    _received.append(signum)
    raise KeyboardInterrupt


@contextmanager
def interrupts(*, terminate: bool = False) -> Iterator[None]:
    """Ctrl-C interrupts the block even through a callback of sqlite3; SIGTERM too if asked."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signals reach the main thread only
        return
    signums = (signal.SIGINT, signal.SIGTERM) if terminate else (signal.SIGINT,)
    previous = {s: signal.signal(s, _handler) for s in signums}
    _received.clear()
    try:
        yield
    except KeyboardInterrupt:
        raise
    except Exception as exc:
        if _received:
            raise KeyboardInterrupt from exc
        raise
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        _received.clear()


def check_interrupt() -> None:
    """Raise ``KeyboardInterrupt`` if a signal arrived and its exception was lost."""
    if _received:
        raise KeyboardInterrupt
