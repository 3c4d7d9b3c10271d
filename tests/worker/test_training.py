"""One run through worker.training.execute_run, in this process, on SQLite and PostgreSQL."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import Engine, event, select
from worker_testlib import TINY_BACKPROP, add_runs, metric_steps, run_rows

from service.store import Run, RunStatus


@pytest.fixture
def settings(store_url: str, tmp_path: Path) -> Any:
    from service.settings import load_settings

    return load_settings(database_url=store_url, home=tmp_path / "home")


@pytest.fixture
def engine(settings: Any) -> Engine:
    from service.store import get_engine

    return get_engine(settings.database_url)


def _execute(run_id: int, settings: Any) -> str:
    from worker.training import execute_run

    return execute_run(run_id=run_id, settings=settings, worker="here:1").status


def test_tiny_run_takes_two_short_transactions(settings: Any, engine: Engine) -> None:
    if engine.dialect.name == "postgresql":
        # Claim: UPDATE ... RETURNING. Final write: one statement (WITH: the guarded
        # UPDATE, the metric rows, the weights). Both in autocommit: no BEGIN, no COMMIT.
        first, run_id = add_runs(engine, [TINY_BACKPROP, TINY_BACKPROP])
        assert _execute(first, settings) == "succeeded"  # prepares the two statements
        assert [s.split(None, 1)[0] for s in _round_trips(engine, run_id, settings)] == [
            "UPDATE",
            "WITH",
        ]
        assert metric_steps(engine, run_id) == list(range(1, TINY_BACKPROP["max_steps"] + 1))
        return
    (run_id,) = add_runs(engine, [TINY_BACKPROP])
    statements: list[str] = []

    def count(_conn, _cursor, statement, *_args) -> None:
        statements.append(statement.split(None, 1)[0].upper())

    event.listen(engine, "before_cursor_execute", count)
    try:
        assert _execute(run_id, settings) == "succeeded"
    finally:
        event.remove(engine, "before_cursor_execute", count)
    # Claim: UPDATE ... RETURNING. Final write: UPDATE, the metric batch (in a
    # savepoint; executemany goes around this hook), INSERT of the weights. No
    # SELECT, no DELETE: a first attempt has no checkpoint to replace.
    writes = [s for s in statements if s not in ("BEGIN", "SAVEPOINT", "RELEASE")]
    assert writes == ["UPDATE", "UPDATE", "INSERT"]
    assert statements.count("BEGIN") in (0, 2)  # BEGIN IMMEDIATE passes the hook
    assert metric_steps(engine, run_id) == list(range(1, TINY_BACKPROP["max_steps"] + 1))


def _kept_driver(engine: Engine) -> Any:
    from worker.training import _KEPT

    return _KEPT[(engine, os.getpid())].connection.driver_connection


def _round_trips(engine: Engine, run_id: int, settings: Any) -> list[str]:
    """Run ``run_id`` on the worker's kept PostgreSQL connection; the statement of each round trip.

    Read from libpq's trace of the wire, so statements sent around SQLAlchemy count
    too, and so would a BEGIN or COMMIT (a simple Query message: listed as such).
    """
    from psycopg import pq

    driver = _kept_driver(engine)
    with tempfile.TemporaryFile("w+") as trace:
        driver.pgconn.trace(trace.fileno())
        driver.pgconn.set_trace_flags(pq.Trace.SUPPRESS_TIMESTAMPS | pq.Trace.REGRESS_MODE)
        try:
            assert _execute(run_id, settings) == "succeeded"
        finally:
            driver.pgconn.untrace()
        trace.seek(0)
        sent = [line.rstrip("\n").split("\t")[2:] for line in trace if line.startswith("F\t")]
    prepared = dict(driver.execute("SELECT name, statement FROM pg_prepared_statements"))
    trips: list[str] = []
    for kind, *args in sent:
        if kind == "Query":  # the simple protocol: a round trip of its own
            trips.append(args[0].strip().strip('"'))
        elif kind == "Bind":  # of a prepared statement: ' "<portal>" "<statement>" ...'
            trips.append(prepared[args[0].split('"')[3]])
        elif kind == "Parse":  # a statement prepared or sent unnamed: ' "<name>" "<text>" ...'
            trips.append(args[0].split('"')[3])
    syncs = sum(1 for kind, *_ in sent if kind == "Sync")
    queries = sum(1 for kind, *_ in sent if kind == "Query")
    assert syncs + queries == len(trips), sent  # one statement per round trip
    return trips


def test_time_limit_stops_a_run_as_succeeded_with_what_it_reached(
    settings: Any, engine: Engine
) -> None:
    config = {**TINY_BACKPROP, "max_steps": 100_000, "time_limit": 0.3}
    (run_id,) = add_runs(engine, [config])
    assert _execute(run_id, settings) == "succeeded"
    row = run_rows(engine)[run_id]
    assert row.stop_reason == "time_limit"
    assert 0 < row.iterations < 100_000
    assert metric_steps(engine, run_id) == list(range(1, row.iterations + 1))


def test_an_exception_fails_the_run_with_its_traceback(settings: Any, engine: Engine) -> None:
    (run_id,) = add_runs(engine, [{**TINY_BACKPROP, "learning_rate": -1.0}])
    assert _execute(run_id, settings) == "failed"
    row = run_rows(engine)[run_id]
    assert RunStatus(row.status) is RunStatus.failed
    assert row.error.startswith("Traceback (most recent call last):")
    assert "learning_rate" in row.error.strip().splitlines()[-1]
    assert row.finished_at is not None


@pytest.mark.postgres
def test_only_the_final_write_skips_the_wal_flush(pg_store_url: str, tmp_path: Path) -> None:
    from service.settings import load_settings
    from service.store import get_engine

    settings = load_settings(database_url=pg_store_url, home=tmp_path / "home")
    engine = get_engine(pg_store_url)
    first, run_id = add_runs(engine, [TINY_BACKPROP, TINY_BACKPROP])
    assert _execute(first, settings) == "succeeded"
    claim, final = _round_trips(engine, run_id, settings)
    setting = "set_config('synchronous_commit', 'off', true)"
    assert setting not in claim  # a lost claim is repaired by nobody: it waits for the flush
    assert setting in final
    # ... and the setting ended with the final write's transaction: the worker's kept
    # connection commits its next claim synchronously again.
    assert _kept_driver(engine).execute("SHOW synchronous_commit").fetchone() == ("on",)
    assert run_rows(engine)[run_id].status == RunStatus.succeeded


@pytest.mark.postgres
def test_a_kept_connection_the_server_dropped_is_replaced_at_the_next_claim(
    pg_store_url: str, tmp_path: Path
) -> None:
    from service.settings import load_settings
    from service.store import get_engine, make_engine

    settings = load_settings(database_url=pg_store_url, home=tmp_path / "home")
    engine = get_engine(pg_store_url)
    first, run_id = add_runs(engine, [TINY_BACKPROP, {**TINY_BACKPROP, "seed": 1}])
    assert _execute(first, settings) == "succeeded"
    dropped = _kept_driver(engine).info.backend_pid
    admin = make_engine(pg_store_url)
    try:
        with admin.connect() as conn:  # as a server restart would
            assert conn.exec_driver_sql(f"SELECT pg_terminate_backend({dropped}, 10000)").scalar()
    finally:
        admin.dispose()
    assert _execute(run_id, settings) == "succeeded"
    assert _kept_driver(engine).info.backend_pid != dropped
    row = run_rows(engine)[run_id]
    assert (RunStatus(row.status), row.attempt) == (RunStatus.succeeded, 1)
    assert metric_steps(engine, run_id) == list(range(1, TINY_BACKPROP["max_steps"] + 1))


def test_runs_of_one_dataset_and_seed_share_one_read_only_copy(
    settings: Any, engine: Engine
) -> None:
    from engine import TrainConfig, Trainer, load_dataset
    from worker.training import _load_data

    def data(**change: Any) -> Any:
        return _load_data(TrainConfig.from_dict({**TINY_BACKPROP, **change}), engine)

    first = data(seed=3)
    again = data(seed=3, learning_rate=0.5, optimizer="backprop")
    other = data(seed=4)
    assert again is first and other is not first
    with pytest.raises(ValueError, match="read-only"):
        first.X_train[0, 0] = 1.0
    # Runs on the shared copy train exactly as on a fresh load, the second as the first.
    config = TrainConfig.from_dict(TINY_BACKPROP)
    fresh = load_dataset(config.dataset, seed=config.seed, dtype=config.dtype)
    expected = Trainer(config, fresh)
    for _ in expected.steps():
        pass
    ids = add_runs(engine, [TINY_BACKPROP, TINY_BACKPROP])
    assert [_execute(i, settings) for i in ids] == ["succeeded", "succeeded"]
    rows = run_rows(engine)
    want = expected.result().summary["final_train_loss"]
    assert [rows[i].final_train_loss for i in ids] == [want, want]


def test_a_csv_run_reads_the_stored_file_once_per_worker_process(
    settings: Any, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    import service.store
    import worker.training
    from engine import TrainConfig, Trainer, load_dataset
    from engine.datasets import csv_name
    from service.store import store_dataset

    # Empty caches of this test's own: the module's live across tests.
    monkeypatch.setattr(worker.training, "_DATASETS", worker.training._SizedCache(2**20))
    monkeypatch.setattr(worker.training, "_CSVS", worker.training._SizedCache(2**20, len))
    reads: list[str] = []
    read = service.store.load_dataset_bytes

    def counted(target: Any, sha256: str) -> bytes:
        reads.append(sha256)
        return read(target, sha256)

    monkeypatch.setattr(service.store, "load_dataset_bytes", counted)
    rng = np.random.default_rng(5)
    body = "a,b,y\n" + "".join(
        f"{a:.6f},{b:.6f},{int(a * b > 0)}\n" for a, b in rng.normal(size=(80, 2))
    )
    name = csv_name(body.encode())
    assert store_dataset(engine, "mine.csv", body.encode()) == name.removeprefix("csv:")
    config = {**TINY_BACKPROP, "dataset": name, "target": "y", "max_steps": 5}
    # Seeds 0, 0 and 1: the second run finds the split kept, the third splits the kept bytes.
    ids = add_runs(engine, [config, config, {**config, "seed": 1}])
    assert [_execute(i, settings) for i in ids] == ["succeeded"] * 3
    assert reads == [name.removeprefix("csv:")]
    expected = Trainer(
        TrainConfig.from_dict(config), load_dataset(name, seed=0, csv=body.encode(), target="y")
    )
    for _ in expected.steps():
        pass
    rows = run_rows(engine)
    want = expected.result().summary["final_train_loss"]
    assert [rows[i].final_train_loss for i in ids[:2]] == [want, want]
    assert rows[ids[2]].final_train_loss != want
    assert [len(metric_steps(engine, i)) for i in ids] == [5, 5, 5]


def test_dataset_cache_keeps_what_fits_in_its_bytes_least_recently_used_out() -> None:
    from engine import load_dataset
    from worker.training import _SizedCache

    def loader(seed: int) -> Any:
        loads.append(seed)
        return load_dataset("moons", seed=seed)

    loads: list[int] = []
    one = load_dataset("moons", seed=0)
    size = sum(a.nbytes for a in vars(one).values() if isinstance(a, np.ndarray))
    cache = _SizedCache(limit=2 * size)  # room for two moons
    first = cache.get(("moons", 0), lambda: loader(0))
    assert cache.get(("moons", 0), lambda: loader(0)) is first
    cache.get(("moons", 1), lambda: loader(1))
    cache.get(("moons", 0), lambda: loader(0))  # 0 is now the most recently used
    cache.get(("moons", 2), lambda: loader(2))  # over the limit: 1 goes, not 0
    assert cache.get(("moons", 0), lambda: loader(0)) is first
    cache.get(("moons", 1), lambda: loader(1))
    assert loads == [0, 1, 2, 1]
    assert cache.size == 2 * size
    with pytest.raises(ValueError, match="read-only"):
        first.X_val[0, 0] = 1.0
    # A dataset larger than the whole budget is still kept (alone): a worker whose
    # runs all use it loads it once.
    tiny = _SizedCache(limit=1)
    big = tiny.get(("moons", 0), lambda: loader(0))
    assert tiny.get(("moons", 0), lambda: loader(0)) is big
    assert loads == [0, 1, 2, 1, 0]


def test_worker_main_process_preloads_what_its_children_import(pg_store_url: str) -> None:
    # A child starts without importing these: the main process imported them before
    # forking it. The grid models stay out: the window does not need them (80 ms).
    import subprocess
    import sys

    code = (
        "import sys, worker.app\n"
        "wanted = ('psycopg', 'service.store.ingest', 'numpy.random', 'service.queue.window')\n"
        "print([m in sys.modules for m in wanted])\n"
        "worker.app._preload()\n"
        "print([m in sys.modules for m in wanted])\n"
        "print('service.grids.spec' in sys.modules)\n"
    )
    env = {**os.environ, "MLPQ_DATABASE_URL": pg_store_url}
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[2],
    ).stdout.split("\n")
    assert out[0] == "[False, False, False, False]"
    assert out[1] == "[True, True, True, True]"
    assert out[2] == "False"


# --- packs: the runs of one message -----------------------------------------------------


def _execute_pack(run_ids: list[int], settings: Any) -> list[str]:
    from worker.training import execute_runs

    outcomes = execute_runs(run_ids=run_ids, settings=settings, worker="here:1")
    assert [o.run_id for o in outcomes] == run_ids[: len(outcomes)]
    return [o.status for o in outcomes]


def _wire(engine: Engine, action: Any) -> list[list[str]]:
    """Run ``action`` on the worker's kept PostgreSQL connection: the statements of each
    round trip (those sent before one Sync, or one simple Query), from libpq's trace."""
    from psycopg import pq

    driver = _kept_driver(engine)
    with tempfile.TemporaryFile("w+") as trace:
        driver.pgconn.trace(trace.fileno())
        driver.pgconn.set_trace_flags(pq.Trace.SUPPRESS_TIMESTAMPS | pq.Trace.REGRESS_MODE)
        try:
            action()
        finally:
            driver.pgconn.untrace()
        trace.seek(0)
        sent = [line.rstrip("\n").split("\t")[2:] for line in trace if line.startswith("F\t")]
    prepared = dict(driver.execute("SELECT name, statement FROM pg_prepared_statements"))
    trips: list[list[str]] = []
    current: list[str] = []
    for kind, *args in sent:
        if kind == "Query":
            trips.append([args[0].strip().strip('"').split(None, 1)[0]])
        elif kind == "Bind":
            current.append(prepared[args[0].split('"')[3]].split(None, 1)[0])
        elif kind == "Sync":
            trips.append(current)
            current = []
    assert not current, sent
    return trips


