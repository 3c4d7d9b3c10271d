"""Read-side helpers: the queries a user would type, as functions.

Each helper runs one plain SQL statement over the tables and the views the
migrations create; the statement text is in this module (``*_SQL``) and works
as it is in ``mlpq sql`` on SQLite and PostgreSQL alike.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, text

#: Summary columns a leaderboard can rank by; losses rank ascending, the rest descending.
RANKABLE: tuple[str, ...] = (
    "best_val_accuracy",
    "final_val_accuracy",
    "final_train_accuracy",
    "best_val_loss",
    "final_val_loss",
    "final_train_loss",
    "best_val_r2",
    "final_val_r2",
    "duration_seconds",
    "evaluations",
)

#: Top runs of an experiment; ``{by}`` and ``{direction}`` come from RANKABLE only.
LEADERBOARD_SQL = """\
SELECT run_id, dataset, optimizer, hidden, activation, learning_rate, batch_size, step_size,
       temperature, seed, status, {by}
FROM run_summary
WHERE experiment = :experiment AND {by} IS NOT NULL{dataset_filter}
ORDER BY {by} {direction}, run_id
LIMIT :limit"""

#: The loss curve of one run, in step order.
LOSS_CURVE_SQL = """\
SELECT step, train_loss, val_loss
FROM metrics
WHERE run_id = :run_id
ORDER BY step"""

#: Counts by status (and the best results so far) per experiment.
PROGRESS_SQL = "SELECT * FROM experiment_progress ORDER BY experiment_id"


def leaderboard_sql(by: str = "best_val_accuracy", *, per_dataset: bool = False) -> str:
    """The leaderboard statement ranking by summary column ``by``.

    With ``per_dataset`` it also takes a ``:dataset`` parameter: scores of
    different datasets are rarely comparable.
    """
    if by not in RANKABLE:
        raise ValueError(f"by: expected one of {', '.join(RANKABLE)}, got {by!r}")
    lower_is_better = by.endswith("loss") or by in ("duration_seconds", "evaluations")
    return LEADERBOARD_SQL.format(
        by=by,
        direction="ASC" if lower_is_better else "DESC",
        dataset_filter=" AND dataset = :dataset" if per_dataset else "",
    )


def leaderboard(
    engine: Engine,
    *,
    experiment: str,
    by: str = "best_val_accuracy",
    limit: int = 10,
    dataset: str | None = None,
) -> list[dict[str, Any]]:
    """The ``limit`` best runs of ``experiment`` (of one ``dataset`` if given) by ``by``.

    Ties go to the lower run id.
    """
    statement = text(leaderboard_sql(by, per_dataset=dataset is not None))
    params: dict[str, Any] = {"experiment": experiment, "limit": limit}
    if dataset is not None:
        params["dataset"] = dataset
    with engine.connect() as conn:
        return [dict(row._mapping) for row in conn.execute(statement, params)]


def experiment_datasets(engine: Engine, *, experiment: str) -> list[str]:
    """The datasets the runs of ``experiment`` train on, sorted."""
    statement = text(
        "SELECT DISTINCT dataset FROM run_summary WHERE experiment = :experiment ORDER BY dataset"
    )
    with engine.connect() as conn:
        return list(conn.execute(statement, {"experiment": experiment}).scalars())


def loss_curve(engine: Engine, *, run_id: int) -> list[tuple[int, float | None, float | None]]:
    """``(step, train_loss, val_loss)`` of every logged step of run ``run_id``, in order."""
    with engine.connect() as conn:
        rows = conn.execute(text(LOSS_CURVE_SQL), {"run_id": run_id})
        return [tuple(row) for row in rows]


def experiment_progress(engine: Engine) -> list[dict[str, Any]]:
    """One row per experiment: run counts by status and the best results so far."""
    with engine.connect() as conn:
        return [dict(row._mapping) for row in conn.execute(text(PROGRESS_SQL))]
