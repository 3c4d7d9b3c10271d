"""One run through worker.training.execute_run, in this process, on SQLite and PostgreSQL."""

from __future__ import annotations

import os
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


@pytest.mark.postgres
def test_only_the_final_write_skips_the_wal_flush(pg_store_url: str, tmp_path: Path) -> None:
    from service.db import get_engine
    from service.settings import load_settings
    from worker.training import _KEPT

    settings = load_settings(database_url=pg_store_url, home=tmp_path / "home")
    engine = get_engine(pg_store_url)
    (run_id,) = add_runs(engine, [TINY_BACKPROP])
    statements: list[str] = []

    def record(_conn, _cursor, statement, *_args) -> None:
        statements.append(statement)

    event.listen(engine, "before_cursor_execute", record)
    try:
        assert _execute(run_id, settings) == "succeeded"
    finally:
        event.remove(engine, "before_cursor_execute", record)
    claim, final = statements
    setting = "set_config('synchronous_commit', 'off', true)"
    assert setting not in claim  # a lost claim is repaired by nobody: it waits for the flush
    assert setting in final
    # ... and the setting ended with the final write's transaction: the worker's kept
    # connection commits its next claim synchronously again.
    conn = _KEPT[(engine, os.getpid())]
    assert conn.exec_driver_sql("SHOW synchronous_commit").scalar_one() == "on"
    assert run_rows(engine)[run_id].status == RunStatus.succeeded


def test_runs_of_one_dataset_and_seed_share_one_read_only_copy(
    settings: Any, engine: Engine
) -> None:
    from worker.training import _dataset

    first = _dataset("moons", 3, 0.2, "float64", None, None, None)
    again = _dataset("moons", 3, 0.2, "float64", None, None, None)
    other = _dataset("moons", 4, 0.2, "float64", None, None, None)
    assert again is first and other is not first
    with pytest.raises(ValueError, match="read-only"):
        first.X_train[0, 0] = 1.0
    # Runs on the shared copy train exactly as on a fresh load, the second as the first.
    from engine import TrainConfig, Trainer, load_dataset

    config = TrainConfig.from_dict(TINY_BACKPROP)
    fresh = load_dataset(config.dataset, seed=config.seed, dtype=config.dtype)
    expected = Trainer(config, fresh)
    for _ in expected.steps():
        pass
    ids = add_runs(engine, [TINY_BACKPROP, TINY_BACKPROP])
    assert [_execute(i, settings) for i in ids] == ["succeeded", "succeeded"]
    rows = run_rows(engine)
    want = expected.result().summary["final_train_loss"]
    assert [rows[i].final_train_loss for i in ids] == [want, want]


def test_worker_main_process_preloads_what_its_children_import(pg_store_url: str) -> None:
    # A child that replaces one at worker_max_tasks_per_child starts without importing
    # these: the main process imported them before forking it.
    import subprocess
    import sys

    code = (
        "import sys, worker.app\n"
        "wanted = ('psycopg', 'service.ingest', 'numpy.random')\n"
        "print([m in sys.modules for m in wanted])\n"
        "worker.app._preload()\n"
        "print([m in sys.modules for m in wanted])\n"
    )
    env = {**os.environ, "MLPQ_DATABASE_URL": pg_store_url}
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[2],
    ).stdout.split("\n")
    assert out[0] == "[False, False, False]"
    assert out[1] == "[True, True, True]"
