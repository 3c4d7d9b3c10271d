"""The views and the query helpers: one short SELECT, the same answers on both backends."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, text

from service.results import (
    experiment_datasets,
    experiment_progress,
    leaderboard,
    leaderboard_sql,
    loss_curve,
)
from service.store import Experiment, Run, RunStatus, make_engine, session_scope, write_metrics

T0 = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
RUN_SUMMARY_COLUMNS = [
    "run_id", "experiment_id", "experiment", "optimizer", "dataset", "hidden", "activation",
    "seed", "max_steps", "learning_rate", "batch_size", "momentum", "step_size", "temperature",
    "candidates", "status", "attempt", "stop_reason", "final_train_loss", "final_val_loss",
    "best_val_loss", "final_train_accuracy", "final_val_accuracy", "best_val_accuracy",
    "final_val_r2", "best_val_r2", "iterations", "evaluations", "duration_seconds", "worker",
    "created_at", "started_at", "finished_at", "config_hash",
]  # fmt: skip


def fill(engine: Engine) -> None:
    """The same experiments and runs, with fixed ids and times, on any backend."""
    statuses = list(RunStatus)
    with session_scope(engine) as session:
        grid = Experiment(id=1, name="grid", spec={"optimizers": ["backprop"]}, created_at=T0)
        walk = Experiment(id=2, name="walk", spec={}, created_at=T0 + timedelta(minutes=1))
        empty = Experiment(id=3, name="empty", spec={}, created_at=T0 + timedelta(minutes=2))
        session.add_all([grid, walk, empty])
        for i in range(12):
            backprop = i < 8
            status = statuses[i % len(statuses)]
            done = status.finished
            session.add(
                Run(
                    id=i + 1,
                    experiment=grid if backprop else walk,
                    config={"seed": i},
                    config_hash=f"{i:064x}",
                    optimizer="backprop" if backprop else "random_walk",
                    dataset="iris",
                    hidden="16x8" if i % 2 else "32",
                    activation="tanh",
                    seed=i,
                    max_steps=50,
                    learning_rate=0.01 * (i + 1) if backprop else None,
                    batch_size=32 if backprop else None,
                    momentum=0.9 if backprop else None,
                    step_size=None if backprop else 0.1 * i,
                    temperature=None if backprop else 1.0,
                    candidates=None if backprop else 8,
                    status=status,
                    attempt=1 + i % 2,
                    worker=f"w{i % 3}",
                    created_at=T0,
                    started_at=T0 + timedelta(seconds=i),
                    finished_at=T0 + timedelta(seconds=10 * i + 5) if done else None,
                    stop_reason="max_steps" if done else None,
                    final_train_loss=1.0 / (i + 1) if done else None,
                    final_val_loss=1.5 / (i + 1) if done else None,
                    best_val_loss=1.25 / (i + 1) if done else None,
                    final_train_accuracy=0.5 + i / 40 if done else None,
                    final_val_accuracy=0.45 + i / 40 if done else None,
                    best_val_accuracy=(0.5 + ((i * 7) % 12) / 30) if done else None,
                    iterations=50 if done else None,
                    evaluations=50.0 * (i + 1) if done else None,
                    wall_seconds=0.25 * i if done else None,
                )
            )


def normalized(value: Any) -> Any:
    # SQLite hands timestamps back as text, PostgreSQL as aware datetimes.
    if isinstance(value, str) and len(value) >= 19 and value[4] == "-" and value[10] == " ":
        return datetime.fromisoformat(value).replace(tzinfo=None)
    if isinstance(value, datetime):
        return value.astimezone(UTC).replace(tzinfo=None)
    return value


def rows_of(engine: Engine, sql: str) -> tuple[list[str], list[tuple]]:
    with engine.connect() as conn:
        result = conn.execute(text(sql))
        return list(result.keys()), [tuple(map(normalized, row)) for row in result]


def test_views_give_identical_results_on_sqlite_and_postgresql(
    sqlite_store_url: str, pg_store_url: str
) -> None:
    answers = []
    for url in (sqlite_store_url, pg_store_url):
        engine = make_engine(url)
        try:
            fill(engine)
            answers.append(
                (
                    rows_of(engine, "SELECT * FROM run_summary ORDER BY run_id"),
                    rows_of(engine, "SELECT * FROM experiment_progress ORDER BY experiment_id"),
                )
            )
        finally:
            engine.dispose()
    (lite_summary, lite_progress), (pg_summary, pg_progress) = answers
    assert lite_summary[0] == RUN_SUMMARY_COLUMNS
    assert len(lite_summary[1]) == 12
    assert lite_summary == pg_summary
    assert lite_progress == pg_progress


def test_run_summary_has_one_row_per_run_with_its_experiment_and_results(
    store_engine: Engine,
) -> None:
    fill(store_engine)
    columns, rows = rows_of(store_engine, "SELECT * FROM run_summary WHERE run_id = 3")
    (row,) = rows
    got = dict(zip(columns, row, strict=True))
    assert got["experiment"] == "grid"
    assert (got["optimizer"], got["hidden"], got["learning_rate"]) == ("backprop", "32", 0.03)
    assert (got["status"], got["attempt"]) == ("succeeded", 1)
    assert got["best_val_accuracy"] == pytest.approx(0.5 + 2 / 30)
    assert got["duration_seconds"] == 0.5
    assert got["finished_at"] == datetime(2024, 5, 1, 12, 0, 25)


def test_experiment_progress_counts_runs_by_status(store_engine: Engine) -> None:
    fill(store_engine)
    progress = {row["experiment"]: row for row in experiment_progress(store_engine)}
    assert list(progress) == ["grid", "walk", "empty"]
    grid = progress["grid"]
    counts = [grid[s.value] for s in RunStatus]
    assert grid["runs"] == 8 and counts == [2, 2, 1, 1, 1, 1]
    assert [progress["walk"][s.value] for s in RunStatus] == [0, 0, 1, 1, 1, 1]
    assert progress["empty"]["runs"] == 0 and progress["empty"]["queued"] == 0
    assert grid["best_val_loss"] == pytest.approx(1.25 / 6)  # finished grid runs: i = 2..5


def test_experiment_progress_counts_queued_runs_never_sent(store_engine: Engine) -> None:
    fill(store_engine)
    (grid,) = [r for r in experiment_progress(store_engine) if r["experiment"] == "grid"]
    assert grid["queued"] == 2 and grid["unsent"] == 2  # fill() publishes nothing
    with store_engine.begin() as conn:
        conn.execute(
            text(
                "UPDATE runs SET published = :yes WHERE id = "
                "(SELECT min(id) FROM runs WHERE status = 'queued')"
            ),
            {"yes": True},
        )
    (grid,) = [r for r in experiment_progress(store_engine) if r["experiment"] == "grid"]
    assert grid["queued"] == 2 and grid["unsent"] == 1


def test_leaderboard_ranks_accuracy_descending_losses_ascending_and_skips_nulls(
    store_engine: Engine,
) -> None:
    fill(store_engine)
    # grid runs 1..8 finished at i = 2..5 (run ids 3..6); best_val_accuracy = 0.5 + (7i % 12)/30.
    expected = sorted(range(2, 6), key=lambda i: -(0.5 + ((i * 7) % 12) / 30))
    top = leaderboard(store_engine, experiment="grid", limit=3)
    assert [r["run_id"] for r in top] == [i + 1 for i in expected[:3]]
    by_loss = leaderboard(store_engine, experiment="grid", by="best_val_loss")
    assert [r["run_id"] for r in by_loss] == [6, 5, 4, 3]
    assert leaderboard(store_engine, experiment="nosuch") == []
    with pytest.raises(ValueError, match="by: expected one of"):
        leaderboard_sql("config_hash; DROP TABLE runs")


def test_leaderboard_of_one_dataset_ranks_only_its_runs(store_engine: Engine) -> None:
    fill(store_engine)
    with store_engine.begin() as conn:  # finished grid runs 3..6: move 4 and 6 to wine
        conn.execute(text("UPDATE runs SET dataset = 'wine' WHERE id IN (4, 6)"))
    assert experiment_datasets(store_engine, experiment="grid") == ["iris", "wine"]
    by_loss = {
        name: [
            r["run_id"]
            for r in leaderboard(store_engine, experiment="grid", by="best_val_loss", dataset=name)
        ]
        for name in ("iris", "wine", "digits")
    }
    assert by_loss == {"iris": [5, 3], "wine": [6, 4], "digits": []}


def test_loss_curve_returns_every_step_in_order(store_engine: Engine) -> None:
    fill(store_engine)
    records = [{"step": s, "train_loss": 1 / (s + 1), "val_loss": 2 / (s + 1)} for s in range(30)]
    write_metrics(store_engine, 4, list(reversed(records)))
    write_metrics(store_engine, 5, records[:3])
    curve = loss_curve(store_engine, run_id=4)
    assert curve == [(r["step"], r["train_loss"], r["val_loss"]) for r in records]
    assert loss_curve(store_engine, run_id=12) == []
