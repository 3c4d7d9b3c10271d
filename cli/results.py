"""``mlpq status``, ``runs``, ``info`` and ``top``: progress, runs, one run, leaderboards."""

from __future__ import annotations

import math
import time
from typing import Annotated, Any

import typer
from rich.console import Group
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from cli.output import console, dataset_label, duration, fmt, print_json, sparkline

_LABELS: dict[str, str] = {
    "learning_rate": "lr",
    "batch_size": "batch",
    "step_size": "step",
    "temperature": "temp",
    "activation": "act",
    "max_steps": "steps",
    "candidates": "cand",
    "momentum": "mom",
}
_PARAMS = (
    "dataset", "optimizer", "hidden", "activation", "max_steps", "learning_rate",
    "batch_size", "momentum", "step_size", "temperature", "candidates", "seed",
)  # fmt: skip
_STATUS_STYLE = {"failed": "red", "diverged": "yellow", "running": "cyan", "succeeded": "green"}
_JSON = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def _engine_and_experiment(name: str | None) -> tuple[Any, Any]:
    from sqlalchemy import select
    from sqlalchemy.orm import Session

    from service.exceptions import NotFoundError
    from service.results import read_engine
    from service.store import Experiment, get_experiment

    engine = read_engine()
    with Session(engine) as session:
        if name is None:
            exp = session.scalar(select(Experiment).order_by(Experiment.id.desc()).limit(1))
            if exp is None:
                raise NotFoundError("experiment: no experiments yet (mlpq submit GRID)")
        else:
            exp = get_experiment(session=session, name=name)
        session.expunge(exp)
    return engine, exp


def _label(column: str) -> str:
    return _LABELS.get(column, column)


def _varying(
    rows: list[dict[str, Any]], columns: tuple[str, ...], always: tuple[str, ...]
) -> list[str]:
    return [c for c in columns if c in always or len({repr(r.get(c)) for r in rows}) > 1]


# --- status -----------------------------------------------------------------------------


def _status_view(status: Any, *, styled: bool = True) -> Group:
    counts = ", ".join(
        f"[{_STATUS_STYLE[s]}]{n} {s}[/]" if s in _STATUS_STYLE else f"{n} {s}"
        for s, n in status.counts.items()
        if n
    )
    bar = Table.grid(padding=(0, 1))
    if styled:
        shown: Any = ProgressBar(total=max(status.total, 1), completed=status.finished, width=40)
    else:  # rich's bar is drawn by colour alone: invisible without it
        filled = round(40 * status.finished / max(status.total, 1))
        shown = "#" * filled + "-" * (40 - filled)
    bar.add_row(shown, f"{status.finished}/{status.total}")
    rate = f"{status.runs_per_second:.3g} runs/s" if status.runs_per_second else "- runs/s"
    lines: list[Any] = [
        Text.from_markup(
            f"[bold]{status.experiment}[/bold] (id {status.experiment_id}): {counts or 'no runs'}"
        ),
        bar,
        Text(
            f"{rate}, mean run {duration(status.mean_duration_seconds)}, "
            f"ETA {duration(status.eta_seconds) if not status.done else 'done'}"
        ),
    ]
    if status.workers:
        table = Table("worker", "in flight", title="workers heard from in the last minute")
        for host, n in status.workers.items():
            table.add_row(host, str(n))
        lines.append(table)
    else:
        lines.append(Text("no worker heard from in the last minute"))
    return Group(*lines)


def status(
    experiment: Annotated[
        str | None, typer.Argument(help="Experiment name or id (default: the newest).")
    ] = None,
    watch: Annotated[
        bool, typer.Option("--watch", help="Refresh in place until the experiment finishes.")
    ] = False,
    interval: Annotated[float, typer.Option(min=0.2, help="Seconds between refreshes.")] = 2.0,
    as_json: _JSON = False,
) -> None:
    """Progress of an experiment: runs by status, runs/s, ETA, live workers.

    Example:

        $ mlpq status mnist-sweep --watch
    """
    from rich.live import Live

    from service.results.status import experiment_status

    engine, exp = _engine_and_experiment(experiment)
    current = experiment_status(engine, exp)
    if as_json:
        print_json(current.as_dict())
        return
    out = console()
    styled = out.is_terminal and out.color_system is not None
    if not watch or current.done:
        out.print(_status_view(current, styled=styled))
        return
    from cli.interrupts import check_interrupt, interrupts

    try:
        with (
            interrupts(),
            Live(_status_view(current, styled=styled), console=out, auto_refresh=False) as live,
        ):
            while not current.done:
                time.sleep(interval)
                check_interrupt()
                current = experiment_status(engine, exp)
                live.update(_status_view(current, styled=styled), refresh=True)
    except KeyboardInterrupt:
        pass


