"""``mlpq ls`` (experiments and their progress) and ``mlpq show`` (an experiment's leaderboard)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from cli.output import console, dataset_label, print_json
from service.exceptions import MlpqError

if TYPE_CHECKING:
    from sqlalchemy import Engine

# Short column headers, so a leaderboard fits an 80-column terminal.
_LABELS: dict[str, str] = {
    "learning_rate": "lr",
    "batch_size": "batch",
    "step_size": "step",
    "temperature": "temp",
    "activation": "act",
    "best_val_accuracy": "best val acc",
    "final_val_accuracy": "val acc",
    "best_val_loss": "best val loss",
    "final_val_loss": "val loss",
    "best_val_r2": "best val r2",
    "final_val_r2": "val r2",
}
# A leaderboard ranks by the first of these an experiment has values for.
DEFAULT_RANKING: tuple[str, ...] = ("best_val_accuracy", "best_val_r2", "best_val_loss")
# Hyperparameter columns, shown when they differ between the runs listed.
_PARAMS: tuple[str, ...] = (
    "dataset",
    "optimizer",
    "hidden",
    "activation",
    "learning_rate",
    "batch_size",
    "step_size",
    "temperature",
    "seed",
)
_STATUSES: tuple[str, ...] = ("succeeded", "running", "queued", "failed", "diverged", "cancelled")
_STATUS_COLORS: dict[str, str] = {"failed": "red", "diverged": "yellow", "running": "cyan"}


class UsageError(MlpqError):
    """A command-line value is invalid."""

    exit_code = 2


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _by_status(row: Mapping[str, Any]) -> str:
    parts = []
    for status in _STATUSES:
        if row[status]:
            color = _STATUS_COLORS.get(status)
            part = f"{row[status]} {status}"
            parts.append(f"[{color}]{part}[/{color}]" if color else part)
    if row.get("unsent"):
        parts.append(f"{row['unsent']} of the queued not yet in the broker (the window)")
    return ", ".join(parts) or "no runs"


def ls(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """List experiments: runs finished, runs by status, best results so far.

    Example:

        $ mlpq ls --json
    """
    from service.results import experiment_progress, read_engine

    rows = experiment_progress(read_engine())
    if as_json:
        print_json(rows)
        return
    out = console()
    if not rows:
        out.print("no experiments yet (mlpq run GRID, or mlpq submit GRID)")
        return
    table = Table("id", "experiment", "done", "runs by status", "best val acc", "best val loss")
    for row in rows:
        finished = sum(row[s] or 0 for s in ("succeeded", "failed", "diverged", "cancelled"))
        table.add_row(
            str(row["experiment_id"]),
            row["experiment"],
            f"{finished}/{row['runs']}",
            _by_status(row),
            _fmt(row["best_val_accuracy"]),
            _fmt(row["best_val_loss"]),
        )
    out.print(table)


def show(
    experiment: Annotated[str, typer.Argument(help="Experiment name (or id).")],
    by: Annotated[
        str | None,
        typer.Option(
            help="Rank by this run_summary column (default: best_val_accuracy, "
            "else best_val_r2, else best_val_loss)."
        ),
    ] = None,
    limit: Annotated[int, typer.Option(min=1, help="Runs to show.")] = 10,
    include_diverged: Annotated[
        bool, typer.Option("--include-diverged", help="Rank diverged runs too.")
    ] = False,
) -> None:
    """Show an experiment's runs by status, its best runs, and its failed runs' errors.

    Diverged runs are left out of the ranking unless --include-diverged.

    Example:

        $ mlpq show quickstart --by best_val_loss
    """
    from sqlalchemy.orm import Session

    from service.results import RANKABLE, read_engine
    from service.store import get_experiment

    if by is not None and by not in RANKABLE:
        raise UsageError(f"--by: expected one of {', '.join(RANKABLE)}; got {by!r}")
    engine = read_engine()
    with Session(engine) as session:
        name = get_experiment(session=session, name=experiment).name
    print_leaderboard(engine, name, by=by, limit=limit, include_diverged=include_diverged)


def print_leaderboard(
    engine: Engine,
    experiment: str,
    *,
    by: str | None = None,
    limit: int = 10,
    include_diverged: bool = False,
) -> None:
    """Runs by status, the top ``limit`` runs by ``by``, and the failed runs' errors.

    Diverged runs are ranked only with ``include_diverged``: their best score
    may predate the blow-up.
    """
    from sqlalchemy import text

    from service.results import dataset_labels, experiment_datasets, leaderboard

    out = console()
    labels = dataset_labels(engine)
    with engine.connect() as conn:
        counts = (
            conn.execute(
                text("SELECT * FROM experiment_progress WHERE experiment = :e"), {"e": experiment}
            )
            .mappings()
            .one()
        )
        failures = conn.execute(
            text(
                "SELECT id, error FROM runs WHERE experiment_id = :id AND status = 'failed' "
                "ORDER BY id LIMIT 5"
            ),
            {"id": counts["experiment_id"]},
        ).all()
    out.print(f"[bold]{experiment}[/bold]: {_by_status(counts)}", highlight=False)
    datasets = experiment_datasets(engine, experiment=experiment)
    # One table per dataset when there are several: their scores are not comparable
    # (and a regression dataset ranks by r2 where a classification one ranks by accuracy).
    for dataset in datasets if len(datasets) > 1 else [None]:
        for column in [by] if by else DEFAULT_RANKING:
            rows = leaderboard(
                engine,
                experiment=experiment,
                by=column,
                limit=limit,
                dataset=dataset,
                include_diverged=include_diverged,
            )
            if rows:
                title = f"top {len(rows)} by {column}" + (
                    f" on {dataset_label(dataset, labels)}" if dataset else ""
                )
                out.print(leaderboard_table(rows, column, title, labels, dataset=dataset is None))
                break
    for run_id, error in failures:
        last = (error or "").strip().splitlines()[-1:] or ["(no error recorded)"]
        out.print(f"[red]run {run_id} failed[/red]: {last[0]}", highlight=False)
    if counts["failed"] and counts["failed"] > len(failures):
        out.print(
            f"... {counts['failed'] - len(failures)} more failed run(s): "
            "mlpq sql \"SELECT id, error FROM runs WHERE status = 'failed'\"",
            highlight=False,
        )


def leaderboard_table(
    rows: list[dict[str, Any]], by: str, title: str, labels: dict[str, str], *, dataset: bool
) -> Table:
    """Runs ranked by ``by``: run, dataset (if ``dataset``), optimizer, config, seed, status.

    The hyperparameters that differ between the listed runs share one wrapping
    ``config`` column (``lr=0.1 batch=32``), so the table fits 80 columns.
    """
    varying = [
        p
        for p in _PARAMS
        if p not in ("dataset", "optimizer", "seed") and len({repr(r.get(p)) for r in rows}) > 1
    ]
    table = Table(title=title)
    table.add_column("run", no_wrap=True, justify="right")
    if dataset:
        table.add_column("dataset", overflow="fold")
    table.add_column("optimizer", no_wrap=True)
    if varying:
        table.add_column("config", overflow="fold")
    table.add_column("seed", no_wrap=True, justify="right")
    table.add_column("status", no_wrap=True)
    table.add_column(_LABELS.get(by, by), no_wrap=True, justify="right")
    for row in rows:
        cells = [str(row["run_id"])]
        if dataset:
            cells.append(dataset_label(row["dataset"], labels))
        cells.append(row["optimizer"])
        if varying:
            cells.append(
                " ".join(
                    f"{_LABELS.get(p, p)}={_fmt(row[p])}" for p in varying if row[p] is not None
                )
            )
        color = _STATUS_COLORS.get(row["status"])
        status = f"[{color}]{row['status']}[/{color}]" if color else row["status"]
        table.add_row(*cells, _fmt(row["seed"]), status, _fmt(row[by]))
    return table


def register(app: typer.Typer) -> None:
    """Add ``mlpq ls`` and ``mlpq show`` to ``app``."""
    app.command("ls")(ls)
    app.command("show")(show)
