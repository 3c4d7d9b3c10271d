"""Learning curves over seeds: the data and the figures behind ``mlpq plot`` and the report.

A group's runs (the seeds of one configuration, or whatever ``--group-by`` leaves
together) are put on one x grid and drawn as their mean with a band over the runs:
min..max, or ± one sample standard deviation. Against ``step`` the runs are aligned
on their logged steps; against forward evaluations or seconds each run is
interpolated linearly onto a common grid of the group. A succeeded run (one stopped
early by patience, target_loss or time_limit too) keeps its final value up to the end
of the group's longest run, so the mean does not jump where one seed stops; a run
still going, failed, diverged or cancelled is drawn as far as it got, never extended
(its last value is not where it ended up).

Matplotlib is imported inside the drawing functions only, with the Agg backend
(no display), so importing this module costs NumPy and nothing more.
"""

from __future__ import annotations

import io
import json
import math
import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from sqlalchemy import Engine, bindparam, text

from engine.metrics import METRICS
from service.exceptions import MlpqError

if TYPE_CHECKING:
    from matplotlib.figure import Figure


class PlotError(MlpqError):
    """A plot or report asked for something the experiment cannot give: one line, exit 2."""

    exit_code = 2


#: ``--x`` choices and the metric column each one reads.
X_AXES: dict[str, str] = {"step": "step", "evaluations": "evaluations", "seconds": "elapsed"}
X_LABELS: dict[str, str] = {
    "step": "step (epoch for backprop, iteration for random walk)",
    "evaluations": "forward evaluations (training-set passes)",
    "seconds": "wall time (s)",
}
#: ``--band`` choices: the spread drawn around each group's mean.
BANDS: dict[str, str] = {"minmax": "min–max over runs", "std": "± 1 std over runs"}
#: Points of the common x grid a group is interpolated onto (evaluations, seconds).
GRID_POINTS = 200
#: Config keys that say what network a run trains, not how: never part of a method's name.
NETWORK_KEYS: tuple[str, ...] = ("dataset", "target", "task", "hidden", "activation")
#: Units and readable names of the metrics, for axis labels.
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
#: Statuses whose last logged value is the run's result: it holds to the group's end.
ENDED = frozenset({"succeeded"})
# Runs per IN (...) list: far below SQLite's bound on statement parameters.
_IDS_PER_STATEMENT = 500

#: Every run of an experiment: its run_summary row, config and error.
RUNS_SQL = """\
SELECT s.*, r.config, r.error
FROM run_summary s
JOIN runs r ON r.id = s.run_id
WHERE s.experiment_id = :experiment_id
ORDER BY s.run_id"""

#: Metric columns ``{columns}`` of several runs, by run then step.
SERIES_SQL = """\
SELECT run_id, step, {columns}
FROM metrics
WHERE run_id IN :run_ids
ORDER BY run_id, step"""


# -- runs and their names ------------------------------------------------------------------


def experiment_runs(engine: Engine, *, experiment_id: int) -> list[dict[str, Any]]:
    """Every run of the experiment: run_summary's columns plus ``config`` (a dict) and ``error``."""
    with engine.connect() as conn:
        rows = [
            dict(r._mapping) for r in conn.execute(text(RUNS_SQL), {"experiment_id": experiment_id})
        ]
    for row in rows:
        if isinstance(row["config"], str):  # SQLite hands JSON back as text
            row["config"] = json.loads(row["config"])
        row["config"] = row["config"] or {}
    return rows


def find_experiment(engine: Engine, name: str) -> Any:
    """The experiment called ``name`` (or with that id), detached; NotFoundError otherwise."""
    from sqlalchemy.orm import Session

    from service.store import get_experiment

    with Session(engine) as session:
        exp = get_experiment(session=session, name=name)
        session.expunge(exp)
    return exp


