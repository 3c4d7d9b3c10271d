"""Ctrl-C reaches the commands that read the store, even through sqlite3's callbacks.

Python's sqlite3 swallows an exception raised inside its callbacks (the read-only
connections' authorizer, the progress handler that bounds a query, the stddev
aggregate). A signal handled there used to fail the statement with a misleading
error ("access to runs.status is prohibited", "canceled after 30 s") and lose
the interrupt: `mlpq run` stopped by SIGTERM exited 1 instead of 130.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from cli.interrupts import check_interrupt, interrupts
from service.results.reader import _sqlite_authorizer, sqlite_read_connection


@pytest.fixture
def read_conn(tmp_path: Path) -> sqlite3.Connection:
    path = tmp_path / "store.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE runs (id INTEGER PRIMARY KEY, status TEXT)")
        conn.executemany("INSERT INTO runs (status) VALUES (?)", [("queued",), ("running",)])
    conn = sqlite_read_connection(path)
    yield conn
    conn.close()


def _signalling_authorizer(signum: int) -> Callable[..., int]:
    """The read connection's authorizer, with ``signum`` delivered inside its first call."""
    fired: list[bool] = []

    def authorizer(*args: object) -> int:
        if not fired:
            fired.append(True)
            signal.raise_signal(signum)  # the handler runs here, inside the callback
        return _sqlite_authorizer(*args)  # type: ignore[arg-type]

    return authorizer


def test_sqlite3_turns_an_interrupt_inside_the_authorizer_into_a_denied_statement(
    read_conn: sqlite3.Connection,
) -> None:
    # What the module works around: with Python's own Ctrl-C handler, the statement
    # fails as a refused read and no KeyboardInterrupt is left.
    read_conn.set_authorizer(_signalling_authorizer(signal.SIGINT))
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(sqlite3.DatabaseError, match=r"prohibited|not authorized"):
            read_conn.execute("SELECT count(*) FROM runs").fetchone()
    except KeyboardInterrupt:
        pytest.fail("sqlite3 let the KeyboardInterrupt through; cli.interrupts may be moot")
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_inside_interrupts_the_denied_statement_leaves_as_keyboard_interrupt(
    read_conn: sqlite3.Connection, signum: int
) -> None:
    read_conn.set_authorizer(_signalling_authorizer(signum))
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with pytest.raises(KeyboardInterrupt), interrupts(terminate=True):
        read_conn.execute("SELECT count(*) FROM runs").fetchone()
    # The handlers are the ones from before the block, and nothing is remembered.
    assert {s: signal.getsignal(s) for s in before} == before
    check_interrupt()


def test_an_interrupt_swallowed_without_an_error_is_raised_by_check_interrupt(
    read_conn: sqlite3.Connection,
) -> None:
    # A trace callback's exception is dropped and the statement succeeds: only the
    # remembered signal tells.
    fired: list[bool] = []

    def trace(_statement: str) -> None:
        if not fired:
            fired.append(True)
            signal.raise_signal(signal.SIGINT)

    read_conn.set_trace_callback(trace)
    with pytest.raises(KeyboardInterrupt), interrupts():
        assert read_conn.execute("SELECT count(*) FROM runs").fetchone() == (2,)
        check_interrupt()
    assert fired


def test_sigterm_keeps_its_default_unless_asked(read_conn: sqlite3.Connection) -> None:
    before = signal.getsignal(signal.SIGTERM)
    with interrupts():
        assert signal.getsignal(signal.SIGTERM) == before
        assert signal.getsignal(signal.SIGINT) != signal.default_int_handler
    assert signal.getsignal(signal.SIGINT) == signal.default_int_handler


def _reading(pid: int, db: Path) -> bool:
    """Whether process ``pid`` has the store file open (its query is under way)."""
    try:
        return any(
            os.readlink(f"/proc/{pid}/fd/{fd}") == str(db) for fd in os.listdir(f"/proc/{pid}/fd")
        )
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize(
    "aggregate",
    [
        "stddev(x)",  # our Python aggregate: the signal lands in its step
        "sum(x)",  # SQLite's own: the signal lands in the progress handler of the timeout
    ],
)
def test_ctrl_c_during_mlpq_sql_exits_130_without_a_misleading_error(
    tmp_path: Path, aggregate: str
) -> None:
    env = {
        **os.environ,
        "MLPQ_HOME": str(tmp_path / ".mlpq"),
        "MLPQ_DATABASE_URL": f"sqlite:///{tmp_path / 'store.db'}",
    }
    env.pop("MLPQ_READ_DATABASE_URL", None)
    mlpq = str(Path(sys.executable).with_name("mlpq"))
    made = subprocess.run([mlpq, "sql", "SELECT 1"], env=env, capture_output=True, timeout=60)
    assert made.returncode == 0, made.stderr
    query = (
        "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 1000000000) "
        f"SELECT {aggregate} FROM c"
    )
    proc = subprocess.Popen(
        [mlpq, "sql", query, "--timeout", "600"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        while not _reading(proc.pid, tmp_path / "store.db"):
            assert proc.poll() is None and time.monotonic() < deadline, "the query never started"
            time.sleep(0.05)
        time.sleep(0.5)  # well inside the query
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    text = err.decode()
    assert "raised error" not in text and "canceled after" not in text, text
    assert out == b""
