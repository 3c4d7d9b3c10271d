"""Learning curves over seeds as data: an experiment's runs, their metric series, and
each group's mean and band on one x grid (the numbers ``mlpq plot`` and the report draw).

A group's runs (the seeds of one configuration, or whatever ``--group-by`` leaves
together) are put on one x grid and summarized by their mean with a band over the
runs: min..max, or ± one sample standard deviation. Against ``step`` the runs are
aligned on their logged steps; against forward evaluations or seconds each run is
interpolated linearly onto a common grid of the group. A succeeded run (one stopped
early by patience, target_loss or time_limit too) keeps its final value up to the end
of the group's longest run, so the mean does not jump where one seed stops; a run
still going, failed, diverged or cancelled is drawn as far as it got, never extended
(its last value is not where it ended up).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sqlalchemy import Engine, bindparam, text

from engine.metrics import METRICS

#: ``--x`` choices and the metric column each one reads.
X_AXES: dict[str, str] = {"step": "step", "evaluations": "evaluations", "seconds": "elapsed"}
#: ``--band`` choices: the spread drawn around each group's mean.
BANDS: dict[str, str] = {"minmax": "min–max over runs", "std": "± 1 std over runs"}
#: Points of the common x grid a group is interpolated onto (evaluations, seconds).
GRID_POINTS = 200
#: Config keys that say what network a run trains, not how: never part of a method's name.
NETWORK_KEYS: tuple[str, ...] = ("dataset", "target", "task", "hidden", "activation")
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
