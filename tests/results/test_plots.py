"""mlpq plot and mlpq report: curves over seeds, the HTML page, and the page in Chromium."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import Engine

from service.store import Experiment, Run, RunStatus, session_scope, write_metrics

ERROR = (
    "Traceback (most recent call last):\n  ...\nValueError: bad <script>alert('x')</script> & co"
)
SEEDS = (0, 1, 2)


def _curve(optimizer: str, seed: int, steps: int, regression: bool) -> list[dict]:
    per_step = 1 if optimizer == "backprop" else 4
    rows = []
    for step in range(1, steps + 1):
        loss = (1.0 + 0.1 * seed) / step
        row = {
            "step": step,
            "train_loss": loss * 0.9,
            "val_loss": loss,
            "evaluations": 1.0 + per_step * step,
            "elapsed": 0.01 * step * (1 + seed / 10),
        }
        if regression:
            row["val_r2"] = 1 - loss
        else:
            row["val_accuracy"] = 1 - loss / 2
        if optimizer == "random_walk":
            row.update(acceptance_rate=1.0 / step, step_size=0.1 * (1 + step / 10), temperature=0.0)
        rows.append(row)
    return rows


def fill(engine: Engine) -> None:
    """Experiment "cmp": backprop and random walk on moons (accuracy) and sine (r2), seeds 0-2.

    Seed 2 is special: moons/backprop failed (an error with HTML in it), sine/random_walk
    diverged, moons/random_walk is still running. A budget in evaluations (max_evaluations
    40) is in every run's config. Experiment "solo": backprop only, summaries but no
    metrics. "waiting": queued runs only. "empty": no runs.
    """
    plan = []
    for dataset, regression in (("moons", False), ("sine", True)):
        for optimizer, steps in (("backprop", 39), ("random_walk", 10)):
            for seed in SEEDS:
                status = RunStatus.succeeded
                if seed == 2:
                    status = {
                        ("moons", "backprop"): RunStatus.failed,
                        ("sine", "random_walk"): RunStatus.diverged,
                        ("moons", "random_walk"): RunStatus.running,
                    }.get((dataset, optimizer), status)
                plan.append((dataset, regression, optimizer, steps, seed, status))
    with session_scope(engine) as session:
        cmp = Experiment(name="cmp", spec={})
        solo = Experiment(name="solo", spec={})
        waiting = Experiment(name="waiting", spec={})
        session.add_all([cmp, solo, waiting, Experiment(name="empty", spec={})])
        runs = []
        for dataset, regression, optimizer, steps, seed, status in plan:
            config = {"dataset": dataset, "hidden": [8], "activation": "tanh",
                      "optimizer": optimizer, "seed": seed, "max_steps": steps,
                      "max_evaluations": 40}  # fmt: skip
            if optimizer == "random_walk":
                config["candidates"] = 4
            finished = status != RunStatus.running
            curve = _curve(optimizer, seed, steps, regression)
            score = "r2" if regression else "accuracy"
            summary = {}
            if finished and status != RunStatus.failed:
                summary = {
                    f"best_val_{score}": curve[-1][f"val_{score}"],
                    f"final_val_{score}": curve[-1][f"val_{score}"] - 0.01,
                    "best_val_loss": curve[-1]["val_loss"],
                    "final_val_loss": curve[-1]["val_loss"] + 0.01,
                    "evaluations": curve[-1]["evaluations"],
                    "wall_seconds": curve[-1]["elapsed"],
                    "iterations": steps,
                }
            runs.append(
                Run(
                    experiment=cmp,
                    config=config,
                    config_hash=f"{len(runs):064x}",
                    optimizer=optimizer,
                    dataset=dataset,
                    hidden="8",
                    activation="tanh",
                    seed=seed,
                    max_steps=steps,
                    status=status,
                    attempt=1,
                    error=ERROR if status == RunStatus.failed else None,
                    candidates=config.get("candidates"),
                    **summary,
                )
            )
        for seed in SEEDS:
            runs.append(
                Run(
                    experiment=solo,
                    config={"optimizer": "backprop", "seed": seed},
                    config_hash="s" * 64,
                    optimizer="backprop",
                    dataset="moons",
                    hidden="8",
                    activation="relu",
                    seed=seed,
                    max_steps=5,
                    status=RunStatus.succeeded,
                    best_val_accuracy=0.9,
                    final_val_accuracy=0.8,
                    best_val_loss=0.3,
                )
            )
            runs.append(
                Run(
                    experiment=waiting,
                    config={"optimizer": "random_walk", "seed": seed},
                    config_hash="w" * 64,
                    optimizer="random_walk",
                    dataset="moons",
                    hidden="8",
                    activation="relu",
                    seed=seed,
                    max_steps=5,
                )
            )
        session.add_all(runs)
        session.flush()
        ids = [(run.id, step) for run, step in zip(runs, plan, strict=False)]
    for run_id, (_, regression, optimizer, steps, seed, status) in ids:
        curve = _curve(optimizer, seed, steps, regression)
        if status in (RunStatus.running, RunStatus.failed):
            curve = curve[: steps // 2]
        write_metrics(engine, run_id, curve)


@pytest.fixture
def filled(store_engine: Engine) -> Engine:
    fill(store_engine)
    return store_engine


def mlpq(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "from cli.main import main; main()", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )


@pytest.fixture
def cli_store(
    sqlite_store_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[str]:
    """The filled store for the commands, on SQLite only: the SQL they run is what the
    in-process tests run on both stores; what the commands add is the same on either."""
    from service.settings import get_settings
    from service.store import make_engine

    monkeypatch.setenv("MLPQ_HOME", str(tmp_path / "mlpq-home"))
    monkeypatch.setenv("MLPQ_DATABASE_URL", sqlite_store_url)
    get_settings.cache_clear()
    engine = make_engine(sqlite_store_url)
    try:
        fill(engine)
    finally:
        engine.dispose()
    yield sqlite_store_url
    get_settings.cache_clear()


def not_blank(png: bytes | Path) -> bool:
    """Whether an image has some spread of values and more than a few colours."""
    from matplotlib.image import imread

    pixels = imread(io.BytesIO(png) if isinstance(png, bytes) else png)
    rgb = pixels[..., :3].reshape(-1, 3)
    levels = (rgb * 255).astype(np.uint32)
    colours = np.unique(levels[:, 0] << 16 | levels[:, 1] << 8 | levels[:, 2])
    return float(rgb.std()) > 0.02 and len(colours) > 8


# --- mlpq plot ----------------------------------------------------------------------------


def test_plot_writes_a_png_that_is_not_blank(cli_store: str, tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    out = tmp_path / "out" / "curves.png"
    result = mlpq("plot", "cmp", "--metric", "val_loss", "--x", "evaluations", "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert f"wrote {out}" in result.stdout
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not_blank(out)
    assert [p.name for p in out.parent.iterdir()] == ["curves.png"]  # no temporary file left


def test_group_by_draws_one_line_per_group_with_mean_and_band_over_seeds(filled: Engine) -> None:
    from service.results.plots import learning_curves

    drawn = learning_curves(
        filled, experiment="cmp", metric="val_loss", x="step", group_by=["optimizer"]
    )
    assert [p.title for p in drawn.panels] == ["moons", "sine"]
    for panel, axes in zip(drawn.panels, drawn.figure.axes, strict=False):
        assert [c.label for c in panel.curves] == ["backprop", "random_walk"]
        assert len(axes.get_lines()) == 2
    sine_bp = drawn.panels[1].curves[0]
    losses = np.array([[(1.0 + 0.1 * s) / t for t in range(1, 40)] for s in SEEDS])
    assert sine_bp.x.tolist() == list(range(1, 40))
    np.testing.assert_allclose(sine_bp.mean, losses.mean(axis=0))
    np.testing.assert_allclose(sine_bp.low, losses.min(axis=0))
    np.testing.assert_allclose(sine_bp.high, losses.max(axis=0))
    assert drawn.runs == 12 and drawn.log_y  # 1/step spans more than a decade
    # Without --group-by: every setting but the seed; the budget is the same, so the method.
    default = learning_curves(filled, experiment="cmp", metric="val_accuracy")
    assert [p.title for p in default.panels] == ["moons"]
    assert {c.label for c in default.panels[0].curves} == {"backprop", "random_walk"}


def test_curves_interpolate_onto_a_common_grid_and_ended_runs_hold_their_last_value() -> None:
    from service.results.curve_groups import aggregate

    runs = {
        1: (np.array([0.0, 10.0]), np.array([0.0, 10.0])),
        2: (np.array([0.0, 5.0]), np.array([2.0, 7.0])),
    }
    held = aggregate("g", runs, align=False, band="minmax", ended={2}, points=11)
    assert held.x.tolist() == list(range(11))
    np.testing.assert_allclose(held.mean[:6], (np.arange(6) + np.arange(6) + 2) / 2)
    np.testing.assert_allclose(held.mean[6:], (np.arange(6, 11) + 7) / 2)
    assert held.n.tolist() == [2] * 11
    going = aggregate("g", runs, align=False, band="std", points=11)
    assert going.n.tolist() == [2] * 6 + [1] * 5
    np.testing.assert_allclose(going.mean[6:], np.arange(6, 11))
    np.testing.assert_allclose(going.high[:6] - going.mean[:6], np.full(6, np.sqrt(2)))
    stepped = aggregate("g", {1: (np.array([1.0, 3.0]), np.array([1.0, np.nan]))}, align=True)
    assert stepped.x.tolist() == [1.0]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["plot", "nope"], "experiment: no experiment named 'nope'"),
        (["plot", "cmp", "--metric", "loss"], "--metric: expected one of"),
        (["plot", "cmp", "--x", "time"], "--x: expected one of step, evaluations, seconds"),
        (["plot", "cmp", "--metric", "grad_norm"], "no run of 'cmp' has logged grad_norm"),
        (["plot", "empty"], "the experiment has no runs"),
        (["plot", "cmp", "--group-by", "seed"], "--group-by: 'seed' is not a hyperparameter"),
        (["plot", "cmp", "--band", "iqr"], "--band: expected one of minmax, std"),
        (["plot", "cmp", "-o", "curves.txt"], "--output: expected a file ending in .png"),
        (["plot", "cmp", "-o", "no/such/dir/c.png"], "--output: folder"),
        (["report", "nope"], "experiment: no experiment named 'nope'"),
        (["report", "cmp", "-o", "report.png"], "--output: expected a file ending in .html"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    cli_store: str, tmp_path: Path, args: list[str], message: str
) -> None:
    (tmp_path / "cwd").mkdir()
    result = mlpq(*args, cwd=tmp_path / "cwd")
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("mlpq: ") and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert result.stdout == "" and list((tmp_path / "cwd").iterdir()) == []


# --- mlpq report --------------------------------------------------------------------------

EXTERNAL = re.compile(r"""(?:src|href)\s*=\s*["']?\s*(?!data:|#)[^"'\s>]""", re.I)


def images(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([^"]+)"', page)]


def assert_self_contained(page: str) -> None:
    lowered = page.lower()
    assert "<script" not in lowered and "javascript:" not in lowered
    assert "http://" not in lowered and "https://" not in lowered
    assert "url(" not in lowered and "@import" not in lowered
    assert not EXTERNAL.findall(page), EXTERNAL.findall(page)
    assert not re.search(r"""(?:src|href)\s*=\s*["']?//""", page)


def test_report_compares_the_methods_in_one_self_contained_page(filled: Engine) -> None:
    from service.results.report import build_report

    page = build_report(filled, experiment="cmp")
    for heading in (
        "Budget",
        "Final and best validation results",
        "Validation loss against forward evaluations",
        "Validation loss against wall time",
        "Random walk: acceptance rate, step size and temperature",
        "Leaderboard",
        "Failed and diverged runs",
    ):
        assert f">{heading}" in page, heading
    assert_self_contained(page)
    # The error is shown, escaped: its markup is text, never markup.
    assert "ValueError: bad &lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; co" in page
    # The budget: max_evaluations from the config, the evaluations used per method.
    budget = page.split(">Budget<", 1)[1].split("<h2>", 1)[0]
    assert budget.count("<td class=num>40</td>") == 2
    assert "<td class=num>40 ± 0 <small>n=5</small></td>" in budget  # backprop: 1 + 39 x 1
    assert "<td class=num>41 ± 0 <small>n=5</small></td>" in budget  # random walk: 1 + 10 x 4
    # Regression rows show R², classification rows accuracy; a still-running run is noted.
    assert "<td>sine 8 tanh</td><td>0–2</td><td>R²</td>" in page
    assert "<small>n=2</small>" in page.split("<td>sine 8 tanh</td>", 1)[1].split("</tr>")[0]
    assert "<td>moons 8 tanh</td><td>0, 1</td><td>accuracy</td>" in page
    assert "1 run(s) still running and 0 queued" in page
    assert "diverged" in page and "non-finite loss" in page
    # Temperature is 0 throughout: said in words, not drawn.
    assert "temperature T: constant in every run (0)" in page
    pictures = images(page)
    assert len(pictures) == 3 and all(not_blank(p) for p in pictures)


def test_report_leaderboard_matches_the_group_leaderboard(filled: Engine) -> None:
    from service.results import group_leaderboard
    from service.results.curve_groups import experiment_runs, find_experiment, method_labels
    from service.results.report import configuration_leaderboard

    runs = experiment_runs(filled, experiment_id=find_experiment(filled, "cmp").id)
    labels = method_labels(runs)
    for run in runs:
        run["method"], run["network"] = labels[run["run_id"]], run["dataset"]
    ours = configuration_leaderboard(runs)
    sql = group_leaderboard(
        filled, experiment="cmp", by="best_val_accuracy", group_by=["dataset", "optimizer"]
    )
    assert [(r["method"], r["n"], r["mean"], r["std"]) for r in ours["moons"]] == [
        (r["optimizer"], r["n_runs"], pytest.approx(r["mean"]), pytest.approx(r["std"]))
        for r in sql
    ]


@pytest.mark.parametrize(
    ("experiment", "says"),
    [
        ("solo", ["Only backprop ran in this experiment", "No metrics have been logged yet"]),
        ("waiting", ["0 run(s) still running and 3 queued", "No run has succeeded yet"]),
        ("empty", ["This experiment has no runs"]),
    ],
)
def test_report_says_what_is_missing_instead_of_failing(
    cli_store: str, tmp_path: Path, experiment: str, says: list[str]
) -> None:
    out = tmp_path / "page.html"
    result = mlpq("report", experiment, "-o", str(out))
    assert result.returncode == 0, result.stderr
    page = out.read_text()
    for text in says:
        assert text in page, text
    assert_self_contained(page)


# --- the page in a browser ----------------------------------------------------------------

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-extensions",
]  # fmt: skip


def chromium() -> str:
    binary = shutil.which("chromium")
    if binary is None:
        message = "chromium is not installed (apt-get install chromium)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message + "; CI=true: the report's browser test is required", pytrace=False)
        pytest.skip(message)
    return binary


def browse(page: Path, tmp: Path, unused_port: int, *extra: str) -> subprocess.CompletedProcess:
    """Chromium on ``page`` with every host name resolved to a closed port on this machine."""
    profile = tmp / f"profile-{len(list(tmp.glob('profile-*')))}"
    return subprocess.run(
        [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
         f"--host-resolver-rules=MAP * 127.0.0.1:{unused_port}", *extra, page.as_uri()],
        capture_output=True, timeout=120,
    )  # fmt: skip


def page_requests(net_log: Path) -> list[str]:
    """URLs the page asked the network for: requests whose initiator is a document.

    Chromium itself (its updater, its account check) makes requests of its own even with
    the flags above; they are initiated by no origin and are left out.
    """
    log = json.loads(net_log.read_text())
    start = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    urls = []
    for event in log["events"]:
        params = event.get("params") or {}
        if event["type"] != start or "url" not in params:
            continue
        document = params.get("initiator") != "not an origin"
        if document or "file://" in str(params.get("site_for_cookies")):
            urls.append(params["url"])
    return urls


def test_report_renders_in_chromium_without_loading_anything(
    cli_store: str, tmp_path: Path, unused_port: int
) -> None:
    chromium()
    report = tmp_path / "report.html"
    assert mlpq("report", "cmp", "-o", str(report)).returncode == 0
    shot, net_log = tmp_path / "shot.png", tmp_path / "net.json"
    result = browse(
        report, tmp_path, unused_port, f"--screenshot={shot}", "--window-size=1280,3000",
        f"--log-net-log={net_log}",
    )  # fmt: skip
    assert result.returncode == 0 and shot.exists(), result.stderr[-2000:]
    assert not_blank(shot)
    assert page_requests(net_log) == []
    # The check above sees a page that does load something.
    control = tmp_path / "control.html"
    control.write_text('<img src="http://img.invalid/a.png"><p>control</p>')
    browse(control, tmp_path, unused_port, f"--log-net-log={tmp_path / 'control.json'}",
           "--screenshot=" + str(tmp_path / "control.png"))  # fmt: skip
    assert page_requests(tmp_path / "control.json") == ["http://img.invalid/a.png"]
    # Every image decoded: a test copy of the page records each <img>'s width after load.
    probe = tmp_path / "probe.html"
    probe.write_text(
        report.read_text().replace(
            "</body>",
            '<script>addEventListener("load", () => document.body.dataset.widths = '
            "[...document.images].map(i => i.complete ? i.naturalWidth : 0).join())</script>"
            "</body>",
        )
    )
    dom = browse(probe, tmp_path, unused_port, "--virtual-time-budget=5000", "--dump-dom")
    widths = re.search(rb'data-widths="([^"]*)"', dom.stdout)
    assert widths is not None, dom.stderr[-2000:]
    assert len(widths.group(1).split(b",")) == 3
    assert all(int(w) > 0 for w in widths.group(1).split(b","))


# --- end to end ---------------------------------------------------------------------------


def test_plot_and_report_of_a_real_grid(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from service.settings import get_settings

    monkeypatch.setenv("MLPQ_HOME", str(tmp_path / "mlpq-home"))  # the embedded store
    monkeypatch.delenv("MLPQ_DATABASE_URL", raising=False)
    monkeypatch.delenv("MLPQ_BROKER_URL", raising=False)
    get_settings.cache_clear()
    run = mlpq(
        "run", "--dataset", "moons", "--optimizer", "backprop,random_walk", "--hidden", "8",
        "--activation", "tanh",
        "--seeds", "2", "--epochs", "15", "--iterations", "5", "--candidates", "3",
        "--concurrency", "2", "--name", "real", cwd=tmp_path,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    plot = mlpq("plot", "real", "--x", "seconds", "--group-by", "optimizer", cwd=tmp_path)
    assert plot.returncode == 0, plot.stderr
    assert "4 run(s), 2 group(s), 1 panel(s)" in plot.stdout
    assert not_blank(tmp_path / "curves.png")
    report = mlpq("report", "real", cwd=tmp_path)
    assert report.returncode == 0, report.stderr
    page = (tmp_path / "report.html").read_text()
    assert_self_contained(page)
    assert "backprop" in page and "random_walk" in page and "moons 8 tanh" in page
    assert all(not_blank(p) for p in images(page))
