"""mlpq status / runs / info / top and the run_groups view, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import Engine, text

from cli.output import PlainProgress
from service.results import group_leaderboard, leaderboard
from service.results.runs import FilterError, list_runs, parse_sort, parse_where
from service.results.status import experiment_status
from service.store import Dataset, Experiment, Run, RunStatus, session_scope, write_metrics

SHA = "ab" * 32


def fill(engine: Engine) -> datetime:
    """Experiment "grid": 2 optimizers x 2 learning rates x 3 seeds, some running or diverged.

    Run ids 1..12. Seeds 0 and 1 succeed; seed 2 is running for lr 0.1 (a live
    worker "hostA"), diverged for lr 0.01, and its scores are out of reach.
    Times are relative to now, which it returns.
    """
    now = datetime.now(UTC)
    with session_scope(engine) as session:
        session.add(Dataset(sha256=SHA, name="pumps.csv", format="csv", size=1, data=b"x"))
        exp = Experiment(id=1, name="grid", spec={})
        session.add(exp)
        run_id = 0
        for optimizer in ("backprop", "random_walk"):
            for lr in (0.1, 0.01):
                for seed in range(3):
                    run_id += 1
                    status = RunStatus.succeeded
                    if seed == 2:
                        status = RunStatus.running if lr == 0.1 else RunStatus.diverged
                    done = status != RunStatus.running
                    acc = 0.5 + run_id / 100 if done else None
                    if status == RunStatus.diverged:
                        acc = 0.99  # its best score predates the blow-up
                    session.add(
                        Run(
                            id=run_id,
                            experiment=exp,
                            config={"seed": seed, "dataset": f"csv:{SHA}", "learning_rate": lr},
                            config_hash=f"{run_id:064x}",
                            optimizer=optimizer,
                            dataset=f"csv:{SHA}",
                            hidden="64x32",
                            activation="relu",
                            seed=seed,
                            max_steps=10,
                            learning_rate=lr,
                            status=status,
                            attempt=1,
                            worker="hostA" if status == RunStatus.running else "hostB",
                            heartbeat_at=now - timedelta(seconds=5),
                            started_at=now - timedelta(seconds=100),
                            finished_at=now - timedelta(seconds=100 - 10 * run_id)
                            if done
                            else None,
                            best_val_accuracy=acc,
                            best_val_loss=1.0 / run_id if done else None,
                            wall_seconds=2.0 if done else None,
                        )
                    )
    write_metrics(
        engine,
        1,
        [{"step": s, "train_loss": 1.0 / s, "val_loss": 1.2 / s} for s in range(1, 11)],
    )
    return now


@pytest.fixture
def filled(store_engine: Engine) -> Engine:
    fill(store_engine)
    return store_engine


def expected_groups(engine: Engine, statuses: tuple[str, ...]) -> dict[tuple, list[float]]:
    groups: dict[tuple, list[float]] = {}
    with engine.connect() as conn:
        for optimizer, lr, acc, status in conn.execute(
            text("SELECT optimizer, learning_rate, best_val_accuracy, status FROM runs")
        ):
            if status in statuses and acc is not None:
                groups.setdefault((optimizer, lr), []).append(acc)
    return groups


def test_group_leaderboard_is_mean_and_sample_std_over_seeds(filled: Engine) -> None:
    rows = group_leaderboard(
        filled, experiment="grid", by="best_val_accuracy", group_by=["optimizer", "learning_rate"]
    )
    want = expected_groups(filled, ("succeeded",))
    assert len(rows) == len(want) == 4
    for row in rows:
        values = want[(row["optimizer"], row["learning_rate"])]
        assert row["n_runs"] == len(values) == 2
        assert row["mean"] == pytest.approx(statistics.mean(values))
        assert row["std"] == pytest.approx(statistics.stdev(values))
    assert [r["mean"] for r in rows] == sorted((r["mean"] for r in rows), reverse=True)
    # Losses rank ascending.
    losses = group_leaderboard(
        filled, experiment="grid", by="best_val_loss", group_by=["optimizer"]
    )
    assert [r["mean"] for r in losses] == sorted(r["mean"] for r in losses)


def test_diverged_runs_count_only_when_asked(filled: Engine) -> None:
    plain = leaderboard(filled, experiment="grid", by="best_val_accuracy", include_diverged=False)
    assert "diverged" not in {r["status"] for r in plain}
    both = leaderboard(filled, experiment="grid", by="best_val_accuracy", include_diverged=True)
    assert both[0]["status"] == "diverged"
    groups = group_leaderboard(
        filled, experiment="grid", by="best_val_accuracy", group_by=["optimizer"],
        include_diverged=True,
    )  # fmt: skip
    want = expected_groups(filled, ("succeeded", "diverged"))
    assert {r["n_runs"] for r in groups} == {
        sum(len(v) for k, v in want.items() if k[0] == o) for o in ("backprop", "random_walk")
    }


def test_run_groups_view_matches_the_query(filled: Engine) -> None:
    with filled.connect() as conn:
        view = conn.execute(
            text(
                "SELECT optimizer, learning_rate, n_runs, mean_best_val_accuracy, "
                "var_best_val_accuracy FROM run_groups WHERE experiment = 'grid'"
            )
        ).all()
    want = expected_groups(filled, ("succeeded",))
    assert len(view) == 4
    for optimizer, lr, n, mean, var in view:
        values = want[(optimizer, lr)]
        assert n == len(values)
        assert mean == pytest.approx(statistics.mean(values))
        assert math.sqrt(var) == pytest.approx(statistics.stdev(values))


def test_list_runs_filters_and_sorts(filled: Engine) -> None:
    where = parse_where(["optimizer=backprop", "learning_rate=0.1", "hidden=64x32"])
    rows, total = list_runs(
        filled, experiment="grid", where=where, sort="best_val_accuracy", descending=True
    )
    assert total == 3
    assert [r["run_id"] for r in rows] == [2, 1, 3]  # running run 3 has no score: last
    rows, total = list_runs(filled, experiment="grid", status=["diverged"], limit=1)
    assert total == 2 and [r["run_id"] for r in rows] == [6]
    with pytest.raises(FilterError, match="not a run_summary column"):
        parse_where(["bogus=1"])
    with pytest.raises(FilterError, match="--sort"):
        parse_sort("-nope")
    with pytest.raises(FilterError, match="--status"):
        list_runs(filled, experiment="grid", status=["done"])


def test_status_counts_rate_eta_and_live_workers(store_engine: Engine) -> None:
    now = fill(store_engine)
    filled = store_engine
    with session_scope(filled) as session:
        exp = session.get(Experiment, 1)
        session.expunge(exp)
    status = experiment_status(filled, exp, now=now)
    assert status.counts["succeeded"] == 8 and status.counts["running"] == 2
    assert status.counts["diverged"] == 2 and status.total == 12 and not status.done
    assert status.workers == {"hostA": 2}
    # 10 finished runs between the first start and the last finish (run 12: 120 s later).
    assert status.runs_per_second == pytest.approx(10 / 120)
    assert status.eta_seconds == pytest.approx(2 / (10 / 120))
    later = experiment_status(filled, exp, now=now + timedelta(minutes=5))
    assert later.workers == {}


def test_plain_progress_prints_a_line_every_few_seconds(capsys: pytest.CaptureFixture) -> None:
    clock = iter([0.0, 1.0, 6.0, 7.0, 12.5]).__next__
    progress = PlainProgress(enabled=True, every=5.0)
    progress._clock = clock
    progress._last = clock()
    for done in (1, 2, 3, 4):
        progress.update(done, 10, "1 running")
    assert capsys.readouterr().err.splitlines() == [
        "2/10 runs finished, 1 running",
        "4/10 runs finished, 1 running",
    ]


# --- the commands, as a user runs them --------------------------------------------------


def mlpq(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "FORCE_COLOR")}
    environment.update(COLUMNS="80", **env)
    return subprocess.run(
        [sys.executable, "-c", "from cli.main import main; main()", *args],
        capture_output=True,
        text=True,
        env=environment,
        timeout=120,
    )


def command_paths() -> list[list[str]]:
    from typer.main import get_command

    from cli.main import app

    paths: list[list[str]] = [[]]
    root = get_command(app)
    for name, command in root.commands.items():  # type: ignore[attr-defined]
        paths.append([name])
        for sub in getattr(command, "commands", {}):
            paths.append([name, sub])
    return paths


def test_every_command_has_help_with_an_example() -> None:
    paths = command_paths()
    assert {"status", "runs", "info", "top"} <= {p[0] for p in paths if p}
    for path in paths:
        result = mlpq(*path, "--help")
        assert result.returncode == 0, (path, result.stderr)
        assert "$ mlpq" in result.stdout, path


@pytest.fixture
def cli_store(store_env: str) -> str:
    from service.store import make_engine

    engine = make_engine(store_env)
    try:
        fill(engine)
    finally:
        engine.dispose()
    return store_env


READS = [
    ["ls"],
    ["show", "grid"],
    ["status", "grid"],
    ["runs", "grid", "--sort", "-best_val_accuracy"],
    ["info", "1"],
    ["top", "grid"],
    ["top", "grid", "--group-by", "optimizer,learning_rate"],
]


def test_output_into_a_pipe_or_with_no_color_has_no_escape_codes(cli_store: str) -> None:
    for args in READS:
        for env in ({}, {"NO_COLOR": "1", "FORCE_COLOR": "1"}):
            result = mlpq(*args, **env)
            assert result.returncode == 0, (args, result.stderr)
            assert result.stdout.strip(), args
            assert "\x1b[" not in result.stdout, (args, env)
            assert max(len(line) for line in result.stdout.splitlines()) <= 80, args
    forced = mlpq("runs", "grid", FORCE_COLOR="1")
    assert "\x1b[" in forced.stdout  # the check above could fail


def test_pages_show_what_they_promise(cli_store: str) -> None:
    info = mlpq("info", "1").stdout
    assert "pumps.csv" in info and "csv:" not in info
    assert "train loss" in info and "val loss" in info and "▁" in info
    show = mlpq("show", "grid").stdout
    assert "status" in show and "diverged" not in show.split("\n", 1)[1]
    assert "diverged" in mlpq("show", "grid", "--include-diverged").stdout.split("\n", 1)[1]
    top = mlpq("top", "grid", "--group-by", "optimizer,learning_rate").stdout
    assert "±" in top
    runs = mlpq("runs", "grid", "--where", "optimizer=backprop", "--limit", "2").stdout
    assert "2 of 6 run(s) shown" in runs


def test_json_output_parses(cli_store: str) -> None:
    ls = json.loads(mlpq("ls", "--json").stdout)
    assert ls[0]["experiment"] == "grid" and ls[0]["runs"] == 12
    status = json.loads(mlpq("status", "grid", "--json").stdout)
    assert status["counts"]["running"] == 2 and status["workers"] == {"hostA": 2}
    runs = json.loads(mlpq("runs", "grid", "--status", "running", "--json").stdout)
    assert runs["total"] == 2 and {r["run_id"] for r in runs["runs"]} == {3, 9}
    top = json.loads(mlpq("top", "grid", "--group-by", "optimizer", "--json").stdout)
    assert [r["n_runs"] for r in top["rows"]] == [4, 4]
    assert top["rows"][0]["mean"] >= top["rows"][1]["mean"]


@pytest.mark.parametrize(
    "args",
    [
        ["status", "nope"],
        ["runs", "nope"],
        ["top", "nope"],
        ["info", "999"],
        ["runs", "grid", "--where", "bogus=1"],
        ["runs", "grid", "--where", "optimizer"],
        ["runs", "grid", "--sort", "bogus"],
        ["runs", "grid", "--status", "done"],
        ["top", "grid", "--metric", "bogus"],
        ["top", "grid", "--group-by", "seed"],
    ],
)
def test_bad_input_is_one_line_and_exit_2(cli_store: str, args: list[str]) -> None:
    result = mlpq(*args)
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stdout == ""


def test_dry_run_lists_runs_up_to_the_limit(store_env: str, tmp_path) -> None:
    grid = "examples/quickstart.yaml"
    result = mlpq("submit", grid, "--dry-run", "--limit", "7")
    assert result.returncode == 0, result.stderr
    numbered = [ln for ln in result.stdout.splitlines() if ln[:4].strip("│ ").isdigit()]
    assert len(numbered) == 7
    assert "7 of 48 runs shown" in result.stdout
    assert "48 of 48 runs shown" in mlpq("submit", grid, "--dry-run").stdout


def test_curves_fetches_several_runs_in_run_then_step_order(filled: Engine) -> None:
    from service.results import curves

    write_metrics(filled, 2, [{"step": s, "val_loss": 2.0 / s} for s in (3, 1, 2)])
    rows = [tuple(r) for r in curves(filled, run_ids=[2, 1], metric="val_loss")]
    assert [(r, s) for r, s, _ in rows] == [(1, s) for s in range(1, 11)] + [(2, 1), (2, 2), (2, 3)]
    assert rows[-1][2] == pytest.approx(2.0 / 3)
    with pytest.raises(ValueError, match="metric"):
        curves(filled, run_ids=[1], metric="loss; DROP TABLE runs")


def test_where_and_sort_accept_exactly_the_run_summary_columns(store_engine: Engine) -> None:
    from service.results.runs import SUMMARY_COLUMNS

    with store_engine.connect() as conn:
        columns = tuple(conn.execute(text("SELECT * FROM run_summary WHERE 1 = 0")).keys())
    assert columns == SUMMARY_COLUMNS
