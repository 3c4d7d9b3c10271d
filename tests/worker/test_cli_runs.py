"""The run commands as a user types them: mlpq run (embedded), worker, cancel, retry, ls, show."""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import Engine
from worker_testlib import REPO, TINY_BACKPROP, add_runs, run_rows, wait_for, worker_env

from service.store import RunStatus

GRID = """\
name: tiny
datasets: [moons]
seeds: 2
model: {hidden: [[4], [8]], activation: tanh}
budget: {epochs: 15, iterations: 15}
optimizers:
  - optimizer: backprop
    learning_rate: [0.05, 0.2]
  - optimizer: random_walk
    step_size: 0.1
"""


def _mlpq(*args: str, cwd: Path, env: dict[str, str], timeout: float = 120):
    exe = shutil.which("mlpq")
    cmd = [exe] if exe else [sys.executable, "-c", "from cli.main import main; main()"]
    return subprocess.run(
        [*cmd, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.slow
def test_embedded_run_trains_a_grid_file_with_no_server_and_no_settings(tmp_path: Path) -> None:
    (tmp_path / "grid.yaml").write_text(GRID)
    env = worker_env()  # no MLPQ_* at all
    result = _mlpq("run", "grid.yaml", "--concurrency", "2", cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    db = tmp_path / ".mlpq" / "mlpq.db"
    with sqlite3.connect(db) as conn:
        statuses = conn.execute("SELECT status, count(*) FROM runs GROUP BY status").fetchall()
        weights = conn.execute("SELECT count(*) FROM artifacts WHERE kind = 'weights'").fetchone()
        steps = conn.execute(
            "SELECT r.id, r.max_steps, count(m.step), max(m.step) FROM runs r "
            "JOIN metrics m ON m.run_id = r.id GROUP BY r.id, r.max_steps"
        ).fetchall()
    assert statuses == [("succeeded", 12)]  # 2 seeds x 2 hidden x (2 learning rates + 1)
    assert weights == (12,)
    assert all(n == last == max_steps for _id, max_steps, n, last in steps) and len(steps) == 12
    assert "tiny: 12 succeeded" in result.stdout
    assert "top 10 by best_val_accuracy" in result.stdout
    # Running it again re-trains nothing: every config already succeeded.
    again = _mlpq("run", "grid.yaml", cwd=tmp_path, env=env)
    assert again.returncode == 0, again.stderr
    assert "12 skipped" in again.stdout
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT count(*), max(attempt) FROM runs").fetchone() == (12, 1)


def test_invalid_grid_is_one_line_and_starts_no_worker(tmp_path: Path) -> None:
    (tmp_path / "grid.yaml").write_text(GRID.replace("step_size: 0.1", "step_size: -1"))
    result = _mlpq("run", "grid.yaml", cwd=tmp_path, env=worker_env())
    assert result.returncode == 2
    assert result.stderr.startswith("mlpq: grid.yaml: ") and "step_size" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / ".mlpq" / "logs").exists()


def test_worker_command_pins_one_blas_thread_per_process_and_uses_every_cpu(tmp_path: Path) -> None:
    env = worker_env(home=tmp_path / "home")
    exe = shutil.which("mlpq")
    cmd = [exe] if exe else [sys.executable, "-c", "from cli.main import main; main()"]
    log = open(tmp_path / "worker.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [*cmd, "worker"],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_for(
            lambda: b"ready." in (tmp_path / "worker.log").read_bytes(),
            timeout=30,
            what="the worker to start",
        )
        # `mlpq worker` execs the Celery worker (python -m worker) in place: same pid,
        # environment set before NumPy loads; a prefork pool of --concurrency processes.
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")
        assert cmdline[1:3] == [b"-m", b"worker"]
        banner = (tmp_path / "worker.log").read_text()
        assert f"concurrency: {os.cpu_count()} (prefork)" in banner
        # --concurrency defaults to the CPU count.
        assert cmdline[cmdline.index(b"--concurrency") + 1] == str(os.cpu_count()).encode()
        environ = dict(
            item.split(b"=", 1)
            for item in Path(f"/proc/{proc.pid}/environ").read_bytes().split(b"\0")
            if b"=" in item
        )
        for var in (b"OMP_NUM_THREADS", b"OPENBLAS_NUM_THREADS", b"MKL_NUM_THREADS"):
            assert environ[var] == b"1"
    finally:
        # Nothing to finish here: kill the worker and its children at once.
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        log.close()


@pytest.fixture
def cli_env(store_url: str, tmp_path: Path) -> dict[str, str]:
    # Wide enough that rich wraps no table cell.
    return {**worker_env(database_url=store_url, home=tmp_path / "home"), "COLUMNS": "200"}


def _engine(url: str) -> Engine:
    from service.store import make_engine

    return make_engine(url)


def test_cancel_and_retry_from_the_command_line(
    store_url: str, cli_env: dict[str, str], tmp_path: Path
) -> None:
    engine = _engine(store_url)
    try:
        a, b, c = add_runs(engine, [{**TINY_BACKPROP, "seed": s} for s in range(3)], name="e1")
        with engine.begin() as conn:
            from service.store import Run

            conn.execute(
                Run.__table__.update()
                .where(Run.id == a)
                .values(status=RunStatus.failed, error="boom", published=True)
            )
            conn.execute(
                Run.__table__.update()
                .where(Run.id == b)
                .values(
                    status=RunStatus.running,
                    worker="gone:1",
                    attempt=1,
                    published=True,
                    heartbeat_at=None,
                )
            )
        result = _mlpq("cancel", "e1", cwd=tmp_path, env=cli_env)
        assert result.returncode == 0, result.stderr
        assert "1 queued run(s) cancelled, 1 running run(s) asked to stop" in result.stdout
        rows = run_rows(engine)
        assert RunStatus(rows[c].status) is RunStatus.cancelled
        assert rows[b].cancel_requested

        retry = _mlpq("retry", "e1", "--failed", cwd=tmp_path, env=cli_env)
        assert retry.returncode == 0, retry.stderr
        assert "1 finished run(s) restarted" in retry.stdout
        assert "1 run(s) sent to the broker" in retry.stdout
        rows = run_rows(engine)
        assert RunStatus(rows[a].status) is RunStatus.queued and rows[a].published
        assert rows[a].error is None

        again = _mlpq("retry", "e1", "--queued", cwd=tmp_path, env=cli_env)
        assert again.returncode == 0, again.stderr
        assert "1 run(s) sent to the broker" in again.stdout  # run a, queued and already sent

        missing = _mlpq("cancel", "nope", cwd=tmp_path, env=cli_env)
        assert missing.returncode == 2
        assert missing.stderr.strip() == (
            "mlpq: experiment: no experiment named 'nope' (see `mlpq ls`)"
        )
    finally:
        engine.dispose()


def test_ls_and_show_print_progress_and_the_leaderboard(
    store_url: str, cli_env: dict[str, str], tmp_path: Path
) -> None:
    from service.store import claim_run, finish_run, session_scope

    engine = _engine(store_url)
    try:
        ids = add_runs(engine, [{**TINY_BACKPROP, "seed": s} for s in range(3)], name="board")
        for run_id, acc in zip(ids[:2], (0.75, 0.9), strict=True):
            with session_scope(engine) as session:
                claim = claim_run(
                    session=session, run_id=run_id, worker="w:1", stale_seconds=60, max_attempts=3
                )
                finish_run(
                    session=session,
                    run_id=run_id,
                    worker="w:1",
                    attempt=claim.attempt,
                    status=RunStatus.succeeded,
                    summary={"best_val_accuracy": acc},
                )
        ls = _mlpq("ls", cwd=tmp_path, env=cli_env)
        assert ls.returncode == 0, ls.stderr
        assert "board" in ls.stdout and "2/3" in ls.stdout and "1 queued" in ls.stdout
        show = _mlpq("show", "board", cwd=tmp_path, env=cli_env)
        assert show.returncode == 0, show.stderr
        lines = [ln for ln in show.stdout.splitlines() if "│" in ln]
        assert [ln.split("│")[1].strip() for ln in lines] == [str(ids[1]), str(ids[0])]
        assert "0.9" in lines[0]
    finally:
        engine.dispose()


def test_run_with_a_dead_broker_writes_nothing(tmp_path: Path) -> None:
    env = worker_env(broker_url="redis://127.0.0.1:1/0")
    (tmp_path / "grid.yaml").write_text(GRID)
    started = time.monotonic()
    result = _mlpq("run", "grid.yaml", cwd=tmp_path, env=env, timeout=60)
    assert result.returncode != 0
    assert result.stderr.startswith("mlpq: broker ") and "cannot connect" in result.stderr
    assert time.monotonic() - started < 60
    db = tmp_path / ".mlpq" / "mlpq.db"
    if db.exists():
        with sqlite3.connect(db) as conn:
            assert conn.execute("SELECT count(*) FROM runs").fetchone() == (0,)


def _processes_with(marker: bytes) -> list[int]:
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if marker in cmdline.read_bytes():
                pids.append(int(cmdline.parent.name))
        except OSError:
            continue
    return pids


@pytest.mark.slow
def test_stopped_embedded_run_leaves_no_worker_behind_and_the_next_run_finishes_it(
    tmp_path: Path,
) -> None:
    (tmp_path / "grid.yaml").write_text(
        "name: long\ndatasets: [moons]\nseeds: 4\nmodel: {hidden: [[32]]}\n"
        "budget: {epochs: 1500}\noptimizers:\n  - {optimizer: backprop, batch_size: 8}\n"
    )
    env = worker_env()
    exe = shutil.which("mlpq")
    cmd = [exe] if exe else [sys.executable, "-c", "from cli.main import main; main()"]
    proc = subprocess.Popen(
        [*cmd, "run", "grid.yaml", "-c", "2"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    db = tmp_path / ".mlpq" / "mlpq.db"

    def training() -> bool:
        if not db.exists():
            return False
        try:
            with sqlite3.connect(db) as conn:
                query = "SELECT count(*) FROM runs WHERE status = 'running'"
                return conn.execute(query).fetchone()[0] > 0
        except sqlite3.OperationalError:  # the file exists, its migration has not run yet
            return False

    wait_for(training, timeout=60, what="a run to start")
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=60)
    err = proc.stderr.read().decode()
    assert code == 130, err
    assert "interrupted: stopping local workers" in err
    marker = f"local-{proc.pid}@".encode()
    wait_for(lambda: not _processes_with(marker), timeout=30, what="the local workers to exit")

    again = _mlpq("run", "grid.yaml", "-c", "2", cwd=tmp_path, env=env)
    assert again.returncode == 0, again.stderr
    with sqlite3.connect(db) as conn:
        rows = conn.execute(
            "SELECT r.status, count(m.step), min(m.step), max(m.step) FROM runs r "
            "JOIN metrics m ON m.run_id = r.id GROUP BY r.id, r.status"
        ).fetchall()
    assert rows == [("succeeded", 1500, 1, 1500)] * 4


def test_a_minute_long_read_beside_mlpq_run_blocks_no_worker_and_every_run_finishes(
    tmp_path: Path,
) -> None:
    (tmp_path / "grid.yaml").write_text(GRID)
    env = worker_env()
    # The store exists before the reader starts (the first command creates and migrates it).
    first = _mlpq("sql", "SELECT count(*) FROM runs", cwd=tmp_path, env=env)
    assert first.returncode == 0, first.stderr
    # Counts for 60 s (its timeout) inside one read of the store, holding its snapshot.
    slow = (
        "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) "
        "SELECT count(*) FROM c, (SELECT count(*) FROM runs)"
    )
    reader = subprocess.Popen(
        [str(Path(sys.executable).with_name("mlpq")), "sql", slow, "--timeout", "60"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(1)  # the query is under way
        result = _mlpq("run", "grid.yaml", "--concurrency", "2", cwd=tmp_path, env=env)
        still_reading = reader.poll() is None
    finally:
        reader.kill()
        reader.communicate()
    assert result.returncode == 0, result.stderr
    assert still_reading, "the reader ended before the runs did: the test proves nothing"
    counts = _mlpq(
        "sql",
        "SELECT status, count(*) FROM runs GROUP BY status",
        "-f",
        "csv",
        cwd=tmp_path,
        env=env,
    )
    assert counts.stdout.splitlines()[1:] == ["succeeded,12"], counts.stdout


@pytest.mark.parametrize(
    ("args", "workers"),
    [
        (["run", "g.yaml"], os.cpu_count()),
        (["run", "g.yaml", "--concurrency", "3"], 3),
        (["run", "g.yaml", "-c", "2"], 2),
        (["run", "-c1", "g.yaml"], 1),
        (["run", "g.yaml", "--concurrency=4"], 4),
        (["run", "g.yaml", "--concurrency", "0"], os.cpu_count()),
        (["run", "g.yaml", "--concurrency", "two"], None),  # Typer says what is wrong
        (["run", "g.yaml", "--concurrency"], None),
        (["run", "g.yaml", "--dry-run"], None),
        (["run", "g.yaml", "--no-local-workers"], None),
        (["run", "--help"], None),
        (["submit", "g.yaml"], None),
        ([], None),
    ],
)
def test_the_launcher_starts_workers_only_for_a_run_that_will_use_them(args, workers) -> None:
    from cli.launch import run_concurrency

    assert run_concurrency(args) == workers


def test_workers_started_early_for_a_mistyped_run_are_gone_with_their_folder(
    tmp_path: Path,
) -> None:
    (tmp_path / "grid.yaml").write_text(GRID)
    launcher = [sys.executable, "-c", "from cli.launch import entry; entry()"]
    for mistake in (["--concurrency", "2", "--bogus"], ["--top", "0"]):
        proc = subprocess.Popen(
            [*launcher, "run", "grid.yaml", *mistake],
            cwd=tmp_path, env=worker_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 2, err
        assert not (tmp_path / ".mlpq").exists()
        time.sleep(0.5)  # a worker outliving the command would still be here
        assert _processes_with(f"local-{proc.pid}@".encode()) == []


def test_the_wait_on_sqlite_counts_only_after_a_commit_and_sees_each_one(tmp_path: Path) -> None:
    from cli.runs import _change_watch
    from service.results import read_engine
    from service.store import make_engine, upgrade

    path = tmp_path / "store.db"
    writer = make_engine(f"sqlite:///{path}")
    upgrade(writer)
    reader = read_engine(f"sqlite:///{path}")
    with _change_watch(reader) as changed:
        assert changed is not None
        assert changed() is False  # nothing committed since the watch began
        with writer.begin() as conn:
            conn.exec_driver_sql(
                "INSERT INTO experiments (name, spec, created_at) VALUES ('e', '{}', '2026-01-01')"
            )
        assert changed() is True
        assert changed() is False  # the same commit is seen once
        with writer.begin() as conn:
            conn.exec_driver_sql("DELETE FROM experiments")
        assert changed() is True
    writer.dispose()


@pytest.mark.postgres
def test_the_wait_on_postgresql_counts_at_every_poll(pg_store_url: str) -> None:
    from cli.runs import _change_watch
    from service.results import read_engine

    with _change_watch(read_engine(pg_store_url)) as changed:
        assert changed is None


class _Clock:
    """A stand-in for ``time`` in cli.runs: sleeping moves the clock, nothing waits."""

    def __init__(self) -> None:
        self.now = 100.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


@pytest.mark.parametrize(
    ("tail", "commits", "after"),
    [
        (True, [2], 2),  # the tail: the first commit seen may be the last result
        (False, [2], 11),  # runs still queued: not before the interval, 11 looks of 20 ms
        (False, [14], 14),  # a commit after the interval: at once
        (False, [], 23),  # no commit: the interval and POLL_MAX_SECONDS more, a look anyway
    ],
)
def test_the_wait_on_sqlite_counts_at_the_old_pace_but_at_once_in_the_tail(
    monkeypatch: pytest.MonkeyPatch, tail: bool, commits: list[int], after: int
) -> None:
    import cli.runs as runs

    clock = _Clock()
    monkeypatch.setattr(runs, "time", clock)
    looks = 0

    def changed() -> bool:
        nonlocal looks
        looks += 1
        return looks in commits  # True once: the commit is not seen again

    start = clock.now
    runs._await_change(changed, 0.205, tail=tail)
    assert looks == after
    assert clock.now - start == pytest.approx(after * runs.POLL_MIN_SECONDS)