def value_text(value: Any) -> str:
    """A config value as a grid file would spell it (``32x16``, ``0.05``, ``true``)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list | tuple):
        return "x".join(str(v) for v in value)
    return str(value)


def method_labels(runs: Sequence[dict[str, Any]]) -> dict[int, str]:
    """``{run_id: "random_walk quantize=0.05"}``: the optimizer and its settings that vary.

    A setting is named when it takes more than one value among the runs of that
    optimizer (the network and the seed aside), so runs of one label differ only by
    network and seed. Settings the store has no column for (``quantize``, say) count too.
    """
    by_optimizer: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        by_optimizer.setdefault(run["optimizer"], []).append(run)
    labels: dict[int, str] = {}
    for optimizer, group in by_optimizer.items():
        keys: list[str] = []
        for run in group:
            keys += [k for k in run["config"] if k not in keys]
        varying = [
            k
            for k in keys
            if k not in (*NETWORK_KEYS, "seed", "optimizer")
            and len({json.dumps(r["config"].get(k), sort_keys=True) for r in group}) > 1
        ]
        for run in group:
            parts = [
                f"{k}={value_text(run['config'][k])}"
                for k in varying
                if run["config"].get(k) is not None
            ]
            labels[run["run_id"]] = " ".join([optimizer, *parts])
    return labels


def network_label(run: dict[str, Any], datasets: dict[str, str]) -> str:
    """``moons 32x16 tanh``: the dataset (a CSV by its file name), layer sizes, activation."""
    return f"{dataset_name(run['dataset'], datasets)} {run['hidden'] or '-'} {run['activation']}"


def dataset_name(dataset: str, datasets: dict[str, str]) -> str:
    """A CSV dataset by its file name (``csv:<sha256>`` as stored is unreadable)."""
    return datasets.get(dataset, dataset[:12] + "…" if dataset.startswith("csv:") else dataset)


# -- the metric series ---------------------------------------------------------------------


def series(
    engine: Engine, *, run_ids: Iterable[int], columns: Sequence[str]
) -> dict[int, np.ndarray]:
    """``{run_id: array}`` of shape (n_steps, 1 + len(columns)): step, then ``columns``.

    NULL is NaN. Runs without a logged step are absent. Columns come from
    ``engine.metrics.METRICS`` only.
    """
    for column in columns:
        if column not in METRICS:
            raise ValueError(f"columns: expected some of {', '.join(METRICS)}, got {column!r}")
    ids = sorted(set(run_ids))
    statement = text(SERIES_SQL.format(columns=", ".join(columns))).bindparams(
        bindparam("run_ids", expanding=True)
    )
    out: dict[int, np.ndarray] = {}
    with engine.connect() as conn:
        for start in range(0, len(ids), _IDS_PER_STATEMENT):
            chunk = ids[start : start + _IDS_PER_STATEMENT]
            rows = conn.execute(statement, {"run_ids": chunk}).all()
            if not rows:
                continue
            table = np.array(rows, dtype=float)  # None becomes NaN
            bounds = np.flatnonzero(np.diff(table[:, 0])) + 1
            for part in np.split(table, bounds):
                out[int(part[0, 0])] = part[:, 1:]
    return out


@dataclass
class Curve:
    """One group's curve: the mean over its runs and a band, on a common x grid.

    ``n`` is the number of runs with a value at each x.
    """

    label: str
    x: np.ndarray
    mean: np.ndarray
    low: np.ndarray
    high: np.ndarray
    n: np.ndarray
    run_ids: list[int] = field(default_factory=list)


def aggregate(
    label: str,
    runs: dict[int, tuple[np.ndarray, np.ndarray]],
    *,
    align: bool,
    band: str = "minmax",
    ended: Iterable[int] = (),
    points: int = GRID_POINTS,
    log_grid: bool = False,
) -> Curve | None:
    """The mean and band of ``runs`` (``{run_id: (x, y)}``); None when no run has a finite point.

    ``align``: put the runs on the union of their x values (steps); otherwise
    interpolate each run onto ``points`` evenly spaced x values over the group's range.
    The runs of ``ended`` keep their last value past their last x. ``log_grid``: space
    the grid evenly on a log scale (for a log x axis), when the range is positive.
    """
    ended = set(ended)
    if band not in BANDS:
        raise ValueError(f"band: expected one of {', '.join(BANDS)}, got {band!r}")
    clean: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for run_id, (x, y) in runs.items():
        keep = np.isfinite(x) & np.isfinite(y)
        if keep.any():
            order = np.argsort(x[keep], kind="stable")
            clean[run_id] = (x[keep][order], y[keep][order])
    if not clean:
        return None
    if align:
        grid = np.unique(np.concatenate([x for x, _ in clean.values()]))
        matrix = np.full((len(clean), len(grid)), np.nan)
        for i, (run_id, (x, y)) in enumerate(clean.items()):
            at = np.searchsorted(grid, x)
            matrix[i, at] = y
            if run_id in ended:
                matrix[i, at[-1] + 1 :] = y[-1]
    else:
        low = min(float(x[0]) for x, _ in clean.values())
        high = max(float(x[-1]) for x, _ in clean.values())
        if high <= low:
            grid = np.array([low])
        elif log_grid and low > 0:
            grid = np.geomspace(low, high, points)
        else:
            grid = np.linspace(low, high, points)
        matrix = np.vstack(
            [
                np.interp(grid, x, y, left=np.nan, right=y[-1] if run_id in ended else np.nan)
                for run_id, (x, y) in clean.items()
            ]
        )
    n = np.isfinite(matrix).sum(axis=0)
    keep = n > 0
    matrix, grid, n = matrix[:, keep], grid[keep], n[keep]
    mean = np.nanmean(matrix, axis=0)
    if band == "minmax":
        lo, hi = np.nanmin(matrix, axis=0), np.nanmax(matrix, axis=0)
    else:
        spread = np.zeros_like(mean)
        several = n > 1
        spread[several] = np.nanstd(matrix[:, several], axis=0, ddof=1)
        lo, hi = mean - spread, mean + spread
    return Curve(label, grid, mean, lo, hi, n, sorted(clean))


def group_curves(
    data: dict[int, np.ndarray],
    groups: dict[str, list[int]],
    *,
    x: str,
    y_column: int,
    x_column: int | None,
    band: str,
    ended: Iterable[int] = (),
    log_grid: bool = False,
) -> list[Curve]:
    """One Curve per group of ``groups`` (``{label: run ids}``) that has a finite point.

    ``data`` is what ``series`` returned; ``y_column`` and ``x_column`` index its
    arrays (0 is the step); ``x_column`` None means the step. ``ended``: see ``aggregate``.
    """
    ended = set(ended)
    curves = []
    for label, ids in groups.items():
        runs = {
            i: (data[i][:, 0 if x_column is None else x_column], data[i][:, y_column])
            for i in ids
            if i in data
        }
        curve = aggregate(
            label,
            runs,
            align=x == "step",
            band=band,
            ended=ended & set(runs),
            log_grid=log_grid,
        )
        if curve is not None:
            curves.append(curve)
    return curves


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
