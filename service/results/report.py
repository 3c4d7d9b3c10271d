"""``mlpq report``: one self-contained HTML page comparing the methods of an experiment.

The page compares backprop and random walk (and any variant of either) on the same
networks and seeds: the budget each method had and what it used, final and best
validation results (mean ± std over seeds), loss against forward evaluations and
against wall time, the random walk's acceptance rate, step size and temperature,
a leaderboard of configurations, and the runs that failed or diverged with their
errors.

The page needs nothing but itself: figures are PNGs in ``data:`` URIs, the style
is inline, there is no script and no font or anything else to fetch. Every value
read from the store goes through ``html.escape`` (run errors can hold anything).
"""

from __future__ import annotations

import base64
import math
import statistics
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from html import escape
from typing import Any

import numpy as np
from sqlalchemy import Engine

from service.results.curve_groups import (
    BANDS,
    ENDED,
    X_AXES,
    dataset_name,
    experiment_runs,
    find_experiment,
    group_curves,
    method_labels,
    network_label,
    series,
    value_text,
)
from service.results.plots import (
    METRIC_LABELS,
    X_LABELS,
    Panel,
    color_map,
    draw,
    png_bytes,
    use_log_scale,
    use_log_x,
)

#: The optimizers in the order the page lists them; others follow by name.
OPTIMIZER_ORDER = ("backprop", "random_walk")
#: The random walk's own metrics, drawn against the step.
WALK_METRICS = ("acceptance_rate", "step_size", "temperature")
#: Score columns (best, final) of classification and of regression.
SCORES: dict[str, tuple[str, str]] = {
    "accuracy": ("best_val_accuracy", "final_val_accuracy"),
    "R²": ("best_val_r2", "final_val_r2"),
}
#: Leaderboard rows per dataset.
LEADERBOARD_ROWS = 10
#: Characters of a run's error kept on the page (the end, where the exception is).
ERROR_CHARS = 20_000
#: The loss the curves draw.
CURVE_METRIC = "val_loss"

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 2rem auto;
       max-width: 1320px; padding: 0 1.5rem; color: #1f2328; line-height: 1.45; }
h1 { font-size: 1.6rem; margin-bottom: 0.2rem; }
h2 { font-size: 1.25rem; margin-top: 2.2rem; border-bottom: 1px solid #d0d7de;
     padding-bottom: 0.3rem; }
