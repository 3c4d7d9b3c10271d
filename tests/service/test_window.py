"""The window: ``feed`` against real stores (SQLite and PostgreSQL) and a real Redis."""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy import Engine, update

from service.queue import QUEUE, feed, make_app, pending_ids
from service.queue.packing import MIN_MESSAGES
from service.queue.window import DEFAULT_WINDOW, RUNNING_FACTOR, feed_lock, window_size
from service.settings import load_settings
from service.store import Run, RunStatus, make_engine

pytestmark = pytest.mark.redis


@pytest.fixture
def engine(store_url: str) -> Iterator[Engine]:
    engine = make_engine(store_url)
    yield engine
    engine.dispose()


def app_for(broker_url: str, home: Path, **settings: Any):
    return make_app(load_settings(broker_url=broker_url, home=home, **settings))


def message_runs(client: redis.Redis) -> list[list[int]]:
    """The run ids of each message in the queue, oldest first."""
    packs = []
    for raw in reversed(client.lrange(QUEUE, 0, -1)):  # LPUSH: the oldest is last
        payload = json.loads(base64.b64decode(json.loads(raw)["body"]))[0][0]
        packs.append(payload if isinstance(payload, list) else [payload])
    return packs


def test_feed_fills_the_window_oldest_first_and_tops_up_what_workers_took(
    engine: Engine, redis_url: str, tmp_path: Path, add_runs: Callable[..., list[int]]
) -> None:
    ids = add_runs(engine, 300, est_seconds=0.001)
    app = app_for(redis_url, tmp_path, window=10, pack_seconds=0)
    client = redis.Redis.from_url(redis_url)

    assert feed(app, engine) == 10
    assert message_runs(client) == [[i] for i in ids[:10]]
    assert pending_ids(engine=engine) == ids[10:]
    assert feed(app, engine) == 0  # the window is full
    for _ in range(4):  # workers take the four oldest messages
        client.rpop(QUEUE)
    assert feed(app, engine) == 0  # 6 left, at least half the window: a worker waits
    assert feed(app, engine, block=True) == 4  # a submit or retry fills it up
    assert message_runs(client) == [[i] for i in ids[4:14]]
    for _ in range(6):
        client.rpop(QUEUE)
    assert feed(app, engine) == 6  # 4 left, under half: the worker tops it up
    assert message_runs(client) == [[i] for i in ids[10:20]]
    assert client.llen(QUEUE) == 10
    client.close()


def test_short_runs_share_a_message_and_a_long_one_travels_alone(
    engine: Engine, redis_url: str, tmp_path: Path, add_runs: Callable[..., list[int]]
) -> None:
    ids = add_runs(engine, 1000, est_seconds=0.01)
    with engine.begin() as conn:  # one long run, and one whose cost is unknown (NULL)
        conn.execute(update(Run).where(Run.id == ids[5]).values(est_seconds=5.0))
        conn.execute(update(Run).where(Run.id == ids[30]).values(est_seconds=None))
    app = app_for(redis_url, tmp_path, window=4, pack_seconds=0.1)
    client = redis.Redis.from_url(redis_url)

    assert feed(app, engine) == 26
    # The head of a long queue is not spread thin: full packs of 10 x 0.01 s, in order.
    assert message_runs(client) == [ids[:5], [ids[5]], ids[6:16], ids[16:26]]
    client.delete(QUEUE)
    assert feed(app, engine) == 25
    # ids[30] has no estimate and a config ({"seed": i}) it cannot be estimated from.
    assert message_runs(client) == [ids[26:30], [ids[30]], ids[31:41], ids[41:51]]
    client.close()


def test_the_last_runs_of_the_queue_are_spread_over_many_messages(
    engine: Engine, redis_url: str, tmp_path: Path, add_runs: Callable[..., list[int]]
) -> None:
    ids = add_runs(engine, 64, est_seconds=0.03)  # 1.92 s in all: ten packs of 0.2 s
    app = app_for(redis_url, tmp_path, window=100, pack_seconds=0.2)
    client = redis.Redis.from_url(redis_url)
    assert feed(app, engine) == 64
    packs = message_runs(client)
    # Spread instead over MIN_MESSAGES packs of equal runs (16 of 4 runs, 0.12 s each).
    assert len(packs) == MIN_MESSAGES and [i for p in packs for i in p] == ids
    assert {len(p) for p in packs} == {64 // MIN_MESSAGES}
    client.close()


def test_the_last_runs_are_not_spread_thinner_than_a_message_is_worth(
    engine: Engine, redis_url: str, tmp_path: Path, add_runs: Callable[..., list[int]]
) -> None:
    ids = add_runs(engine, 64, est_seconds=0.001)  # 0.064 s in all: one pack of 0.2 s
    app = app_for(redis_url, tmp_path, window=100, pack_seconds=0.2)
    client = redis.Redis.from_url(redis_url)
    assert feed(app, engine) == 64
    # Not 32 packs of 2 ms: a message's own cost would be most of each.
    assert message_runs(client) == [ids[:29], ids[29:58], ids[58:]]  # 29 x 1 ms: 0.03 s
    client.close()


def test_a_feeder_at_work_makes_the_others_skip_and_a_blocking_one_wait(
    engine: Engine, redis_url: str, tmp_path: Path, add_runs: Callable[..., list[int]]
) -> None:
    add_runs(engine, 20, est_seconds=0.001)
    app = app_for(redis_url, tmp_path, window=5, pack_seconds=0)
    results: list[int] = []
    with feed_lock(engine, block=True) as held:
        assert held
        assert feed(app, engine) == 0  # another process is filling the window: skip
        waiting = threading.Thread(target=lambda: results.append(feed(app, engine, block=True)))
        waiting.start()
        waiting.join(timeout=1.0)
        assert waiting.is_alive()  # it waits for the lock
    waiting.join(timeout=10)
    assert results == [5]
    assert redis.Redis.from_url(redis_url).llen(QUEUE) == 5


def test_the_automatic_window_grows_with_the_runs_in_progress(
    engine: Engine, redis_url: str, tmp_path: Path, add_runs: Callable[..., list[int]]
) -> None:
    app = app_for(redis_url, tmp_path, pack_seconds=0)
    assert window_size(app, 0) == DEFAULT_WINDOW
    assert window_size(app, 100) == RUNNING_FACTOR * 100
    assert window_size(app_for(redis_url, tmp_path, window=7), 100) == 7
    ids = add_runs(engine, 300, est_seconds=0.001)
    running = 30  # as if 30 worker processes were busy: 120 messages, not 64
    with engine.begin() as conn:
        conn.execute(update(Run).where(Run.id.in_(ids[:running])).values(status=RunStatus.running))
    assert feed(app, engine) == RUNNING_FACTOR * running