@pytest.mark.postgres
def test_a_pack_of_tiny_runs_takes_two_round_trips(pg_store_url: str, tmp_path: Path) -> None:
    from service.settings import load_settings
    from service.store import get_engine

    settings = load_settings(database_url=pg_store_url, home=tmp_path / "home")
    engine = get_engine(pg_store_url)
    ids = add_runs(engine, [{**TINY_BACKPROP, "seed": seed} for seed in range(6)])
    assert _execute_pack(ids[:2], settings) == ["succeeded"] * 2  # prepares the statements
    statuses: list[list[str]] = []
    trips = _wire(engine, lambda: statuses.append(_execute_pack(ids[2:], settings)))
    # One claim for the four runs, then their four final writes in one pipeline: one
    # round trip and one (implicit) transaction.
    assert trips == [["UPDATE"], ["WITH"] * 4]
    assert statuses == [["succeeded"] * 4]
    rows = run_rows(engine)
    for run_id in ids:
        assert (rows[run_id].status, rows[run_id].attempt) == (RunStatus.succeeded, 1)
        assert metric_steps(engine, run_id) == list(range(1, TINY_BACKPROP["max_steps"] + 1))


def test_a_pack_skips_what_is_done_and_a_failing_run_fails_alone(
    settings: Any, engine: Engine
) -> None:
    ok = {**TINY_BACKPROP, "seed": 1}
    done, bad, fine, cancelled = add_runs(
        engine, [TINY_BACKPROP, {**TINY_BACKPROP, "learning_rate": -1.0}, ok, {**ok, "seed": 2}]
    )
    assert _execute(done, settings) == "succeeded"
    from service.store import session_scope

    with session_scope(engine) as session:
        session.execute(
            Run.__table__.update().where(Run.id == cancelled).values(status=RunStatus.cancelled)
        )
    # A pack delivered again after some of its runs ended does only what is left.
    assert _execute_pack([done, bad, fine, cancelled], settings) == [
        "dropped",
        "failed",
        "succeeded",
        "dropped",
    ]
    rows = run_rows(engine)
    assert "learning_rate" in rows[bad].error.strip().splitlines()[-1]
    assert (rows[fine].status, rows[fine].attempt) == (RunStatus.succeeded, 1)
    assert rows[done].attempt == 1  # not claimed a second time
    assert metric_steps(engine, fine) == list(range(1, TINY_BACKPROP["max_steps"] + 1))


