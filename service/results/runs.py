"""Runs of an experiment filtered and sorted by run_summary columns, and one run's page."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, text

from service.exceptions import MlpqError, NotFoundError


class FilterError(MlpqError):
    """A --where, --sort or --status value names no run_summary column or value."""

    exit_code = 2


#: The run_summary columns, in view order (the names --where and --sort accept).
SUMMARY_COLUMNS: tuple[str, ...] = (
    "run_id", "experiment_id", "experiment", "optimizer", "dataset", "hidden", "activation",
    "seed", "max_steps", "learning_rate", "batch_size", "momentum", "step_size", "temperature",
    "candidates", "status", "attempt", "stop_reason", "final_train_loss", "final_val_loss",
    "best_val_loss", "final_train_accuracy", "final_val_accuracy", "best_val_accuracy",
    "final_val_r2", "best_val_r2", "iterations", "evaluations", "duration_seconds", "worker",
    "created_at", "started_at", "finished_at", "config_hash",
)  # fmt: skip
STATUSES: tuple[str, ...] = ("queued", "running", "succeeded", "failed", "diverged", "cancelled")


def _typed(value: str) -> Any:
    # Compare numbers as numbers (PostgreSQL has no double = varchar).
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def parse_where(items: list[str]) -> list[tuple[str, Any]]:
    """``["optimizer=backprop", "hidden=64x32"]`` -> ``[(column, value), ...]``, validated."""
    pairs = []
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise FilterError(
                f"--where: expected COLUMN=VALUE (e.g. optimizer=backprop); got {item!r}"
            )
        if key not in SUMMARY_COLUMNS:
            raise FilterError(
                f"--where: {key!r} is not a run_summary column; expected one of "
                f"{', '.join(SUMMARY_COLUMNS)}"
            )
        pairs.append((key, value.strip()))
    return pairs


def parse_sort(sort: str) -> tuple[str, bool]:
    """``"-best_val_accuracy"`` -> ``("best_val_accuracy", True)`` (descending)."""
    descending = sort.startswith("-")
    column = sort.lstrip("-+")
    if column not in SUMMARY_COLUMNS:
        raise FilterError(
            f"--sort: {column!r} is not a run_summary column; expected one of "
            f"{', '.join(SUMMARY_COLUMNS)} (prefix - for descending)"
        )
    return column, descending


def runs_sql(
    where: list[tuple[str, Any]], *, status: list[str], sort: str, descending: bool
) -> str:
    """The statement behind ``mlpq runs``; every name in it comes from SUMMARY_COLUMNS."""
    conditions = ["experiment = :experiment"]
    for i, (column, _value) in enumerate(where):
        conditions.append(f"{column} = :w{i}")
    if status:
        conditions.append(f"status IN ({', '.join(f':s{i}' for i in range(len(status)))})")
    order = "DESC" if descending else "ASC"
    return (
        "SELECT * FROM run_summary\nWHERE " + " AND ".join(conditions) + "\n"
        f"ORDER BY ({sort} IS NULL), {sort} {order}, run_id\nLIMIT :limit"
    )


def list_runs(
    engine: Engine,
    *,
    experiment: str,
    where: list[tuple[str, Any]] = (),  # type: ignore[assignment]
    status: list[str] = (),  # type: ignore[assignment]
    sort: str = "run_id",
    descending: bool = False,
    limit: int = 50,
) -> tuple[list[dict[str, Any]], int]:
    """The first ``limit`` matching runs of ``experiment`` and how many match in all."""
    for s in status:
        if s not in STATUSES:
            raise FilterError(f"--status: expected one of {', '.join(STATUSES)}; got {s!r}")
    params: dict[str, Any] = {"experiment": experiment, "limit": limit}
    for i, (_column, value) in enumerate(where):
        params[f"w{i}"] = _typed(value) if _column != "hidden" else value
    for i, s in enumerate(status):
        params[f"s{i}"] = s
    statement = runs_sql(list(where), status=list(status), sort=sort, descending=descending)
    count_sql = statement.replace("SELECT *", "SELECT COUNT(*)", 1).split("\nORDER BY")[0]
    with engine.connect() as conn:
        rows = [dict(r._mapping) for r in conn.execute(text(statement), params)]
        total = conn.execute(text(count_sql), params).scalar_one()
    return rows, total


def run_page(engine: Engine, run_id: int) -> dict[str, Any]:
    """One run: its run_summary row, config, error, resume point and loss curve."""
    from service.results.queries import loss_curve

    with engine.connect() as conn:
        summary = (
            conn.execute(text("SELECT * FROM run_summary WHERE run_id = :id"), {"id": run_id})
            .mappings()
            .one_or_none()
        )
        if summary is None:
            raise NotFoundError(f"run: no run with id {run_id} (see `mlpq runs EXPERIMENT`)")
        extra = conn.execute(
            text("SELECT config, error, resumed_from_step, heartbeat_at FROM runs WHERE id = :id"),
            {"id": run_id},
        ).one()
    config = extra.config
    if isinstance(config, str):  # SQLite hands raw JSON text to a text() query
        import json

        config = json.loads(config)
    return {
        "summary": dict(summary),
        "config": config,
        "error": extra.error,
        "resumed_from_step": extra.resumed_from_step,
        "heartbeat_at": extra.heartbeat_at,
        "loss_curve": loss_curve(engine, run_id=run_id),
    }


def run_weights(engine: Engine, run_id: int) -> bytes:
    """The final weights file (npz bytes) of run ``run_id``; NotFoundError if it has none yet."""
    with engine.connect() as conn:
        row = conn.execute(
            text(
                "SELECT r.status, a.data FROM runs r LEFT JOIN artifacts a "
                "ON a.run_id = r.id AND a.kind = 'weights' WHERE r.id = :id"
            ),
            {"id": run_id},
        ).one_or_none()
    if row is None:
        raise NotFoundError(f"run: no run with id {run_id} (see `mlpq runs EXPERIMENT`)")
    if row.data is None:
        raise NotFoundError(
            f"run {run_id}: no final weights (status {row.status}); "
            "weights are stored when a run succeeds or diverges"
        )
    return bytes(row.data)