# --- runs -------------------------------------------------------------------------------


def runs(
    experiment: Annotated[str, typer.Argument(help="Experiment name or id.")],
    status_: Annotated[
        list[str] | None,
        typer.Option("--status", help="Only runs in this status (repeatable)."),
    ] = None,
    where: Annotated[
        list[str] | None,
        typer.Option(help="COLUMN=VALUE on a run_summary column (repeatable), e.g. hidden=64x32."),
    ] = None,
    sort: Annotated[
        str, typer.Option(help="run_summary column to sort by; prefix - for descending.")
    ] = "run_id",
    limit: Annotated[int, typer.Option(min=1, help="Runs to show.")] = 50,
    as_json: _JSON = False,
) -> None:
    """List an experiment's runs, filtered and sorted by run_summary columns.

    Example:

        $ mlpq runs mnist-sweep --where hidden=64x32 --sort -best_val_accuracy
    """
    from service.results import dataset_labels
    from service.results.runs import list_runs, parse_sort, parse_where

    pairs = parse_where(where or [])
    column, descending = parse_sort(sort)
    engine, exp = _engine_and_experiment(experiment)
    rows, total = list_runs(
        engine,
        experiment=exp.name,
        where=pairs,
        status=status_ or [],
        sort=column,
        descending=descending,
        limit=limit,
    )
    if as_json:
        print_json({"total": total, "runs": rows})
        return
    labels = dataset_labels(engine)
    out = console()
    metrics = [
        m
        for m in ("best_val_accuracy", "best_val_loss", "best_val_r2")
        if any(r[m] is not None for r in rows)
    ]
    if column not in (*metrics, "run_id", "status") and column not in _PARAMS:
        metrics.append(column)
    shown = _varying(rows, _PARAMS, ("optimizer",))
    table = Table()
    for c in ("run", "status", *shown, *metrics):
        table.add_column(_label(c).replace("best_val_", "best "), no_wrap=True)
    for r in rows:
        table.add_row(
            str(r["run_id"]),
            Text(r["status"], style=_STATUS_STYLE.get(r["status"], "")),
            *(dataset_label(r[c], labels) if c == "dataset" else fmt(r[c]) for c in shown),
            *(fmt(r[m]) for m in metrics),
        )
    if rows:
        out.print(table)
    out.print(f"{len(rows)} of {total} run(s) shown")


# --- info -------------------------------------------------------------------------------


def _finite(values: list[float | None]) -> list[float]:
    return [v for v in values if v is not None and math.isfinite(v)]


def info(
    run_id: Annotated[int, typer.Argument(help="Run id (see mlpq runs).")],
    as_json: _JSON = False,
) -> None:
    """One run: config, status, attempts, error, summary and its loss curves.

    Example:

        $ mlpq info 42
    """
    from service.results import dataset_labels, read_engine
    from service.results.runs import run_page

    engine = read_engine()
    page = run_page(engine, run_id)
    if as_json:
        print_json(page)
        return
    s = page["summary"]
    labels = dataset_labels(engine)
    out = console()
    style = _STATUS_STYLE.get(s["status"], "")
    out.print(
        Text.assemble(
            (f"run {run_id}", "bold"),
            f" of {s['experiment']}: ",
            (s["status"], style),
            f", attempt {s['attempt']}",
            f", stopped: {s['stop_reason']}" if s["stop_reason"] else "",
            f", resumed from step {page['resumed_from_step']}" if page["resumed_from_step"] else "",
            f", worker {s['worker']}" if s["worker"] else "",
        )
    )
    config = {k: v for k, v in page["config"].items() if v is not None}
    if "dataset" in config:
        config["dataset"] = dataset_label(config["dataset"], labels)
    out.print("config: " + ", ".join(f"{k}={fmt(v)}" for k, v in config.items()))
    from service.store.models import SUMMARY_COLUMNS

    # The summary columns, with run_summary's duration_seconds for runs.wall_seconds.
    shown = [c for c in SUMMARY_COLUMNS if c != "wall_seconds"] + ["duration_seconds"]
    results = [(c, s[c]) for c in shown if s[c] is not None]
    if results:
        out.print("summary: " + ", ".join(f"{c}={fmt(v)}" for c, v in results))
    if page["error"]:
        out.print(Text("error:", style="red"))
        out.print(Text(page["error"].rstrip()))
    curve = page["loss_curve"]
    if not curve:
        out.print("no metrics logged yet")
        return
    steps = [c[0] for c in curve]
    train, val = [c[1] for c in curve], [c[2] for c in curve]
    finite = _finite(train) + _finite(val)
    if not finite:
        out.print("loss curve: no finite values")
        return
    low, high = min(finite), max(finite)
    width = max(10, min(60, out.width - 14))
    out.print(
        f"loss, steps {steps[0]}..{steps[-1]} ({len(steps)} logged), ▁ = {low:.4g}, █ = {high:.4g}"
    )
    for name, values in (("train loss", train), ("val loss", val)):
        if _finite(values):
            last = _finite(values)[-1]
            out.print(f"{name:<10} {sparkline(values, width, low, high)} {last:.4g}")


