"""One run through worker.training.execute_run, in this process, on SQLite and PostgreSQL."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, event
from worker_testlib import TINY_BACKPROP, add_runs, metric_steps, run_rows

from service.models import RunStatus


@pytest.fixture
def settings(store_url: str, tmp_path: Path) -> Any:
    from service.settings import load_settings

    return load_settings(database_url=store_url, home=tmp_path / "home")


@pytest.fixture
def engine(settings: Any) -> Engine:
    from service.db import get_engine

    return get_engine(settings.database_url)


def _execute(run_id: int, settings: Any) -> str:
    from worker.training import execute_run

    return execute_run(run_id=run_id, settings=settings, worker="here:1").status


def test_tiny_run_takes_two_short_transactions(settings: Any, engine: Engine) -> None:
    (run_id,) = add_runs(engine, [TINY_BACKPROP])
    statements: list[str] = []

    def count(_conn, _cursor, statement, *_args) -> None:
        statements.append(statement.split(None, 1)[0].upper())

    event.listen(engine, "before_cursor_execute", count)
    try:
        assert _execute(run_id, settings) == "succeeded"
    finally:
        event.remove(engine, "before_cursor_execute", count)
    if engine.dialect.name == "postgresql":
        # Claim: UPDATE ... RETURNING. Final write: one statement (WITH: the guarded
        # UPDATE, the metric rows, the weights). Both in autocommit: no BEGIN, no COMMIT.
        assert statements == ["UPDATE", "WITH"]
    else:
        # Claim: UPDATE ... RETURNING. Final write: UPDATE, the metric batch (in a
        # savepoint; executemany goes around this hook), INSERT of the weights. No
        # SELECT, no DELETE: a first attempt has no checkpoint to replace.
        writes = [s for s in statements if s not in ("BEGIN", "SAVEPOINT", "RELEASE")]
        assert writes == ["UPDATE", "UPDATE", "INSERT"]
        assert statements.count("BEGIN") in (0, 2)  # BEGIN IMMEDIATE passes the hook
    assert metric_steps(engine, run_id) == list(range(1, TINY_BACKPROP["max_steps"] + 1))


def test_time_limit_stops_a_run_as_succeeded_with_what_it_reached(
    settings: Any, engine: Engine
) -> None:
    config = {**TINY_BACKPROP, "max_steps": 100_000, "time_limit": 0.3}
    (run_id,) = add_runs(engine, [config])
    assert _execute(run_id, settings) == "succeeded"
    row = run_rows(engine)[run_id]
    assert row.stop_reason == "time_limit"
    assert 0 < row.iterations < 100_000
    assert metric_steps(engine, run_id) == list(range(1, row.iterations + 1))


def test_an_exception_fails_the_run_with_its_traceback(settings: Any, engine: Engine) -> None:
    (run_id,) = add_runs(engine, [{**TINY_BACKPROP, "learning_rate": -1.0}])
    assert _execute(run_id, settings) == "failed"
    row = run_rows(engine)[run_id]
    assert RunStatus(row.status) is RunStatus.failed
    assert row.error.startswith("Traceback (most recent call last):")
    assert "learning_rate" in row.error.strip().splitlines()[-1]
    assert row.finished_at is not None
