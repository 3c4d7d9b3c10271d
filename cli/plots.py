"""``mlpq plot`` and ``mlpq report``: learning curves as an image, a comparison as one HTML file."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli.output import console


def plot(
    experiment: Annotated[str, typer.Argument(help="Experiment name or id.")],
    metric: Annotated[
        str, typer.Option(help="Metric column to draw (see engine/metrics.py), e.g. val_accuracy.")
    ] = "val_loss",
    x: Annotated[
        str,
        typer.Option(
            "--x", help="x axis: step, evaluations (forward passes) or seconds (wall time)."
        ),
    ] = "step",
    group_by: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated hyperparameters, one line each (default: every setting "
            "but the seed)."
        ),
    ] = None,
    band: Annotated[
        str, typer.Option(help="Spread around each mean: minmax (over runs) or std (± 1 std).")
    ] = "minmax",
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Image to write: .png, .svg or .pdf.")
    ] = Path("curves.png"),
) -> None:
    """Learning curves: a mean line and a band over seeds per group, a panel per dataset.

    Example:

        $ mlpq plot compare --metric val_loss --x evaluations --group-by optimizer -o curves.png
    """
    from service.results import read_engine
    from service.results.plots import (
        check_choices,
        check_output,
        learning_curves,
        parse_group_by,
        save_figure,
    )

    check_choices(metric=metric, x=x, band=band)
    check_output(output)
    keys = parse_group_by(group_by)
    drawn = learning_curves(
        read_engine(), experiment=experiment, metric=metric, x=x, group_by=keys, band=band
    )
    save_figure(drawn.figure, output)
    groups = len({c.label for p in drawn.panels for c in p.curves})
    console().print(
        f"wrote {output}: {metric} of {drawn.runs} run(s), {groups} group(s), "
        f"{len(drawn.panels)} panel(s)",
        highlight=False,
        markup=False,
        soft_wrap=True,  # a path is never broken across lines
    )


def report(
    experiment: Annotated[str, typer.Argument(help="Experiment name or id.")],
    output: Annotated[
        Path, typer.Option("--output", "-o", help="HTML file to write (one self-contained page).")
    ] = Path("report.html"),
) -> None:
    """One HTML page comparing the methods: budgets, results, curves, leaderboard, failures.

    Images are embedded; the page loads nothing from the network.

    Example:

        $ mlpq report compare -o compare.html
    """
    from service.results import read_engine
    from service.results.plots import check_output, write_atomic
    from service.results.report import build_report

    check_output(output, ("html", "htm"))
    page = build_report(read_engine(), experiment=experiment)
    write_atomic(output, page.encode("utf-8"))
    console().print(
        f"wrote {output} ({len(page) / 1e6:.1f} MB)", highlight=False, markup=False, soft_wrap=True
    )


def register(app: typer.Typer) -> None:
    """Add ``mlpq plot`` and ``mlpq report`` to ``app``."""
    app.command("plot")(plot)
    app.command("report")(report)
