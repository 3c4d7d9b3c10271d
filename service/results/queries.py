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
WHERE experiment = :experiment AND {by} IS NOT NULL{dataset_filter}{status_filter}
ORDER BY {by} {direction}, run_id
LIMIT :limit"""

#: The loss curve of one run, in step order.
LOSS_CURVE_SQL = """\
SELECT step, train_loss, val_loss
FROM metrics
WHERE run_id = :run_id
ORDER BY step"""

#: One metric of several runs in one statement, ordered by run then step (plots).
CURVES_SQL = """\
SELECT run_id, step, {metric}
FROM metrics
WHERE run_id IN :run_ids
ORDER BY run_id, step"""

#: Metric columns ``curves`` can fetch.
CURVE_METRICS: tuple[str, ...] = (
    "train_loss",
    "val_loss",
    "train_accuracy",
    "val_accuracy",
    "train_r2",
    "val_r2",
    "train_mae",
    "val_mae",
)

#: Counts by status (and the best results so far) per experiment.
PROGRESS_SQL = "SELECT * FROM experiment_progress ORDER BY experiment_id"


def lower_is_better(by: str) -> bool:
    """Losses, durations and evaluation counts rank ascending; scores descending."""
    return by.endswith("loss") or by in ("duration_seconds", "evaluations")


def leaderboard_sql(
    by: str = "best_val_accuracy", *, per_dataset: bool = False, include_diverged: bool = True
) -> str:
    """The leaderboard statement ranking by summary column ``by``.

    With ``per_dataset`` it also takes a ``:dataset`` parameter: scores of
    different datasets are rarely comparable. Without ``include_diverged`` the
    diverged runs (whose best score may predate the blow-up) are left out.
    """
    if by not in RANKABLE:
        raise ValueError(f"by: expected one of {', '.join(RANKABLE)}, got {by!r}")
    return LEADERBOARD_SQL.format(
        by=by,
        direction="ASC" if lower_is_better(by) else "DESC",
        dataset_filter=" AND dataset = :dataset" if per_dataset else "",
        status_filter="" if include_diverged else " AND status <> 'diverged'",
    )


def leaderboard(
    engine: Engine,
    *,
    experiment: str,
    by: str = "best_val_accuracy",
    limit: int = 10,
    dataset: str | None = None,
    include_diverged: bool = True,
) -> list[dict[str, Any]]:
    """The ``limit`` best runs of ``experiment`` (of one ``dataset`` if given) by ``by``.

    Ties go to the lower run id.
    """
    statement = text(
        leaderboard_sql(by, per_dataset=dataset is not None, include_diverged=include_diverged)
    )
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


#: Hyperparameters ``mlpq top --group-by`` accepts: every one but the seed.
GROUPABLE: tuple[str, ...] = (
    "dataset",
    "optimizer",
    "hidden",
    "activation",
    "max_steps",
    "learning_rate",
    "batch_size",
    "momentum",
    "step_size",
    "temperature",
    "candidates",
)

#: Mean, sample variance and count of ``{by}`` per group of ``{keys}``. The
#: variance is portable SQL (SQLite has no stddev); the std is its square root.
#: The view ``run_groups`` (migration 0003) is this query grouped by every
#: hyperparameter but the seed, over the succeeded runs, for the main metrics.
GROUP_LEADERBOARD_SQL = """\
SELECT {keys}, COUNT({by}) AS n_runs, AVG({by}) AS mean,
       CASE WHEN COUNT({by}) > 1 THEN
           (SUM({by} * {by}) - SUM({by}) * SUM({by}) / COUNT({by})) / (COUNT({by}) - 1)
       END AS variance
FROM run_summary
WHERE experiment = :experiment AND {by} IS NOT NULL AND status IN ({statuses})
GROUP BY {keys}
ORDER BY mean {direction}, n_runs DESC
LIMIT :limit"""


def group_leaderboard_sql(by: str, group_by: list[str], *, include_diverged: bool = False) -> str:
    """The grouped leaderboard statement; ``by`` from RANKABLE, ``group_by`` from GROUPABLE."""
    if by not in RANKABLE:
        raise ValueError(f"by: expected one of {', '.join(RANKABLE)}, got {by!r}")
    for key in group_by:
        if key not in GROUPABLE:
            raise ValueError(f"group by: expected some of {', '.join(GROUPABLE)}, got {key!r}")
    return GROUP_LEADERBOARD_SQL.format(
        keys=", ".join(group_by),
        by=by,
        direction="ASC" if lower_is_better(by) else "DESC",
        statuses="'succeeded', 'diverged'" if include_diverged else "'succeeded'",
    )


def group_leaderboard(
    engine: Engine,
    *,
    experiment: str,
    by: str,
    group_by: list[str],
    limit: int = 10,
    include_diverged: bool = False,
) -> list[dict[str, Any]]:
    """Groups of runs of ``experiment`` ranked by their mean ``by``; each with n_runs, mean, std.

    ``std`` is the sample standard deviation over the group's runs (None for one run).
    """
    import math

    statement = text(group_leaderboard_sql(by, group_by, include_diverged=include_diverged))
    with engine.connect() as conn:
        rows = [
            dict(r._mapping)
            for r in conn.execute(statement, {"experiment": experiment, "limit": limit})
        ]
    for row in rows:
        variance = row.pop("variance")
        # Rounding can leave a tiny negative variance for identical values.
        row["std"] = math.sqrt(max(0.0, float(variance))) if variance is not None else None
        row["mean"] = float(row["mean"]) if row["mean"] is not None else None
    return rows


def dataset_labels(engine: Engine) -> dict[str, str]:
    """``{"csv:<sha256>": "file name as submitted"}`` for every stored CSV dataset."""
    with engine.connect() as conn:
        return {
            f"csv:{sha}": name
            for sha, name in conn.execute(text("SELECT sha256, name FROM datasets"))
        }


def curves(
    engine: Engine, *, run_ids: list[int], metric: str = "val_loss"
) -> list[tuple[int, int, float | None]]:
    """``(run_id, step, metric)`` of every logged step of ``run_ids``, by run then step."""
    from sqlalchemy import bindparam

    if metric not in CURVE_METRICS:
        raise ValueError(f"metric: expected one of {', '.join(CURVE_METRICS)}, got {metric!r}")
    statement = text(CURVES_SQL.format(metric=metric)).bindparams(
        bindparam("run_ids", expanding=True)
    )
    with engine.connect() as conn:
        # Rows compare and unpack as tuples; building 100,000 tuples would double the time.
        return conn.execute(statement, {"run_ids": list(run_ids)}).all()  # type: ignore[return-value]