@pytest.mark.postgres
def test_a_result_the_store_refuses_fails_its_own_run_only(
    pg_store_url: str, tmp_path: Path
) -> None:
    from service.settings import load_settings
    from service.store import get_engine

    settings = load_settings(database_url=pg_store_url, home=tmp_path / "home")
    engine = get_engine(pg_store_url)
    ids = add_runs(engine, [{**TINY_BACKPROP, "seed": seed} for seed in range(3)])
    refused = ids[1]
    with engine.begin() as conn:  # the store refuses the middle run's success
        conn.exec_driver_sql(
            "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            "RAISE EXCEPTION 'refused by the test'; END $$"
        )
        conn.exec_driver_sql(
            "CREATE TRIGGER refuse BEFORE UPDATE ON runs FOR EACH ROW WHEN "
            f"(NEW.id = {refused} AND NEW.status = 'succeeded') EXECUTE FUNCTION refuse()"
        )
    # The three results go together, all or nothing; refused, each is written on its own.
    assert _execute_pack(ids, settings) == ["succeeded", "failed", "succeeded"]
    rows = run_rows(engine)
    assert "refused by the test" in rows[refused].error
    for run_id in ids:
        assert metric_steps(engine, run_id) == list(range(1, TINY_BACKPROP["max_steps"] + 1))


