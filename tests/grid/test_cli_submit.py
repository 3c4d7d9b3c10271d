"""``mlpq submit`` as a user types it: one-line errors, exit codes, nothing half-written."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import redis
from sqlalchemy import func, select

from service.queue import QUEUE
from service.store import Experiment, Run, make_engine

GRID = """\
name: cli
datasets: [moons]
model: {hidden: [[4], "8x4"], activation: tanh}
seeds: 2
budget: {epochs: 5, iterations: 10}
optimizers:
  - optimizer: backprop
    learning_rate: [0.1, 0.01]
  - optimizer: random_walk
    step_size: 0.1
"""  # 2 networks x 2 seeds x (2 + 1) = 12 runs


def mlpq(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("mlpq")
    cmd = [exe] if exe else [sys.executable, "-c", "from cli.main import main; main()"]
    return subprocess.run(
        [*cmd, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


def queued_runs(redis_url: str) -> int:
    """Runs the queue's messages carry (short runs share a message)."""
    total = 0
    for raw in redis.Redis.from_url(redis_url).lrange(QUEUE, 0, -1):
        (payload,), _kwargs, _embed = json.loads(base64.b64decode(json.loads(raw)["body"]))
        total += len(payload) if isinstance(payload, list) else 1
    return total


def environment(tmp_path: Path, store_url: str, broker_url: str | None, **more: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLPQ_")}
    env.update(MLPQ_HOME=str(tmp_path / "home"), MLPQ_DATABASE_URL=store_url, COLUMNS="160")
    if broker_url:
        env["MLPQ_BROKER_URL"] = broker_url
    env.update({f"MLPQ_{k.upper()}": v for k, v in more.items()})
    return env


def counts(store_url: str) -> tuple[int, int]:
    engine = make_engine(store_url)
    try:
        with engine.connect() as conn:
            experiments = conn.execute(select(func.count()).select_from(Experiment)).scalar()
            runs = conn.execute(select(func.count()).select_from(Run)).scalar()
    finally:
        engine.dispose()
    return experiments, runs


def test_an_invalid_grid_is_one_line_exit_2_and_writes_nothing(
    store_url: str, redis_url: str, tmp_path: Path
) -> None:
    (tmp_path / "grid.yaml").write_text(GRID.replace("step_size: 0.1", "step_size: -0.1"))
    result = mlpq(
        "submit", "grid.yaml", cwd=tmp_path, env=environment(tmp_path, store_url, redis_url)
    )
    assert result.returncode == 2
    assert result.stderr == "mlpq: grid.yaml: optimizers[1].step_size: must be > 0, got -0.1\n"
    assert counts(store_url) == (0, 0)
    assert redis.Redis.from_url(redis_url).llen(QUEUE) == 0


def test_a_grid_file_is_submitted_and_a_second_submit_adds_nothing(
    store_url: str, redis_url: str, tmp_path: Path
) -> None:
    (tmp_path / "grid.yaml").write_text(GRID)
    env = environment(tmp_path, store_url, redis_url)
    first = mlpq("submit", "grid.yaml", cwd=tmp_path, env=env)
    assert first.returncode == 0, first.stderr
    assert "cli (created, id 1): 12 run(s) in the grid: 12 new" in first.stdout
    assert "12 run(s) sent to the broker" in first.stdout
    second = mlpq("submit", "grid.yaml", cwd=tmp_path, env=env)
    assert second.returncode == 0, second.stderr
    assert "0 new" in second.stdout and "12 already queued/running" in second.stdout
    assert counts(store_url) == (1, 12)
    assert queued_runs(redis_url) == 12


def test_inline_options_submit_a_grid_without_a_file(
    sqlite_store_url: str, redis_url: str, tmp_path: Path
) -> None:
    env = environment(tmp_path, sqlite_store_url, redis_url)
    args = ["--dataset", "moons", "--optimizer", "backprop", "--lr", "0.1,0.01"]
    args += ["--hidden", "16,32x16", "--seeds", "3", "--epochs", "5", "--name", "quick"]
    result = mlpq("submit", *args, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    assert "quick (created, id 1): 12 run(s) in the grid: 12 new" in result.stdout
    assert counts(sqlite_store_url) == (1, 12)
    assert queued_runs(redis_url) == 12

    bad = mlpq("submit", "--dataset", "moons", "--lr", "0.1,-1", cwd=tmp_path, env=env)
    assert (bad.returncode, bad.stderr) == (2, "mlpq: --lr: must be > 0, got -1.0\n")
    assert counts(sqlite_store_url) == (1, 12)


def test_dry_run_shows_the_runs_and_writes_nothing(
    sqlite_store_url: str, redis_url: str, tmp_path: Path
) -> None:
    (tmp_path / "grid.yaml").write_text(GRID)
    env = environment(tmp_path, sqlite_store_url, redis_url)
    result = mlpq("submit", "grid.yaml", "--dry-run", cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    assert "cli: 12 run(s) from grid.yaml (dry run: nothing written)" in result.stdout
    assert "learning_rate" in result.stdout and "8x4" in result.stdout
    assert counts(sqlite_store_url) == (0, 0)
    assert redis.Redis.from_url(redis_url).llen(QUEUE) == 0


def test_a_grid_above_max_grid_runs_needs_yes(
    sqlite_store_url: str, redis_url: str, tmp_path: Path
) -> None:
    (tmp_path / "grid.yaml").write_text(GRID)
    env = environment(tmp_path, sqlite_store_url, redis_url, max_grid_runs="10")
    refused = mlpq("submit", "grid.yaml", cwd=tmp_path, env=env)
    assert refused.returncode == 2
    assert refused.stderr == (
        "mlpq: grid.yaml: 12 runs is more than MLPQ_MAX_GRID_RUNS=10; pass --yes to submit them\n"
    )
    assert counts(sqlite_store_url) == (0, 0)
    accepted = mlpq("submit", "grid.yaml", "--yes", cwd=tmp_path, env=env)
    assert accepted.returncode == 0, accepted.stderr
    assert counts(sqlite_store_url) == (1, 12)


# 200 seeds x 16 networks x 16 learning rates = 51,200 runs: at least LAZY_MIN_RUNS, so on
# PostgreSQL the grid is expanded while it is stored. Backprop through step units: a warning.
BIG = f"""\
name: big
datasets: [moons]
model: {{hidden: {[[n] for n in range(1, 17)]}, activation: step}}
seeds: 200
budget: {{epochs: 1}}
optimizers:
  - optimizer: backprop
    learning_rate: {[round(0.01 * k, 2) for k in range(1, 17)]}
"""


@pytest.mark.postgres
def test_a_big_grid_is_stored_as_it_is_expanded_and_one_that_ends_empty_writes_nothing(
    pg_store_url: str, redis_url: str, tmp_path: Path
) -> None:
    from service.grids.loader import LAZY_MIN_RUNS

    assert LAZY_MIN_RUNS <= 200 * 16 * 16
    (tmp_path / "grid.yaml").write_text(BIG)
    env = environment(tmp_path, pg_store_url, redis_url)
    result = mlpq("submit", "grid.yaml", "--yes", cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    assert "big (created, id 1): 51200 run(s) in the grid: 51200 new" in result.stdout
    warning = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "backprop with sign/step" in warning[0]
    assert "(grid runs 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, ... (51200 in all))" in result.stderr
    assert counts(pg_store_url) == (1, 51_200)
    # Every run excluded: found out at the end of the product, inside the transaction.
    (tmp_path / "empty.yaml").write_text(
        BIG.replace("name: big", "name: empty") + "exclude: [{dataset: moons}]\n"
    )
    refused = mlpq("submit", "empty.yaml", "--yes", cwd=tmp_path, env=env)
    assert refused.returncode == 2
    # One line says what is wrong (after the progress bars a grid this big gets).
    errors = [line for line in refused.stderr.splitlines() if line.startswith("mlpq:")]
    assert errors == ["mlpq: empty.yaml: every run is excluded; nothing to submit"]
    assert refused.stderr.endswith(errors[0] + "\n")
    assert counts(pg_store_url) == (1, 51_200)


def test_a_big_grid_that_ends_empty_is_refused_on_sqlite_too(
    sqlite_store_url: str, tmp_path: Path
) -> None:
    # SQLite stores no grid while it is expanded: the product is walked first, as ever.
    (tmp_path / "empty.yaml").write_text(BIG + "exclude: [{dataset: moons}]\n")
    env = environment(tmp_path, sqlite_store_url, None)
    refused = mlpq("submit", "empty.yaml", "--yes", cwd=tmp_path, env=env)
    assert refused.returncode == 2
    errors = [line for line in refused.stderr.splitlines() if line.startswith("mlpq:")]
    assert errors == ["mlpq: empty.yaml: every run is excluded; nothing to submit"]
    assert counts(sqlite_store_url) == (0, 0)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["grid.yaml", "--lr", "0.1"], "mlpq: --lr: give a grid file or inline options, not both"),
        ([], "mlpq: submit: give a grid file (mlpq submit grid.yaml) or --dataset ..."),
        (["missing.yaml"], "mlpq: missing.yaml: no such file"),
    ],
)
def test_usage_mistakes_are_one_line_and_exit_2(
    sqlite_store_url: str, tmp_path: Path, args: list[str], message: str
) -> None:
    (tmp_path / "grid.yaml").write_text(GRID)
    result = mlpq("submit", *args, cwd=tmp_path, env=environment(tmp_path, sqlite_store_url, None))
    assert (result.returncode, result.stderr) == (2, message + "\n")
    assert counts(sqlite_store_url) == (0, 0)


def test_an_unreachable_broker_is_one_line_and_writes_nothing(
    sqlite_store_url: str, tmp_path: Path
) -> None:
    (tmp_path / "grid.yaml").write_text(GRID)
    env = environment(tmp_path, sqlite_store_url, "redis://127.0.0.1:9/0")
    result = mlpq("submit", "grid.yaml", cwd=tmp_path, env=env)
    assert result.returncode == 1
    assert result.stderr.startswith("mlpq: broker redis://127.0.0.1:9/0: cannot connect")
    assert result.stderr.count("\n") == 1
    assert counts(sqlite_store_url) == (0, 0)


@pytest.mark.slow
def test_the_quickstart_example_trains_with_no_server(tmp_path: Path) -> None:
    import sqlite3

    example = Path(__file__).resolve().parents[2] / "examples" / "quickstart.yaml"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLPQ_")}
    result = mlpq("run", str(example), "--concurrency", "2", cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    with sqlite3.connect(tmp_path / ".mlpq" / "mlpq.db") as conn:
        statuses = conn.execute("SELECT status, count(*) FROM runs GROUP BY status").fetchall()
    assert statuses == [("succeeded", 48)]
