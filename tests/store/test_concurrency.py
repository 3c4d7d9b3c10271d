"""Several writer processes on one store: SQLite's settings and no lost or duplicated row."""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable
from typing import Any

from sqlalchemy import text

from service.store import get_engine, make_engine

WRITERS = 4
STEPS = 600
BATCH = 3


def test_sqlite_connections_use_wal_a_busy_timeout_and_foreign_keys(
    sqlite_store_url: str,
) -> None:
    for engine in (make_engine(sqlite_store_url), get_engine(sqlite_store_url)):
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 60_000
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        engine.dispose()


def _write_run(url: str, run_id: int, start: Any) -> int:
    from service.store import write_metrics

    engine = make_engine(url)
    start.wait(30)
    try:
        # Small batches, each its own transaction: many chances to collide on the lock.
        for first in range(0, STEPS, BATCH):
            records = [
                {"step": s, "train_loss": 1.0 / (s + 1), "elapsed": s * 0.01}
                for s in range(first, first + BATCH)
            ]
            write_metrics(engine, run_id, records)
    finally:
        engine.dispose()
    return run_id


def _run_writers(url: str, run_ids: list[int]) -> list[int]:
    ctx = multiprocessing.get_context("spawn")
    with ctx.Manager() as manager:
        start = manager.Event()
        with ctx.Pool(len(run_ids)) as pool:
            pending = [pool.apply_async(_write_run, (url, r, start)) for r in run_ids]
            start.set()
            return [p.get(timeout=120) for p in pending]


def test_writer_processes_on_different_runs_lose_no_row(
    sqlite_store_url: str, add_runs: Callable[..., list[int]]
) -> None:
    engine = make_engine(sqlite_store_url)
    runs = add_runs(engine, WRITERS)
    assert sorted(_run_writers(sqlite_store_url, runs)) == sorted(runs)
    with engine.connect() as conn:
        counts = conn.execute(
            text("SELECT run_id, count(*), min(step), max(step) FROM metrics GROUP BY run_id")
        ).all()
    engine.dispose()
    assert sorted(tuple(c) for c in counts) == [(r, STEPS, 0, STEPS - 1) for r in sorted(runs)]


def test_writer_processes_resending_the_same_run_store_each_step_once(
    store_url: str, add_runs: Callable[..., list[int]]
) -> None:
    # A redelivered run can be written by two workers at once; the key keeps one row per step.
    engine = make_engine(store_url)
    (run,) = add_runs(engine, 1)
    _run_writers(store_url, [run] * 3)
    with engine.connect() as conn:
        count, distinct = conn.execute(
            text("SELECT count(*), count(DISTINCT step) FROM metrics WHERE run_id = :r"),
            {"r": run},
        ).one()
    engine.dispose()
    assert (count, distinct) == (STEPS, STEPS)