# --- top --------------------------------------------------------------------------------


def top(
    experiment: Annotated[str, typer.Argument(help="Experiment name or id.")],
    metric: Annotated[
        str | None,
        typer.Option(
            help="run_summary column to rank by (default: best_val_accuracy, "
            "else best_val_r2, else best_val_loss)."
        ),
    ] = None,
    group_by: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated hyperparameters; averages over the other ones (the seeds)."
        ),
    ] = None,
    limit: Annotated[int, typer.Option(min=1, help="Rows to show.")] = 10,
    include_diverged: Annotated[
        bool, typer.Option("--include-diverged", help="Rank diverged runs too.")
    ] = False,
    as_json: _JSON = False,
) -> None:
    """Leaderboard: the best runs, or with --group-by the best groups by mean ± std over seeds.

    Example:

        $ mlpq top mnist-sweep --metric best_val_accuracy --group-by optimizer,hidden,learning_rate
    """
    from service.results import RANKABLE, dataset_labels, group_leaderboard, leaderboard
    from service.results.queries import GROUPABLE
    from service.results.runs import FilterError

    if metric is not None and metric not in RANKABLE:
        raise FilterError(f"--metric: expected one of {', '.join(RANKABLE)}; got {metric!r}")
    keys = [k.strip() for k in group_by.split(",") if k.strip()] if group_by else []
    for key in keys:
        if key not in GROUPABLE:
            raise FilterError(
                f"--group-by: {key!r} is not a hyperparameter; "
                f"expected some of {', '.join(GROUPABLE)}"
            )
    if group_by is not None and not keys:
        raise FilterError("--group-by: expected a comma-separated list, e.g. optimizer,hidden")
    engine, exp = _engine_and_experiment(experiment)
    rows: list[dict[str, Any]] = []
    for column in [metric] if metric else ["best_val_accuracy", "best_val_r2", "best_val_loss"]:
        if keys:
            rows = group_leaderboard(
                engine, experiment=exp.name, by=column, group_by=keys, limit=limit,
                include_diverged=include_diverged,
            )  # fmt: skip
        else:
            rows = leaderboard(
                engine, experiment=exp.name, by=column, limit=limit,
                include_diverged=include_diverged,
            )  # fmt: skip
        if rows:
            metric = column
            break
    if as_json:
        print_json({"experiment": exp.name, "metric": metric, "group_by": keys, "rows": rows})
        return
    out = console()
    if not rows:
        out.print(f"{exp.name}: no finished run has a score yet")
        return
    labels = dataset_labels(engine)
    table = Table(
        title=f"{exp.name}: top {len(rows)} by {metric}"
        + (" (mean ± std over seeds)" if keys else "")
    )
    if keys:
        for c in ("#", *keys, "n", f"{metric}"):
            table.add_column(_label(c), no_wrap=True)
        for i, r in enumerate(rows, 1):
            spread = f" ± {r['std']:.2g}" if r["std"] is not None else ""
            table.add_row(
                str(i),
                *(dataset_label(r[k], labels) if k == "dataset" else fmt(r[k]) for k in keys),
                str(r["n_runs"]),
                f"{r['mean']:.4g}{spread}",
            )
    else:
        from cli.experiments import leaderboard_table

        table = leaderboard_table(rows, metric, table.title, labels, dataset=True)
    out.print(table)


def register(app: typer.Typer) -> None:
    """Add ``mlpq status``, ``runs``, ``info`` and ``top`` to ``app``."""
    app.command("status")(status)
    app.command("runs")(runs)
    app.command("info")(info)
    app.command("top")(top)
