"""``mlpq submit``: validate a grid (file or inline options), store its runs, queue them."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar

import typer
from rich.console import Console
from rich.table import Table

from cli.output import console as output_console

if TYPE_CHECKING:
    from rich.progress import Progress

    from service.grids import Grid
    from service.queue import SubmitReport

_INLINE = "Inline grid (instead of a file; a comma makes a list)"
# Grids at least this big get progress bars.
PROGRESS_MIN_RUNS = 2000
# Runs listed by --dry-run unless --limit says otherwise.
DRY_RUN_ROWS = 50

Opt = Annotated[str | None, typer.Option(rich_help_panel=_INLINE)]
#: Inline options that are grid keys, in the order of the grid file's sections.
INLINE_KEYS: tuple[str, ...] = (
    "dataset",
    "hidden",
    "activation",
    "init",
    "dtype",
    "val_fraction",
    "log_every",
    "target_loss",
    "patience",
    "epochs",
    "iterations",
    "time_limit",
    "evaluations",
    "learning_rate",
    "batch_size",
    "momentum",
    "weight_decay",
    "lr_decay",
    "step_size",
    "temperature",
    "cooling",
    "adapt_step",
    "target_acceptance",
    "candidates",
    "quantize",
)
#: Inline options that say how to build the grid rather than set a key.
EXTRA_KEYS: tuple[str, ...] = ("optimizer", "seeds", "seed", "target", "task")


def submit(
    grid_file: Annotated[
        Path | None,
        typer.Argument(
            metavar="[GRID]", help="Grid file (.yaml, .json or .toml); omit to use inline options."
        ),
    ] = None,
    name: Annotated[
        str | None, typer.Option(help="Experiment name (default: the grid's name or file name).")
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Validate and show the runs; write and send nothing.")
    ] = False,
    limit: Annotated[
        int, typer.Option(min=1, help="Runs listed by --dry-run (the first ones of the grid).")
    ] = DRY_RUN_ROWS,
    force: Annotated[
        bool, typer.Option("--force", help="Run configs again that already succeeded or diverged.")
    ] = False,
    yes: Annotated[
        bool, typer.Option("--yes", "-y", help="Submit grids larger than MLPQ_MAX_GRID_RUNS.")
    ] = False,
    dataset: Annotated[
        str | None,
        typer.Option(
            help="Built-in dataset(s) or a CSV file (with --target).", rich_help_panel=_INLINE
        ),
    ] = None,
    target: Annotated[
        str | None, typer.Option(help="Target column of a CSV dataset.", rich_help_panel=_INLINE)
    ] = None,
    task: Annotated[
        str | None,
        typer.Option(help="CSV task: multiclass, binary or regression.", rich_help_panel=_INLINE),
    ] = None,
    optimizer: Annotated[
        str | None,
        typer.Option(help="backprop, random_walk or both (comma).", rich_help_panel=_INLINE),
    ] = None,
    hidden: Annotated[
        str | None, typer.Option(help="Hidden layers, e.g. 16,32x16.", rich_help_panel=_INLINE)
    ] = None,
    activation: Annotated[
        str | None, typer.Option(help="relu, tanh, sigmoid, ...", rich_help_panel=_INLINE)
    ] = None,
    init: Opt = None,
    epochs: Annotated[
        str | None, typer.Option(help="Backprop budget (max_steps).", rich_help_panel=_INLINE)
    ] = None,
    iterations: Annotated[
        str | None, typer.Option(help="Random-walk budget (max_steps).", rich_help_panel=_INLINE)
    ] = None,
    time_limit: Annotated[
        str | None, typer.Option(help="Seconds per run.", rich_help_panel=_INLINE)
    ] = None,
    evaluations: Annotated[
        str | None,
        typer.Option(
            help="Forward evaluations per run, the same budget for every optimizer.",
            rich_help_panel=_INLINE,
        ),
    ] = None,
    seeds: Annotated[
        str | None, typer.Option(help="Number of seeds: 3 means 0,1,2.", rich_help_panel=_INLINE)
    ] = None,
    seed: Annotated[
        str | None, typer.Option(help="Explicit seeds, e.g. 0,7,42.", rich_help_panel=_INLINE)
    ] = None,
    learning_rate: Annotated[
        str | None, typer.Option("--lr", "--learning-rate", rich_help_panel=_INLINE)
    ] = None,
    batch_size: Opt = None,
    momentum: Opt = None,
    weight_decay: Opt = None,
    lr_decay: Opt = None,
    step_size: Opt = None,
    temperature: Opt = None,
    cooling: Opt = None,
    adapt_step: Opt = None,
    target_acceptance: Opt = None,
    candidates: Opt = None,
    quantize: Opt = None,
    dtype: Opt = None,
    val_fraction: Opt = None,
    log_every: Opt = None,
    target_loss: Opt = None,
    patience: Opt = None,
) -> Any:  # SubmitReport | None; Typer evaluates annotations, and that import is lazy
    """Validate a grid, store one run per configuration and send them to the workers.

    The whole grid is checked first; an invalid grid writes nothing. Configs that
    already succeeded (anywhere in the store) are skipped unless --force; queued
    or running ones are not duplicated; failed or cancelled ones of this
    experiment are queued again.

    Example:

        $ mlpq submit examples/quickstart.yaml --dry-run
    """
    from service.settings import get_settings

    options = locals()
    inline = {key: options[key] for key in INLINE_KEYS}
    settings = get_settings()
    console = output_console(stderr=True)
    with _progress(console) as bar:
        grid = _read_grid(
            grid_file,
            inline,
            {key: options[key] for key in EXTRA_KEYS},
            name=name,
            max_runs=settings.max_grid_runs,
            yes=yes,
            progress=bar,
            # Only PostgreSQL stores a grid as it is expanded (service.queue.enqueue);
            # elsewhere a grid is expanded whole before the store is touched.
            lazy=not dry_run and str(settings.database_url).startswith("postgresql"),
        )
        # A big grid is expanded while it is stored (Grid.stream): looked at after.
        expanded = grid.expanded
        if expanded:
            _warn_no_gradient(grid)
        if dry_run:
            bar.stop()
            _show_dry_run(grid, limit=limit)
            return None
        report = _submit(grid, force=force, progress=bar)
    if not expanded:
        _warn_no_gradient(grid)
    _show_report(report)
    if report.publish_error:
        raise typer.Exit(code=1)
    # Returned for `mlpq run`, which submits through this command and then waits.
    return report


def _read_grid(
    grid_file: Path | None,
    inline: dict[str, str | None],
    extras: dict[str, str | None],
    *,
    name: str | None,
    max_runs: int,
    yes: bool,
    progress: Any,
    lazy: bool = False,
) -> Grid:
    """The grid of a file or of inline options (never both), validated whole.

    ``lazy``: a big grid's runs are expanded as they are stored (``expand_grid``).
    """
    from service.exceptions import GridError
    from service.grids import flag, inline_grid, load_grid

    given = [k for k, v in {**inline, **extras}.items() if v is not None]
    if grid_file is not None:
        if given:
            raise GridError(f"{flag(given[0])}: give a grid file or inline options, not both")
        return load_grid(
            grid_file, name=name, max_runs=max_runs, yes=yes, progress=progress, lazy=lazy
        )
    if not given:
        raise GridError("submit: give a grid file (mlpq submit grid.yaml) or --dataset ...")
    return inline_grid(
        inline,
        optimizers=extras["optimizer"],
        seeds=extras["seeds"],
        seed=extras["seed"],
        target=extras["target"],
        task=extras["task"],
        name=name,
        max_runs=max_runs,
        yes=yes,
        progress=progress,
        lazy=lazy,
    )


def _warn_no_gradient(grid: Grid) -> None:
    """One line when backprop runs use an activation with no gradient (on purpose or not)."""
    from engine import NO_GRADIENT

    hit = [
        i
        for i, run in enumerate(grid.runs, 1)
        if run.config["optimizer"] == "backprop"
        and run.config.get("activation") in NO_GRADIENT
        and run.config.get("hidden")  # with no hidden layer the activation is unused
    ]
    if not hit:
        return
    shown = ", ".join(map(str, hit[:10])) + (f", ... ({len(hit)} in all)" if len(hit) > 10 else "")
    Console(stderr=True).print(
        f"warning: backprop with {'/'.join(sorted(NO_GRADIENT))}: the gradient through those "
        f"layers is zero, so only the output layer trains (grid runs {shown})",
        highlight=False,
        soft_wrap=True,
    )


def _submit(grid: Grid, *, force: bool, progress: Any) -> SubmitReport:
    from service.queue import make_app
    from service.queue import submit as do_submit
    from service.store import get_engine

    return do_submit(grid=grid, engine=get_engine(), app=make_app(), force=force, progress=progress)


class _Bar:
    """A rich progress display fed by (phase, done, total) callbacks; shown for big grids only."""

    LABELS: ClassVar[dict[str, str]] = {
        "expand": "validate",
        "insert": "insert",
        "publish": "publish",
    }

    def __init__(self, console: Console) -> None:
        self.console = console
        self.progress: Progress | None = None
        self.tasks: dict[str, Any] = {}

    def __call__(self, phase: str, done: int, total: int) -> None:
        if total < PROGRESS_MIN_RUNS:
            return
        if self.progress is None:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
            )

            self.progress = Progress(
                TextColumn("{task.description:>9}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=self.console,
                transient=False,
            )
            self.progress.start()
        if phase not in self.tasks:
            self.tasks[phase] = self.progress.add_task(self.LABELS.get(phase, phase), total=total)
        self.progress.update(self.tasks[phase], completed=done, total=total)

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def __enter__(self) -> _Bar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _progress(console: Console) -> _Bar:
    return _Bar(console)


def _cell(key: str, value: Any, labels: dict[str, str] | None = None) -> str:
    from service.grids import hidden_label

    if value is None:
        return "-"
    if key == "hidden":
        return hidden_label(value) or "none"
    if key == "dataset" and str(value).startswith("csv:"):
        return (labels or {}).get(str(value)) or str(value)[:12] + "…"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _show_dry_run(grid: Grid, *, limit: int = DRY_RUN_ROWS) -> None:
    console = output_console()
    # A CSV dataset by its file name, not by the content hash the runs store.
    labels = {f"csv:{csv.sha256}": csv.name for csv in grid.datasets}
    n = len(grid.runs)
    by_optimizer: dict[str, list[dict[str, Any]]] = {}
    for run in grid.runs:
        by_optimizer.setdefault(run.config["optimizer"], []).append(run.config)
    # Columns only for what differs between runs of one optimizer; the rest is printed once.
    varying: list[str] = ["optimizer"] if len(by_optimizer) > 1 else []
    fixed: dict[str, dict[str, Any]] = {}
    for optimizer, configs in by_optimizer.items():
        for key in configs[0]:
            if len({repr(c.get(key)) for c in configs}) > 1:
                if key not in varying:
                    varying.append(key)
            else:
                fixed.setdefault(optimizer, {})[key] = configs[0][key]
    picks = range(min(n, limit))
    console.print(
        f"[bold]{grid.name}[/bold]: {n} run(s) from {grid.source} (dry run: nothing written)",
        highlight=False,
    )
    table = Table()
    table.add_column("#", justify="right")
    for key in varying:
        table.add_column(key)
    for i in picks:
        config = grid.runs[i].config
        table.add_row(str(i + 1), *(_cell(k, config.get(k), labels) for k in varying))
    console.print(table)
    for optimizer, values in fixed.items():
        shown = ", ".join(
            f"{k}={_cell(k, v, labels)}" for k, v in values.items() if k not in varying
        )
        console.print(f"{optimizer}, in every run: {shown}", highlight=False)
    notes = [f"{len(picks)} of {n} runs shown" + (" (--limit shows more)" if n > limit else "")]
    if grid.excluded:
        notes.append(f"{grid.excluded} excluded")
    if grid.duplicates:
        notes.append(f"{grid.duplicates} duplicate(s) dropped")
    if grid.datasets:
        notes.append(f"{len(grid.datasets)} CSV file(s) to store")
    console.print(", ".join(notes), highlight=False)


def _show_report(report: SubmitReport) -> None:
    console = output_console()
    parts = [f"{report.new} new"]
    if report.requeued:
        parts.append(f"{report.requeued} requeued (failed/cancelled)")
    if report.forced:
        parts.append(f"{report.forced} forced again")
    parts.append(f"{report.skipped_done} skipped (already succeeded/diverged)")
    parts.append(f"{report.already_queued} already queued/running")
    verb = "created" if report.created else "updated"
    console.print(
        f"[bold]{report.experiment}[/bold] ({verb}, id {report.experiment_id}): "
        f"{report.total} run(s) in the grid: " + ", ".join(parts)
    )
    line = f"{report.published} run(s) sent to the broker"
    if report.unsent and not report.publish_error:
        line += f"; {report.unsent} wait in the store, sent by the workers as runs finish"
    console.print(line)
    if report.publish_error:
        output_console(stderr=True).print(
            f"[red]{report.unsent} run(s) queued but unsent[/red]: {report.publish_error}\n"
            f"They stay in the store; any worker sends them once the broker is back, or "
            f"`mlpq retry {report.experiment}` does.",
            highlight=False,
        )


def register(app: typer.Typer) -> None:
    """Add ``mlpq submit`` to ``app``."""
    app.command("submit")(submit)