h3 { font-size: 1.05rem; margin-top: 1.4rem; }
p.meta { color: #59636e; margin-top: 0; }
.note { background: #fff8c5; border: 1px solid #d4a72c66; border-radius: 6px;
        padding: 0.5rem 0.8rem; }
table { border-collapse: collapse; margin: 0.6rem 0 1rem; font-size: 0.9rem; }
th, td { border: 1px solid #d0d7de; padding: 0.3rem 0.6rem; text-align: left;
         vertical-align: top; }
th { background: #f6f8fa; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.best { font-weight: 700; background: #dafbe1; }
small { color: #59636e; }
img { max-width: 100%; height: auto; display: block; margin: 0.6rem 0 1.2rem; }
pre { white-space: pre-wrap; word-break: break-word; background: #f6f8fa; padding: 0.5rem;
      margin: 0.3rem 0; font-size: 0.8rem; max-height: 24rem; overflow: auto; }
details summary { cursor: pointer; font-family: ui-monospace, monospace; font-size: 0.85rem; }
.status-failed { color: #cf222e; font-weight: 600; }
.status-diverged { color: #9a6700; font-weight: 600; }
"""

PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>{css}</style>
</head>
<body>
{body}
</body>
</html>
"""


def esc(value: Any) -> str:
    """Any value as HTML text; None is a dash."""
    return "–" if value is None else escape(str(value), quote=True)


def _num(value: float | None, digits: int = 4) -> str:
    if value is None or not math.isfinite(value):
        return "–"
    if 1e4 <= abs(value) < 1e15:  # counts of evaluations: 16,001 rather than 1.6e+04
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"


def _mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def _spread(values: Sequence[float]) -> str:
    mean, std = _mean_std(values)
    if mean is None:
        return "–"
    return _num(mean) + (f" ± {std:.2g}" if std is not None else "")


def _image(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img alt="{esc(alt)}" src="data:image/png;base64,{data}">'


def _method_order(runs: Iterable[dict[str, Any]]) -> list[str]:
    seen = {r["method"]: r["optimizer"] for r in runs}

    def key(label: str) -> tuple[int, str]:
        opt = seen[label]
        rank = OPTIMIZER_ORDER.index(opt) if opt in OPTIMIZER_ORDER else len(OPTIMIZER_ORDER)
        return rank, label

    return sorted(seen, key=key)


def _distinct(values: Iterable[Any]) -> str:
    found = sorted({value_text(v) for v in values if v is not None}, key=_natural)
    return ", ".join(found) if found else "none"


def _natural(text: str) -> tuple[int, float | str]:
    try:
        return 0, float(text)
    except ValueError:
        return 1, text


def _seeds_text(seeds: Iterable[int]) -> str:
    ordered = sorted(set(seeds))
    if len(ordered) > 2 and ordered == list(range(ordered[0], ordered[-1] + 1)):
        return f"{ordered[0]}–{ordered[-1]}"
    return ", ".join(str(s) for s in ordered)


def _score_kind(runs: Iterable[dict[str, Any]]) -> str | None:
    runs = list(runs)
    for kind, (best, _) in SCORES.items():
        if any(r[best] is not None for r in runs):
            return kind
    return None


# -- the page ------------------------------------------------------------------------------


def build_report(engine: Engine, *, experiment: str, now: datetime | None = None) -> str:
    """The HTML page of ``experiment`` (name or id); NotFoundError when there is none."""
    from service.results.queries import dataset_labels

    exp = find_experiment(engine, experiment)
    runs = experiment_runs(engine, experiment_id=exp.id)
    datasets = dataset_labels(engine)
    methods = method_labels(runs)
    for run in runs:
        run["method"] = methods[run["run_id"]]
        run["network"] = network_label(run, datasets)
        run["dataset_name"] = dataset_name(run["dataset"], datasets)
    now = now or datetime.now(UTC)
    sections = [_header(exp, runs, now)]
    if runs:
        sections += [
            _budget(runs),
            _results(runs),
            _curves(engine, runs),
            _leaderboard(runs),
            _problems(runs),
        ]
    title = f"mlpq report: {exp.name}"
    return PAGE.format(title=esc(title), css=CSS, body="\n".join(sections))


def _header(exp: Any, runs: list[dict[str, Any]], now: datetime) -> str:
    counts: dict[str, int] = {}
    for run in runs:
        counts[run["status"]] = counts.get(run["status"], 0) + 1
    order = ("succeeded", "failed", "diverged", "cancelled", "running", "queued")
    shown = ", ".join(f"{counts[s]} {s}" for s in order if counts.get(s))
    created = exp.created_at.strftime("%Y-%m-%d %H:%M UTC") if exp.created_at else "–"
    parts = [
        f"<h1>{esc(exp.name)}</h1>",
        f'<p class="meta">experiment {esc(exp.id)}, created {esc(created)}; '
        f"page made {esc(now.strftime('%Y-%m-%d %H:%M UTC'))} by mlpq report. "
        f"{len(runs)} run(s): {esc(shown or 'none')}.</p>",
    ]
    notes = []
    if not runs:
        notes.append("This experiment has no runs: there is nothing to compare yet.")
    unfinished = counts.get("running", 0) + counts.get("queued", 0)
    if unfinished:
        notes.append(
            f"{counts.get('running', 0)} run(s) still running and {counts.get('queued', 0)} "
            "queued: this page is a snapshot. Running runs' curves are partial; the tables "
            "count finished runs only."
        )
    optimizers = sorted({r["optimizer"] for r in runs})
    if len(optimizers) == 1:
        notes.append(
            f"Only {esc(optimizers[0])} ran in this experiment, so there is no other method "
            "to compare it with: the page shows it alone."
        )
    parts += [f'<p class="note">{n}</p>' for n in notes]
    return "\n".join(parts)


def _budget(runs: list[dict[str, Any]]) -> str:
    rows = []
    for method in _method_order(runs):
        group = [r for r in runs if r["method"] == method]
        used = [r["evaluations"] for r in group if r["evaluations"] is not None]
        seconds = [r["duration_seconds"] for r in group if r["duration_seconds"] is not None]
        limits = [_distinct(r["max_steps"] for r in group)] + [
            _distinct(r["config"].get(key) for r in group)
            for key in ("max_evaluations", "time_limit")
        ]
        rows.append(
            f"<tr><td>{esc(method)}</td><td class=num>{len(group)}</td>"
            + "".join(f"<td class=num>{esc(v)}</td>" for v in limits)
            + f"<td class=num>{esc(_spread(used))} <small>n={len(used)}</small></td>"
            f"<td class=num>{esc(_spread(seconds))}</td></tr>"
        )
    return (
        "<h2>Budget</h2>\n"
        "<p>What each method was allowed and what it used. A run stops at <code>max_steps</code>"
        " (epochs for backprop, iterations for random walk), at <code>max_evaluations</code> "
        "forward evaluations when the grid sets a budget in evaluations, or at its "
        "<code>time_limit</code>, whichever comes first. An evaluation is one forward pass over"
        " the training set: 1 per backprop epoch, one per candidate per random-walk iteration."
        "</p>\n<table><thead><tr><th>method</th><th>runs</th><th>max_steps</th>"
        "<th>max_evaluations</th><th>time_limit (s)</th>"
        "<th>evaluations used<br><small>mean ± std, finished runs</small></th>"
        "<th>training time (s)<br><small>mean ± std</small></th></tr></thead>\n<tbody>\n"
        + "\n".join(rows)
        + "\n</tbody></table>"
    )


def _networks(runs: list[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(r["network"] for r in runs))


def _results(runs: list[dict[str, Any]]) -> str:
    done = [r for r in runs if r["status"] == "succeeded"]
    head = (
        "<h2>Final and best validation results</h2>\n"
        "<p>Mean ± sample standard deviation over the seeds of the succeeded runs, per network"
        " (dataset, hidden layers, activation) and method. <em>best</em> is the best value a "
        "run reached, <em>final</em> its value at the end. The best mean of a row is marked; "
        "<small>n</small> is shown where fewer seeds than the row's succeeded.</p>"
    )
    if not done:
        return head + '\n<p class="note">No run has succeeded yet.</p>'
    methods = _method_order(runs)
    networks = _networks(done)
    score_rows, loss_rows = [], []
    for network in networks:
        here = [r for r in done if r["network"] == network]
        seeds = {r["seed"] for r in here}
        kind = _score_kind(here)
        cells_score, cells_loss = [], []
        best_score = _best_mean(here, methods, SCORES[kind][0] if kind else None, high=True)
        best_loss = _best_mean(here, methods, "best_val_loss", high=False)
        for method in methods:
            mine = [r for r in here if r["method"] == method]
            if kind:
                best, final = SCORES[kind]
                cells_score += [
                    _cell(mine, best, len(seeds), mark=method == best_score),
                    _cell(mine, final, len(seeds)),
                ]
            cells_loss += [
                _cell(mine, "best_val_loss", len(seeds), mark=method == best_loss),
                _cell(mine, "final_val_loss", len(seeds)),
            ]
        lead = f"<td>{esc(network)}</td><td>{esc(_seeds_text(seeds))}</td>"
        if kind:
            score_rows.append(f"<tr>{lead}<td>{esc(kind)}</td>{''.join(cells_score)}</tr>")
        loss_rows.append(f"<tr>{lead}{''.join(cells_loss)}</tr>")
    method_head = "".join(f"<th colspan=2>{esc(m)}</th>" for m in methods)
    sub_head = "<th>best</th><th>final</th>" * len(methods)
    parts = [head]
    if score_rows:
        parts.append(
            "<h3>Validation accuracy (R² for regression)</h3>\n<table><thead><tr>"
            f"<th rowspan=2>network</th><th rowspan=2>seeds</th><th rowspan=2>score</th>"
            f"{method_head}</tr><tr>{sub_head}</tr></thead>\n<tbody>\n"
            + "\n".join(score_rows)
            + "\n</tbody></table>"
        )
    parts.append(
        "<h3>Validation loss</h3>\n<table><thead><tr>"
        f"<th rowspan=2>network</th><th rowspan=2>seeds</th>{method_head}</tr>"
        f"<tr>{sub_head}</tr></thead>\n<tbody>\n" + "\n".join(loss_rows) + "\n</tbody></table>"
    )
    return "\n".join(parts)


def _best_mean(
    runs: list[dict[str, Any]], methods: list[str], column: str | None, *, high: bool
) -> str | None:
    if column is None:
        return None
    means = {}
    for method in methods:
        mean, _ = _mean_std([r[column] for r in runs if r["method"] == method])
        if mean is not None:
            means[method] = mean
    if len(means) < 2:
        return None
    return (max if high else min)(means, key=means.__getitem__)


def _cell(runs: list[dict[str, Any]], column: str, seeds: int, *, mark: bool = False) -> str:
    values = [r[column] for r in runs if r[column] is not None]
    text = esc(_spread(values))
    if values and len(values) < seeds:
        text += f" <small>n={len(values)}</small>"
    return f'<td class="num{" best" if mark else ""}">{text}</td>'


# -- figures -------------------------------------------------------------------------------


def _curves(engine: Engine, runs: list[dict[str, Any]]) -> str:
    columns = [CURVE_METRIC, X_AXES["evaluations"], X_AXES["seconds"], *WALK_METRICS]
    data = series(engine, run_ids=[r["run_id"] for r in runs], columns=columns)
    head = "<h2>Learning curves</h2>"
    if not data:
        return head + '\n<p class="note">No metrics have been logged yet.</p>'
    methods = _method_order(runs)
    colors = color_map(methods)
    ended = {r["run_id"] for r in runs if r["status"] in ENDED}
    parts = [
        head,
        f"<p>{esc(METRIC_LABELS[CURVE_METRIC].capitalize())} of each method on each network: "
        "the mean over seeds, with a band from the lowest to the highest seed "
        f"({esc(BANDS['minmax'])}). A succeeded run keeps its final value to the end of "
        "its group's longest run.</p>",
    ]
    for x, title in (
        ("evaluations", "against forward evaluations"),
        ("seconds", "against wall time"),
    ):
        panels = _loss_panels(runs, methods, data, columns, x=x, ended=ended)
        parts.append(f"<h3>Validation loss {esc(title)}</h3>")
        curves = [c for p in panels for c in p.curves]
        if not curves:
            parts.append(f'<p class="note">No run has logged {esc(CURVE_METRIC)} yet.</p>')
            continue
        log_x = x == "evaluations" and use_log_x(curves)
        if log_x:
            panels = _loss_panels(runs, methods, data, columns, x=x, ended=ended, log_grid=True)
            curves = [c for p in panels for c in p.curves]
        log_y = use_log_scale(CURVE_METRIC, curves)
        figure = draw(
            panels,
            title=f"{METRIC_LABELS[CURVE_METRIC]} {title}",
            xlabel=X_LABELS[x] + (" (log scale)" if log_x else ""),
            ylabel=METRIC_LABELS[CURVE_METRIC] + (" (log scale)" if log_y else ""),
            log_y=log_y,
            log_x=log_x,
            colors=colors,
            legend_title="method (n = seeds per network)",
        )
        parts.append(_image(png_bytes(figure), f"validation loss {title}, per network"))
    parts.append(_walk(runs, data, columns))
    return "\n".join(parts)


def _loss_panels(
    runs: list[dict[str, Any]],
    methods: list[str],
    data: dict[int, np.ndarray],
    columns: list[str],
    *,
    x: str,
    ended: set[int],
    log_grid: bool = False,
) -> list[Panel]:
    """A panel per network, a curve per method, of CURVE_METRIC against ``x``."""
    panels = []
    for network in _networks(runs):
        groups = {
            m: [r["run_id"] for r in runs if r["network"] == network and r["method"] == m]
            for m in methods
        }
        curves = group_curves(
            data,
            {m: ids for m, ids in groups.items() if ids},
            x=x,
            y_column=columns.index(CURVE_METRIC) + 1,
            x_column=columns.index(X_AXES[x]) + 1,
            band="minmax",
            ended=ended,
            log_grid=log_grid,
        )
        panels.append(Panel(network, curves))
    return panels


def _walk(runs: list[dict[str, Any]], data: dict[int, np.ndarray], columns: list[str]) -> str:
    walks = [r for r in runs if r["optimizer"] == "random_walk"]
    head = "<h3>Random walk: acceptance rate, step size and temperature against step</h3>"
    if not walks:
        return head + "\n<p>No random-walk run in this experiment.</p>"
    shown, constant = [], []
    for metric in WALK_METRICS:
        column = columns.index(metric) + 1
        values = [data[r["run_id"]][:, column] for r in walks if r["run_id"] in data]
        values = [v[np.isfinite(v)] for v in values]
        values = [v for v in values if len(v)]
        if not values:
            constant.append(f"{METRIC_LABELS[metric]}: not logged")
        elif all(v.min() == v.max() for v in values):
            distinct = sorted({float(v[0]) for v in values})
            constant.append(
                f"{METRIC_LABELS[metric]}: constant in every run "
                f"({', '.join(f'{d:g}' for d in distinct)})"
            )
        else:
            shown.append(metric)
    parts = [head]
    if constant:
        parts.append("<p>Not drawn: " + "; ".join(esc(c) for c in constant) + ".</p>")
    if not shown:
        return "\n".join(parts)
    ended = {r["run_id"] for r in walks if r["status"] in ENDED}
    networks = _networks(walks)
    panels = []
    for method in _method_order(walks):
        groups = {
            n: [r["run_id"] for r in walks if r["method"] == method and r["network"] == n]
            for n in networks
        }
        groups = {n: ids for n, ids in groups.items() if ids}
        for metric in shown:
            curves = group_curves(
                data,
                groups,
                x="step",
                y_column=columns.index(metric) + 1,
                x_column=None,
                band="minmax",
                ended=ended,
            )
            name = METRIC_LABELS[metric]
            panels.append(Panel(f"{method}: {name.split(' (')[0]}", curves, ylabel=name))
    figure = draw(
        panels,
        title="random walk: mean over seeds per network, band min–max",
        xlabel="iteration",
        ylabel="value",
        colors=color_map(networks),
        columns=len(shown) if len(shown) > 1 else 3,
        legend_title="network (n = seeds)",
    )
    parts.append(_image(png_bytes(figure), "random walk acceptance rate, step size, temperature"))
    return "\n".join(parts)


# -- tables --------------------------------------------------------------------------------


def configuration_leaderboard(runs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """``{dataset: rows}``: the succeeded runs' configurations ranked by mean best score.

    A configuration is a network and a method (every setting but the seed); its score
    is the best validation accuracy, else R², else (ascending) loss. Each row has
    ``network``, ``method``, ``score``, ``n``, ``mean``, ``std`` (sample; None for one
    run), ``loss`` (mean best validation loss) and ``evaluations`` (mean). The same
    numbers as ``group_leaderboard`` grouped by those keys, with settings the store
    has no column for (``quantize``) telling configurations apart too.
    """
    done = [r for r in runs if r["status"] == "succeeded"]
    board: dict[str, list[dict[str, Any]]] = {}
    for dataset in dict.fromkeys(r["dataset"] for r in done):
        here = [r for r in done if r["dataset"] == dataset]
        kind = _score_kind(here)
        column = SCORES[kind][0] if kind else "best_val_loss"
        groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for r in here:
            groups.setdefault((r["network"], r["method"]), []).append(r)
        rows = []
        for (network, method), members in groups.items():
            mean, std = _mean_std([m[column] for m in members])
            if mean is None:
                continue
            rows.append(
                {
                    "network": network,
                    "method": method,
                    "score": kind or "loss",
                    "n": sum(m[column] is not None for m in members),
                    "mean": mean,
                    "std": std,
                    "loss": _mean_std([m["best_val_loss"] for m in members])[0],
                    "evaluations": _mean_std([m["evaluations"] for m in members])[0],
                }
            )
        rows.sort(key=lambda row: (-row["mean"] if kind else row["mean"], -row["n"]))
        board[dataset] = rows
    return board


def _leaderboard(runs: list[dict[str, Any]]) -> str:
    head = (
        "<h2>Leaderboard</h2>\n<p>Configurations (network and method: every setting but the "
        "seed) ranked by their mean best validation score over seeds, succeeded runs only, "
        f"the best {LEADERBOARD_ROWS} per dataset.</p>"
    )
    board = configuration_leaderboard(runs)
    if not board:
        return head + '\n<p class="note">No run has succeeded yet.</p>'
    names = {r["dataset"]: r["dataset_name"] for r in runs}
    rows = []
    for dataset, ranked in board.items():
        rows.append(f"<tr><th colspan=8>{esc(names[dataset])}</th></tr>")
        for rank, row in enumerate(ranked[:LEADERBOARD_ROWS], 1):
            spread = f" ± {row['std']:.2g}" if row["std"] is not None else ""
            rows.append(
                f"<tr><td class=num>{rank}</td><td>{esc(row['network'])}</td>"
                f"<td>{esc(row['method'])}</td><td class=num>{row['n']}</td>"
                f"<td>{esc(row['score'])}</td>"
                f"<td class=num>{esc(_num(row['mean']) + spread)}</td>"
                f"<td class=num>{esc(_num(row['loss']))}</td>"
                f"<td class=num>{esc(_num(row['evaluations']))}</td></tr>"
            )
    return (
        head + "\n<table><thead><tr><th>#</th><th>network</th><th>method</th><th>n</th>"
        "<th>score</th><th>best validation score<br><small>mean ± std</small></th>"
        "<th>best val loss<br><small>mean</small></th><th>evaluations<br><small>mean</small>"
        "</th></tr></thead>\n<tbody>\n" + "\n".join(rows) + "\n</tbody></table>"
    )


def _problems(runs: list[dict[str, Any]]) -> str:
    bad = [r for r in runs if r["status"] in ("failed", "diverged")]
    head = "<h2>Failed and diverged runs</h2>"
    if not bad:
        return head + "\n<p>None: no run failed or diverged.</p>"
    rows = []
    for r in bad:
        error = (r["error"] or "").rstrip()
        if error:
            last = next((ln for ln in reversed(error.splitlines()) if ln.strip()), error)
            kept = error if len(error) <= ERROR_CHARS else "…" + error[-ERROR_CHARS:]
            shown = (
                f"<details><summary>{esc(last.strip()[:300])}</summary>"
                f"<pre>{esc(kept)}</pre></details>"
            )
        elif r["status"] == "diverged":
            shown = "non-finite loss"
        else:
            shown = "–"
        rows.append(
            f"<tr><td class=num>{esc(r['run_id'])}</td>"
            f'<td class="status-{esc(r["status"])}">{esc(r["status"])}</td>'
            f"<td>{esc(r['method'])}</td><td>{esc(r['network'])}</td>"
            f"<td class=num>{esc(r['seed'])}</td><td class=num>{esc(r['attempt'])}</td>"
            f"<td class=num>{esc(r['iterations'])}</td><td>{shown}</td></tr>"
        )
    return (
        head + f"\n<p>{len(bad)} run(s). A diverged run reached a non-finite loss; a failed "
        "run raised an error (its traceback, last line first).</p>\n"
        "<table><thead><tr><th>run</th><th>status</th><th>method</th><th>network</th>"
        "<th>seed</th><th>attempt</th><th>steps</th><th>error</th></tr></thead>\n<tbody>\n"
        + "\n".join(rows)
        + "\n</tbody></table>"
    )
