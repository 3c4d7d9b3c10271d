"""``mlpq export``: an experiment's runs or metrics to a CSV, Parquet or JSON-lines file."""

from __future__ import annotations

from typing import Annotated

import typer

#: Format named by the output file's suffix when --format is not given.
_SUFFIXES = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl"}


def export(
    experiment: Annotated[str, typer.Argument(help="Experiment name or id.")],
    output: Annotated[
        str,
        typer.Option("--output", "-o", help="File to write; '-' writes to stdout (csv, jsonl)."),
    ],
    what: Annotated[
        str,
        typer.Option(
            help="runs: one run_summary row per run. metrics: run_id, step and every metric "
            "column, by run and step (join with the runs export on run_id for the "
            "hyperparameters)."
        ),
    ] = "runs",
    fmt: Annotated[
        str | None,
        typer.Option(
            "--format",
            "-f",
            help="csv, parquet (needs pyarrow: pip install 'mlpq\\[parquet]') or jsonl; "
            "default: from the file's suffix, else csv.",
        ),
    ] = None,
) -> None:
    """Export an experiment's runs or its metric rows to a file, streamed in bounded memory.

    The file appears only when complete (it is written under a temporary name beside it).
    --what metrics holds run_id and the metric columns only: join it with the runs
    export on run_id for the hyperparameters.

    Non-finite values: csv writes NaN / Infinity, jsonl null, Parquet keeps them.
    Timestamps are ISO 8601 in UTC.

    Example:

        $ mlpq export mnist-sweep --what metrics -o metrics.parquet
    """
    import sys
    import time
    from pathlib import Path

    from service.results.export import export_experiment

    if fmt is None:
        fmt = "csv" if output == "-" else _SUFFIXES.get(Path(output).suffix.lower(), "csv")
    start = time.perf_counter()
    try:
        result = export_experiment(experiment=experiment, what=what, fmt=fmt, output=output)
    except BrokenPipeError:  # the reader of stdout went away (`| head`): stop quietly
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise typer.Exit(code=1) from None
    if result.path is not None:
        seconds = time.perf_counter() - start
        print(
            f"{result.rows:,} {'run' if what == 'runs' else 'metric row'}"
            f"{'' if result.rows == 1 else 's'} of {result.experiment} written to "
            f"{result.path} ({fmt}) in {seconds:.1f} s",
            file=sys.stderr,
        )


def register(app: typer.Typer) -> None:
    """Add ``mlpq export`` to ``app``."""
    app.command("export")(export)
