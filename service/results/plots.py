"""Learning curves drawn: the figures of ``mlpq plot`` and of the report.

Each group of runs (see ``curves``) is a mean line with a band over its runs, one
axes per panel (a dataset, a network), one colour per group across the panels, and a
shared legend saying how many runs each group has per panel.

Matplotlib is imported inside the drawing functions only, with the Agg backend
(no display), so importing this module costs NumPy and nothing more.
"""

from __future__ import annotations

import io
import math
import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from sqlalchemy import Engine

from engine.metrics import METRICS
from service.exceptions import MlpqError
from service.results.curve_groups import (
    BANDS,
    ENDED,
    X_AXES,
    Curve,
    dataset_name,
    experiment_runs,
    find_experiment,
    group_curves,
    method_labels,
    series,
    value_text,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure


class PlotError(MlpqError):
    """A plot or report asked for something the experiment cannot give: one line, exit 2."""

    exit_code = 2


#: Axis labels of the ``--x`` choices.
X_LABELS: dict[str, str] = {
    "step": "step (epoch for backprop, iteration for random walk)",
    "evaluations": "forward evaluations (training-set passes)",
    "seconds": "wall time (s)",
}
#: Readable names (and units) of the metrics, for axis labels.
METRIC_LABELS: dict[str, str] = {
    "train_loss": "training loss",
    "val_loss": "validation loss",
    "train_accuracy": "training accuracy",
    "val_accuracy": "validation accuracy",
    "train_r2": "training R²",
    "val_r2": "validation R²",
    "train_mae": "training MAE",
    "val_mae": "validation MAE",
    "evaluations": "forward evaluations (training-set passes)",
    "elapsed": "elapsed training time (s)",
    "grad_norm": "gradient norm (L2)",
    "learning_rate": "learning rate",
    "step_size": "step size σ",
    "temperature": "temperature T",
    "acceptance_rate": "acceptance rate (accepted / proposed)",
}


# -- drawing -------------------------------------------------------------------------------


@dataclass
class Panel:
    """One set of axes: a title and its curves."""

    title: str
    curves: list[Curve]
    ylabel: str | None = None  # the figure's ylabel when None


def _matplotlib() -> None:
    import matplotlib

    matplotlib.use("Agg")


def color_map(labels: Iterable[str]) -> dict[str, Any]:
    """The same colour for the same label in every panel (tab10, or tab20 past ten labels)."""
    from matplotlib import colormaps

    unique = list(dict.fromkeys(labels))
    cmap = colormaps["tab10" if len(unique) <= 10 else "tab20"]
    return {label: cmap(i % cmap.N) for i, label in enumerate(unique)}


def use_log_scale(metric: str, curves: Iterable[Curve]) -> bool:
    """Losses (and MAE, σ) on a log axis when positive and spread over more than a decade."""
    if not (metric.endswith(("loss", "mae")) or metric in ("step_size", "grad_norm")):
        return False
    values = np.concatenate([np.concatenate([c.low, c.high, c.mean]) for c in curves] or [[]])
    values = values[np.isfinite(values)]
    if not len(values) or values.min() <= 0:
        return False
    return float(values.max() / values.min()) > 20


def use_log_x(curves: Sequence[Curve]) -> bool:
    """A log x axis when one group's runs end over 10x later than another's (budgets in
    evaluations far apart): on a linear axis the shorter group would be a sliver."""
    ends = [float(c.x[-1]) for c in curves if len(c.x) and c.x[-1] > 0]
    return bool(ends) and max(ends) > 10 * min(ends)


def draw(
    panels: Sequence[Panel],
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    log_y: bool = False,
    log_x: bool = False,
    colors: dict[str, Any] | None = None,
    columns: int = 3,
    legend_title: str | None = None,
) -> Figure:
    """A figure with one axes per panel (``columns`` a row), a shared legend below them."""
    _matplotlib()
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    columns = max(1, min(columns, len(panels)))
    rows = math.ceil(len(panels) / columns)
    labels = [c.label for p in panels for c in p.curves]
    colors = colors or color_map(labels)
    legend_rows = math.ceil(len(set(labels)) / min(3, max(1, len(set(labels)))))
    # At least 9 inches wide: the title and the legend are laid out on the figure's width.
    figure = Figure(
        figsize=(max(9.0, 4.8 * columns), 3.6 * rows + 0.3 + 0.25 * legend_rows),
        layout="constrained",
    )
    axes = figure.subplots(rows, columns, squeeze=False)
    for ax in axes.flat[len(panels) :]:
        ax.set_visible(False)
    counts: dict[str, list[int]] = {}
    for ax, panel in zip(axes.flat, panels, strict=False):
        for curve in panel.curves:
            color = colors[curve.label]
            counts.setdefault(curve.label, []).append(len(curve.run_ids))
            marker = "o" if len(curve.x) == 1 else None
            ax.plot(curve.x, curve.mean, color=color, linewidth=1.8, marker=marker)
            if len(curve.x) > 1 and np.any(curve.high > curve.low):
                ax.fill_between(curve.x, curve.low, curve.high, color=color, alpha=0.2, lw=0)
        ax.set_title(panel.title, fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.set_xlabel(xlabel, fontsize=9)
        ax.set_ylabel(panel.ylabel or ylabel, fontsize=9)
        ax.tick_params(labelsize=8)
        if log_y:
            ax.set_yscale("log")
        if log_x:
            ax.set_xscale("log")
        if not panel.curves:
            ax.text(0.5, 0.5, "no values logged", ha="center", va="center", transform=ax.transAxes)
    figure.suptitle(title, fontsize=12)
    handles = [Line2D([], [], color=colors[label], linewidth=2.5) for label in counts]
    names = [f"{label} ({_runs_text(n)})" for label, n in counts.items()]
    if handles:
        figure.legend(
            handles,
            names,
            loc="outside lower center",
            ncols=min(3, len(handles)),
            fontsize=9,
            title=legend_title,
            title_fontsize=9,
            frameon=False,
        )
    return figure


def _runs_text(counts: list[int]) -> str:
    """``n=3``, or ``n=2–3`` when the label's panels differ (runs per panel)."""
    low, high = min(counts), max(counts)
    return f"n={low}" if low == high else f"n={low}–{high}"


def png_bytes(figure: Figure, *, dpi: int = 100) -> bytes:
    """``figure`` as PNG bytes."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def write_atomic(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename.

    A reader never sees half a file, and a failure leaves what was there before.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise PlotError(f"--output: folder {str(folder)!r} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# -- mlpq plot -----------------------------------------------------------------------------


@dataclass
class CurvePlot:
    """What ``learning_curves`` drew: the figure, and its panels and curves as data."""

    figure: Figure
    panels: list[Panel]
    runs: int  # runs with at least one point drawn
    log_y: bool


def parse_group_by(value: str | None) -> list[str] | None:
    """``"optimizer,hidden"`` -> ``["optimizer", "hidden"]``, checked against GROUPABLE."""
    from service.results.queries import GROUPABLE

    if value is None:
        return None
    keys = [k.strip() for k in value.split(",") if k.strip()]
    if not keys:
        raise PlotError("--group-by: expected a comma-separated list, e.g. optimizer,hidden")
    for key in keys:
        if key not in GROUPABLE:
            raise PlotError(
                f"--group-by: {key!r} is not a hyperparameter; "
                f"expected some of {', '.join(GROUPABLE)}"
            )
    return keys


def check_choices(*, metric: str, x: str, band: str) -> None:
    """PlotError naming the option when ``metric``, ``x`` or ``band`` is not a choice."""
    if metric not in METRICS:
        raise PlotError(f"--metric: expected one of {', '.join(METRICS)}; got {metric!r}")
    if x not in X_AXES:
        raise PlotError(f"--x: expected one of {', '.join(X_AXES)}; got {x!r}")
    if band not in BANDS:
        raise PlotError(f"--band: expected one of {', '.join(BANDS)}; got {band!r}")


def learning_curves(
    engine: Engine,
    *,
    experiment: str,
    metric: str = "val_loss",
    x: str = "step",
    group_by: list[str] | None = None,
    band: str = "minmax",
) -> CurvePlot:
    """Learning curves of ``experiment``: ``metric`` against ``x``, a panel per dataset.

    Runs are grouped by ``group_by`` (hyperparameters of GROUPABLE) or, by default, by
    everything but the seed (and the dataset, which picks the panel); each group is
    its mean with a band over its runs. Raises PlotError for bad choices and for an
    experiment with no run that logged ``metric``.
    """
    from service.results.queries import GROUPABLE, dataset_labels

    check_choices(metric=metric, x=x, band=band)
    for key in group_by or []:
        if key not in GROUPABLE:
            raise PlotError(f"--group-by: {key!r} is not a hyperparameter")
    exp = find_experiment(engine, experiment)
    runs = experiment_runs(engine, experiment_id=exp.id)
    if not runs:
        raise PlotError(f"{exp.name}: the experiment has no runs")
    datasets = dataset_labels(engine)
    x_metric = X_AXES[x]
    columns = [metric] + ([x_metric] if x_metric != "step" and x_metric != metric else [])
    data = series(engine, run_ids=[r["run_id"] for r in runs], columns=columns)
    if not any(np.isfinite(a[:, 1]).any() for a in data.values()):
        raise PlotError(f"--metric: no run of {exp.name!r} has logged {metric} yet")

    one_panel = group_by is not None and "dataset" in group_by
    labels = _group_labels(runs, group_by, datasets)
    panels: dict[str, dict[str, list[int]]] = {}
    for run in runs:
        panel = exp.name if one_panel else dataset_name(run["dataset"], datasets)
        panels.setdefault(panel, {}).setdefault(labels[run["run_id"]], []).append(run["run_id"])
    x_column = None if x_metric == "step" else columns.index(x_metric) + 1
    ended = {r["run_id"] for r in runs if r["status"] in ENDED}

    def panels_of(log_grid: bool) -> list[Panel]:
        drawn = [
            Panel(
                title,
                group_curves(
                    data,
                    groups,
                    x=x,
                    y_column=1,
                    x_column=x_column,
                    band=band,
                    ended=ended,
                    log_grid=log_grid,
                ),
            )
            for title, groups in panels.items()
        ]
        return [p for p in drawn if p.curves]

    drawn = panels_of(False)
    if not drawn:
        raise PlotError(f"--x: no run of {exp.name!r} has logged {metric} with {x_metric}")
    log_x = x == "evaluations" and use_log_x([c for p in drawn for c in p.curves])
    if log_x:
        drawn = panels_of(True)
    curves = [c for p in drawn for c in p.curves]
    log_y = use_log_scale(metric, curves)
    grouped = ", ".join(group_by) if group_by else "configuration (all but the seed)"
    figure = draw(
        drawn,
        title=f"{exp.name}: {METRIC_LABELS[metric]}, mean over runs by {grouped}; "
        f"band: {BANDS[band]}",
        xlabel=X_LABELS[x] + (" (log scale)" if log_x else ""),
        ylabel=METRIC_LABELS[metric] + (" (log scale)" if log_y else ""),
        log_y=log_y,
        log_x=log_x,
        legend_title=grouped,
    )
    return CurvePlot(figure, drawn, len({i for c in curves for i in c.run_ids}), log_y)


def _group_labels(
    runs: list[dict[str, Any]], group_by: list[str] | None, datasets: dict[str, str]
) -> dict[int, str]:
    if group_by:
        labels = {}
        for run in runs:
            values = [
                dataset_name(run[k], datasets) if k == "dataset" else value_text(run[k])
                for k in group_by
            ]
            if len(group_by) == 1:
                labels[run["run_id"]] = values[0]
            else:
                labels[run["run_id"]] = " ".join(
                    f"{k}={v}" for k, v in zip(group_by, values, strict=True)
                )
        return labels
    # Every setting but the seed and the dataset: the method, then the network's varying parts.
    methods = method_labels(runs)
    varying = [k for k in ("hidden", "activation") if len({r[k] for r in runs}) > 1]
    return {
        r["run_id"]: " ".join([methods[r["run_id"]], *(f"{k}={r[k]}" for k in varying)])
        for r in runs
    }


def check_output(path: str | Path, suffixes: Sequence[str] = ("png", "svg", "pdf")) -> str:
    """The format of output file ``path`` (its suffix); PlotError for another suffix or folder."""
    path = Path(path)
    suffix = path.suffix.lower().lstrip(".")
    if suffix not in suffixes:
        wanted = ", ".join(f".{s}" for s in suffixes)
        raise PlotError(f"--output: expected a file ending in {wanted}; got {str(path)!r}")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise PlotError(f"--output: folder {str(folder)!r} does not exist")
    return suffix


def save_figure(figure: Figure, path: str | Path, *, dpi: int = 110) -> None:
    """Save ``figure`` atomically; the format comes from the suffix (png, svg, pdf)."""
    suffix = check_output(path)
    buffer = io.BytesIO()
    figure.savefig(buffer, format=suffix, dpi=dpi)
    write_atomic(path, buffer.getvalue())
