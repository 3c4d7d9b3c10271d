"""``mlpq weights`` and ``mlpq predict``: a run's trained network, out of the store and at work."""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from cli.output import atomic_output, console
from service.exceptions import MlpqError


class DataError(MlpqError):
    """The rows given to ``mlpq predict`` do not fit the run's model."""

    exit_code = 2


def weights(
    run_id: Annotated[int, typer.Argument(help="Run id (see mlpq runs).")],
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="File to write (default: run-ID.npz).")
    ] = None,
) -> None:
    """Write a run's final weights: layers W0, b0, W1, ..., its config and the input scaling.

    The file is a plain npz (no pickle): np.load("model.npz") gives the arrays
    W0, b0, ... (layer i maps fan_in to fan_out units), x_mean and x_scale (inputs
    are standardized as (x - x_mean) / x_scale), config (the run's config as JSON)
    and meta (task, layer sizes, activation, class labels, feature names).

    Example:

        $ mlpq weights 42 -o model.npz
    """
    from engine.model import Model
    from service.results import read_engine
    from service.results.runs import run_weights

    data = run_weights(read_engine(), run_id)
    model = Model.from_npz(data)
    path = output or Path(f"run-{run_id}.npz")
    with atomic_output(path) as out:
        out.write(data)
    layers = ", ".join("x".join(str(n) for n in W.shape) for W in model.Ws)
    console(stderr=True).print(
        f"run {run_id}: {model.config['optimizer']} {model.task} network, "
        f"layers {layers}, {len(data):,} bytes written to {path}"
    )


def predict(
    run_id: Annotated[int, typer.Argument(help="Run id (see mlpq runs).")],
    data: Annotated[
        Path,
        typer.Argument(help="CSV with a header row holding the model's feature columns."),
    ],
    output: Annotated[
        Path | None,
        typer.Option("-o", "--output", help="CSV to write (default: standard output)."),
    ] = None,
    target: Annotated[
        str | None,
        typer.Option(
            help="Column of true values: print the score (accuracy or R²) of the predictions. "
            "Default: the run's CSV target column, when the file has it."
        ),
    ] = None,
    proba: Annotated[
        bool, typer.Option("--proba", help="Add one probability column per class.")
    ] = False,
) -> None:
    """Run a stored model on new rows, preprocessed as in training.

    Writes one row per input row: the predicted class label (classification) or
    value (regression). Columns other than the model's features are ignored.

    Example:

        $ mlpq predict 42 new_points.csv -o predictions.csv
    """
    from engine.errors import ConfigError
    from engine.model import Model, read_features
    from service.results import read_engine
    from service.results.runs import run_weights

    try:
        raw = data.read_bytes()
    except OSError as exc:
        raise DataError(f"{data}: cannot read ({exc.strerror})") from None
    model = Model.from_npz(run_weights(read_engine(), run_id))
    try:
        X, header = read_features(raw, model.feature_names)
    except ConfigError as exc:
        raise DataError(f"{data}: {exc.problem}") from None
    target = target or model.config.get("target")
    truth = _column(raw, header, target) if target and target in header else None
    if target and truth is None and target != model.config.get("target"):
        raise DataError(f"--target: {data} has no column {target!r}")

    predictions = model.predict(X)
    columns: list[Any] = [[_cell(v) for v in predictions]]
    names = ["prediction"]
    probabilities = model.probabilities(X) if proba else None
    if probabilities is not None:
        for j, label in enumerate(model.classes or []):
            names.append(f"p_{_cell(label)}")
            columns.append([repr(float(p)) for p in probabilities[:, j]])
    rows = zip(*columns, strict=True)
    if output is None:
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(names)
        writer.writerows(rows)
    else:
        with atomic_output(output, "w") as out:
            writer = csv.writer(out, lineterminator="\n")
            writer.writerow(names)
            writer.writerows(rows)
    if truth is not None:
        console(stderr=True).print(_score(model.task, predictions, truth, target))


def _cell(value: Any) -> str:
    """A label or value as CSV text: integral floats without ``.0``, floats round-trip."""
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() and abs(value) < 2**53 else repr(value)
    if hasattr(value, "item"):  # NumPy scalars
        return _cell(value.item())
    return str(value)


def _column(raw: bytes, header: list[str], name: str) -> list[str]:
    import io

    rows = csv.reader(io.StringIO(raw.decode("utf-8-sig")))
    next(rows)
    i = header.index(name)
    return [row[i].strip() for row in rows if any(c.strip() for c in row)]


def _score(task: str, predictions: Any, truth: list[str], target: str) -> str:
    n = len(truth)
    if task == "regression":
        try:
            y = [float(v) for v in truth]
        except ValueError:
            raise DataError(f"--target: column {target!r} is not numeric") from None
        mean = sum(y) / n
        sse = sum((p - t) ** 2 for p, t in zip(predictions.tolist(), y, strict=True))
        sst = sum((t - mean) ** 2 for t in y)
        r2 = 1 - sse / sst if sst > 0 else math.nan
        return f"R² {r2:.6g} against column {target!r} ({n} rows)"
    hits = sum(_same(_cell(p), t) for p, t in zip(predictions.tolist(), truth, strict=True))
    return f"accuracy {hits / n:.6g} against column {target!r} ({hits}/{n} rows)"


def _same(label: str, cell: str) -> bool:
    if label == cell:
        return True
    try:
        return float(label) == float(cell)
    except ValueError:
        return False


def register(app: typer.Typer) -> None:
    """Add ``mlpq weights`` and ``mlpq predict`` to ``app``."""
    app.command("weights")(weights)
    app.command("predict")(predict)