def test_told_to_stop_between_runs_a_pack_gives_back_the_runs_it_did_not_start(
    settings: Any, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    from worker import handback, training

    ids = add_runs(engine, [{**TINY_BACKPROP, "seed": seed} for seed in range(4)])
    train = training._ClaimedRun.train

    def train_then_stop(self: Any) -> Any:
        result = train(self)
        monkeypatch.setattr(handback, "_requested", True)  # a SIGTERM during the first run
        return result

    monkeypatch.setattr(training._ClaimedRun, "train", train_then_stop)
    assert _execute_pack(ids, settings) == ["succeeded"]
    rows = run_rows(engine)
    assert rows[ids[0]].status == RunStatus.succeeded
    for run_id in ids[1:]:
        # Queued again as before the claim: no worker, and the attempt given back.
        row = rows[run_id]
        assert (row.status, row.worker, row.attempt) == (RunStatus.queued, None, 0)
        assert metric_steps(engine, run_id) == []


def test_claims_waiting_past_a_heartbeat_are_refreshed_and_a_cancel_skips_the_run(
    store_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from service.settings import load_settings
    from service.store import get_engine, session_scope
    from worker import training

    # Every wait counts as past a heartbeat here.
    settings = load_settings(database_url=store_url, home=tmp_path / "home", heartbeat_seconds=1e-6)
    engine = get_engine(store_url)
    first, waiting, cancelled = add_runs(
        engine, [{**TINY_BACKPROP, "seed": seed} for seed in range(3)]
    )
    beats: dict[int, Any] = {}
    train = training._ClaimedRun.train

    def train_and_cancel(self: Any) -> Any:
        if self.claim.run_id == first:
            with session_scope(engine) as session:
                beats.update(dict(session.execute(select(Run.id, Run.heartbeat_at)).all()))
                session.execute(
                    Run.__table__.update().where(Run.id == cancelled).values(cancel_requested=True)
                )
        return train(self)

    monkeypatch.setattr(training._ClaimedRun, "train", train_and_cancel)
    assert _execute_pack([first, waiting, cancelled], settings) == [
        "succeeded",
        "succeeded",
        "cancelled",
    ]
    rows = run_rows(engine)
    assert rows[waiting].heartbeat_at > beats[waiting]  # refreshed before it started
    assert (rows[cancelled].status, rows[cancelled].stop_reason) == (
        RunStatus.cancelled,
        "cancelled",
    )
    assert metric_steps(engine, cancelled) == []  # never trained
