"""submit() against real stores (SQLite and PostgreSQL) and a real Redis broker."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy import Engine, func, select, update

from service.exceptions import BrokerError, GridError
from service.grids import Grid, expand_grid, parse_grid
from service.queue import QUEUE, TRAIN_TASK, feed, make_app, pending_ids, submit
from service.settings import load_settings
from service.store import Dataset, Experiment, Run, RunStatus, make_engine, write_metrics

SMALL = {
    "name": "small",
    "datasets": ["moons", "xor"],
    "model": {"hidden": [[8], "16x8"], "activation": "tanh"},
    "seeds": 2,
    "budget": {"epochs": 5, "iterations": 20},
    "optimizers": [
        {"optimizer": "backprop", "learning_rate": [0.1, 0.01]},
        {"optimizer": "random_walk", "step_size": 0.05},
    ],
}  # 2 datasets x 2 networks x 2 seeds x (2 + 1) = 24 runs


def make_grid(data: dict[str, Any], base_dir: Path | None = None, **kw: Any) -> Grid:
    return expand_grid(parse_grid(data, source="grid.yaml", base_dir=base_dir), **kw)


def app_for(broker_url: str | None, home: Path):
    # One message per run (MLPQ_PACK_SECONDS=0): what is sent, counted in messages.
    # Packing is tested in tests/service (test_packing, test_window).
    return make_app(load_settings(broker_url=broker_url, home=home, pack_seconds=0))


@pytest.fixture(params=["expanded first", "expanded while stored"])
def lazy(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    """Both ways a grid reaches submit(): whole, or expanded as it is stored (``lazy``).

    Lazy, any grid is expanded as stored, 5 runs a chunk and 3 rows a COPY write, so
    a small grid goes through many chunks (on SQLite it is expanded whole at once).
    """
    if request.param == "expanded first":
        return False
    monkeypatch.setattr("service.grids.loader.LAZY_MIN_RUNS", 1)
    monkeypatch.setattr("service.queue.enqueue.LOOKUP_CHUNK", 5)
    monkeypatch.setattr("service.queue.enqueue.INSERT_CHUNK", 3)
    return True


@pytest.fixture
def engine(store_url: str) -> Iterator[Engine]:
    engine = make_engine(store_url)
    yield engine
    engine.dispose()


def rows(engine: Engine) -> list[Run]:
    with engine.connect() as conn:
        return list(conn.execute(select(Run.__table__).order_by(Run.id)))


def queued_messages(client: redis.Redis) -> list[dict[str, Any]]:
    return [json.loads(raw) for raw in client.lrange(QUEUE, 0, -1)]


def task_args(message: dict[str, Any]) -> list[Any]:
    body = base64.b64decode(message["body"])
    args, kwargs, _embed = json.loads(body)
    assert kwargs == {}
    return args


def test_submit_stores_every_run_and_sends_one_celery_task_message_each(
    engine: Engine, redis_url: str, tmp_path: Path, lazy: bool
) -> None:
    grid = make_grid(SMALL, lazy=lazy)
    report = submit(grid=grid, engine=engine, app=app_for(redis_url, tmp_path))

    assert (report.total, report.new, report.published, report.unsent) == (24, 24, 24, 0)
    stored = rows(engine)
    assert len(stored) == 24 and [r.id for r in stored] == sorted(report.run_ids)
    for row, run in zip(stored, grid.runs, strict=True):
        assert row.config == run.config and row.config_hash == run.config_hash
        assert RunStatus(row.status) is RunStatus.queued and row.published and row.attempt == 0
        assert row.hidden == "x".join(map(str, run.config["hidden"]))
        assert (row.optimizer, row.dataset, row.seed) == (
            run.config["optimizer"],
            run.config["dataset"],
            run.config["seed"],
        )
        if row.optimizer == "backprop":
            assert row.learning_rate == run.config["learning_rate"] and row.step_size is None
        else:
            assert row.step_size == 0.05 and row.learning_rate is None
    with engine.connect() as conn:
        (exp,) = conn.execute(select(Experiment.__table__)).all()
    assert exp.name == "small" and exp.spec["grid"]["seeds"] == 2

    client = redis.Redis.from_url(redis_url)
    messages = queued_messages(client)
    assert client.llen(QUEUE) == 24
    first = messages[0]
    assert first["content-type"] == "application/json"
    assert first["headers"]["task"] == TRAIN_TASK and first["headers"]["lang"] == "py"
    assert first["properties"]["delivery_info"]["routing_key"] == QUEUE
    assert sorted(task_args(m)[0] for m in messages) == [r.id for r in stored]
    assert all(len(task_args(m)) == 1 for m in messages)
    assert len({m["headers"]["id"] for m in messages}) == 24


def test_resubmitting_skips_done_keeps_in_flight_and_requeues_failed_runs(
    engine: Engine, redis_url: str, tmp_path: Path, lazy: bool
) -> None:
    app = app_for(redis_url, tmp_path)
    client = redis.Redis.from_url(redis_url)
    data = {**SMALL, "optimizers": [{"optimizer": "backprop", "learning_rate": 0.1}]}
    data = {**data, "seeds": [0, 1, 2]}  # 12 runs

    def grid() -> Grid:  # each submit its own: a lazy grid is expanded by its first submit
        return make_grid(data, lazy=lazy)

    ids = submit(grid=grid(), engine=engine, app=app).run_ids
    client.flushdb()
    states = {
        ids[0]: {"status": RunStatus.succeeded},
        ids[1]: {"status": RunStatus.diverged},
        ids[2]: {"status": RunStatus.failed, "attempt": 3, "error": "boom"},
        ids[3]: {"status": RunStatus.cancelled, "cancel_requested": True},
        ids[4]: {"status": RunStatus.running, "attempt": 1},
        ids[5]: {"status": RunStatus.queued, "published": False},
    }
    with engine.begin() as conn:
        for run_id, values in states.items():
            conn.execute(update(Run.__table__).where(Run.id == run_id).values(**values))
    write_metrics(engine, ids[2], [{"step": 1, "train_loss": 0.5}])

    again = submit(grid=grid(), engine=engine, app=app)
    assert (again.new, again.skipped_done, again.requeued) == (0, 2, 2)
    # The running run, the unsent one and 6 queued ones are left as they are.
    assert again.already_queued == 8
    assert again.published == 3 and again.unsent == 0
    assert sorted(task_args(m)[0] for m in queued_messages(client)) == [ids[2], ids[3], ids[5]]
    by_id = {r.id: r for r in rows(engine)}
    assert len(by_id) == 12
    failed = by_id[ids[2]]
    assert (RunStatus(failed.status), failed.attempt, failed.error, failed.published) == (
        RunStatus.queued,
        0,
        None,
        True,
    )
    assert not by_id[ids[3]].cancel_requested
    with engine.connect() as conn:
        from service.store import metrics

        assert conn.execute(select(func.count()).select_from(metrics)).scalar() == 0

    # Nothing is left to do: no new row, no new message.
    third = submit(grid=grid(), engine=engine, app=app)
    assert (third.new, third.requeued, third.published, third.skipped_done) == (0, 0, 0, 2)
    assert client.llen(QUEUE) == 3

    forced = submit(grid=grid(), engine=engine, app=app, force=True)
    assert (forced.forced, forced.new, forced.published) == (2, 0, 2)
    assert len(rows(engine)) == 14 and client.llen(QUEUE) == 5


def test_a_config_done_in_another_experiment_is_skipped(
    engine: Engine, redis_url: str, tmp_path: Path, lazy: bool
) -> None:
    app = app_for(redis_url, tmp_path)
    first = submit(grid=make_grid(SMALL), engine=engine, app=app)
    with engine.begin() as conn:
        conn.execute(update(Run.__table__).values(status=RunStatus.succeeded))
    wider = {**SMALL, "name": "wider", "seeds": 3}  # seed 2 is new: 12 more runs
    report = submit(grid=make_grid(wider, lazy=lazy), engine=engine, app=app)
    assert report.created and report.experiment_id != first.experiment_id
    assert (report.total, report.skipped_done, report.new, report.published) == (36, 24, 12, 12)
    new_rows = [r for r in rows(engine) if r.experiment_id == report.experiment_id]
    assert {r.seed for r in new_rows} == {2}


def test_a_csv_dataset_is_stored_once_by_content_hash(
    engine: Engine, redis_url: str, tmp_path: Path
) -> None:
    body = b"x1,x2,y\n" + b"".join(f"{i},{i * i % 7},{i % 2}\n".encode() for i in range(30))
    (tmp_path / "mine.csv").write_bytes(body)
    data = {**SMALL, "datasets": [{"csv": "mine.csv", "target": "y"}]}
    grid = make_grid(data, base_dir=tmp_path)
    app = app_for(redis_url, tmp_path)
    submit(grid=grid, engine=engine, app=app)
    submit(grid=grid, engine=engine, app=app)
    with engine.connect() as conn:
        stored = conn.execute(select(Dataset.sha256, Dataset.name, Dataset.data)).all()
    ((sha, name, blob),) = stored
    assert name == "mine.csv" and bytes(blob) == body
    assert {r.dataset for r in rows(engine)} == {f"csv:{sha}"}
    assert {r.config["target"] for r in rows(engine)} == {"y"}


def test_the_embedded_queue_gets_one_message_file_per_run(
    sqlite_store_url: str, tmp_path: Path
) -> None:
    engine = make_engine(sqlite_store_url)
    settings = load_settings(home=tmp_path / "home", pack_seconds=0)
    try:
        report = submit(grid=make_grid(SMALL), engine=engine, app=make_app(settings))
    finally:
        engine.dispose()
    files = sorted((settings.queue_dir / "out").glob(f"*.{QUEUE}.msg"))
    assert report.published == 24 and len(files) == 24
    messages = [json.loads(f.read_text()) for f in files]
    assert {m["headers"]["task"] for m in messages} == {TRAIN_TASK}
    assert sorted(task_args(m)[0] for m in messages) == sorted(report.run_ids)


def test_a_grid_stored_as_it_is_expanded_gets_the_rows_of_one_expanded_first(
    engine: Engine, redis_url: str, tmp_path: Path, lazy: bool
) -> None:
    # The same configs stored twice: first from a grid expanded whole, then (every run
    # done, --force) from the grid under test. Every column but the ids, the experiment
    # and the times is the same.
    app = app_for(redis_url, tmp_path)
    submit(grid=make_grid(SMALL), engine=engine, app=app)
    with engine.begin() as conn:
        conn.execute(update(Run.__table__).values(status=RunStatus.succeeded))
    grid = make_grid({**SMALL, "name": "again"}, lazy=lazy)
    assert grid.expanded is not lazy
    report = submit(grid=grid, engine=engine, app=app, force=True)
    assert (report.total, report.forced, report.new, report.published) == (24, 24, 0, 24)
    assert grid.expanded and [r.config_hash for r in grid.runs] == [
        r.config_hash for r in make_grid(SMALL).runs
    ]
    skip = {"id", "experiment_id", "created_at", "status", "published", "published_at"}
    stored = rows(engine)
    first, second = stored[:24], stored[24:]
    assert [r.id for r in second] == sorted(report.run_ids)
    for a, b in zip(first, second, strict=True):
        assert {k: v for k, v in a._mapping.items() if k not in skip} == {
            k: v for k, v in b._mapping.items() if k not in skip
        }


def test_a_grid_whose_expansion_fails_at_its_end_writes_nothing(
    engine: Engine, redis_url: str, tmp_path: Path, lazy: bool
) -> None:
    # Every run excluded: known only once the whole product is walked, so a grid
    # expanded as it is stored fails inside the store's transaction, which writes nothing.
    data = {**SMALL, "exclude": [{"dataset": "moons"}, {"dataset": "xor"}]}
    app = app_for(redis_url, tmp_path)
    if not lazy:
        with pytest.raises(GridError, match="every run is excluded; nothing to submit"):
            make_grid(data)
        return
    grid = make_grid(data, lazy=True)
    with pytest.raises(GridError, match="every run is excluded; nothing to submit"):
        submit(grid=grid, engine=engine, app=app)
    with pytest.raises(GridError, match="every run is excluded"):  # and again, not an empty grid
        grid.runs  # noqa: B018
    assert rows(engine) == []
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(Experiment)).scalar() == 0
    assert redis.Redis.from_url(redis_url).llen(QUEUE) == 0


def test_an_unreachable_broker_fails_before_anything_is_written(
    engine: Engine, tmp_path: Path, unused_port: int
) -> None:
    app = app_for(f"redis://127.0.0.1:{unused_port}/0", tmp_path)
    with pytest.raises(BrokerError, match=r"^broker redis://127\.0\.0\.1:\d+/0: cannot connect"):
        submit(grid=make_grid(SMALL), engine=engine, app=app)
    assert rows(engine) == []
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(Experiment)).scalar() == 0


# -- a broker that dies while the messages go out ---------------------------------------------


@pytest.mark.redis
@pytest.mark.parametrize("resend", ["resubmit", "feed"])
def test_a_broker_dying_midway_leaves_unsent_runs_queued_and_they_are_sent_exactly_once(
    engine: Engine,
    redis_server: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    resend: str,
) -> None:
    monkeypatch.setattr("service.queue.enqueue.PUBLISH_BATCH", 5)
    grid = make_grid(SMALL)
    app = app_for(redis_server.url, tmp_path)

    def kill_after_two_batches(phase: str, done: int, total: int) -> None:
        if phase == "publish" and done == 10:
            redis_server.kill()

    report = submit(grid=grid, engine=engine, app=app, progress=kill_after_two_batches)
    assert (report.new, report.published, report.unsent) == (24, 10, 14)
    assert report.publish_error is not None and "publishing failed after 10 of 24" in (
        report.publish_error
    )
    stored = rows(engine)
    unsent = [r.id for r in stored if not r.published]
    assert len(unsent) == 14 and all(RunStatus(r.status) is RunStatus.queued for r in stored)
    assert pending_ids(engine=engine) == unsent

    redis_server.start()  # same port and append-only file: the 10 sent messages are back
    client = redis.Redis.from_url(redis_server.url)
    assert client.llen(QUEUE) == 10
    app = app_for(redis_server.url, tmp_path)
    if resend == "resubmit":
        again = submit(grid=grid, engine=engine, app=app)
        assert (again.new, again.already_queued, again.published) == (0, 24, 14)
    else:
        assert feed(app, engine, block=True) == 14
    assert feed(app, engine, block=True) == 0
    sent = sorted(task_args(m)[0] for m in queued_messages(client))
    assert sent == [r.id for r in stored]  # every run once, none twice
    assert all(r.published for r in rows(engine))
    client.close()


def test_two_submits_of_one_grid_at_once_store_and_send_each_run_once(
    store_url: str, redis_url: str, tmp_path: Path, lazy: bool
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    def one() -> Any:
        engine = make_engine(store_url)
        try:
            grid = make_grid(SMALL, lazy=lazy)
            return submit(grid=grid, engine=engine, app=app_for(redis_url, tmp_path))
        finally:
            engine.dispose()

    with ThreadPoolExecutor(max_workers=2) as pool:
        reports = [f.result() for f in [pool.submit(one), pool.submit(one)]]
    assert sorted(r.new for r in reports) == [0, 24]
    assert sorted(r.already_queued for r in reports) == [0, 24]
    engine = make_engine(store_url)
    try:
        assert len(rows(engine)) == 24
    finally:
        engine.dispose()
    messages = queued_messages(redis.Redis.from_url(redis_url))
    assert len(messages) == 24 and len({task_args(m)[0] for m in messages}) == 24
