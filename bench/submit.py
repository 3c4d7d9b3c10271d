"""Submitting a big grid: the whole ``mlpq submit`` path against a plain ``apply_async`` loop.

Ours: read, validate and expand a grid file of RUNS runs (``service.grids.loader.load_grid``),
then ``service.queue.enqueue.submit``: one transaction inserting the experiment and its
runs (COPY on PostgreSQL), then one Celery message per run, published in
pipelined batches, each batch marked ``published`` in SQL.

Reference, in the same process and on the same Redis: what a user would write
with Celery alone, ``task.apply_async(args=(run_id,))`` once per run. It only
publishes (no parsing, no SQL), so the ratio is conservative. With ``--sample``
it times that many messages rather than RUNS.

The store is a PostgreSQL schema of the benchmark's own (``MLPQ_BENCH_PG_URL``),
the broker a Redis db of its own (``MLPQ_BENCH_REDIS_URL``; a db 1..15 taken by
the same lease the tests use); both are removed or flushed at the end. Both
queues are checked to hold exactly the messages sent. The last line is JSON.

    python bench/submit.py [--runs 100000] [--quick]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import redis
from sqlalchemy import func, select
from sqlalchemy.engine import make_url

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from service.grids import load_grid
from service.queue import QUEUE, TRAIN_TASK, make_app, submit
from service.settings import load_settings
from service.store import Run, make_engine, upgrade

PG_URL = os.environ.get("MLPQ_BENCH_PG_URL", "postgresql+psycopg://root@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("MLPQ_BENCH_REDIS_URL", "redis://127.0.0.1:6379")
# Runs per optimizer block before seeds: 5 datasets x 5 networks x 4 activations x 5 x 5.
PER_SEED = 2 * 5 * 5 * 4 * 5 * 5

GRID = """\
name: bench-submit-{token}
datasets: [moons, xor, circles, spirals, blobs]
model:
  hidden: [[8], [16], [32], "16x16", "32x16"]
  activation: [relu, tanh, sigmoid, leaky_relu]
seeds: {seeds}
budget: {{epochs: 5, iterations: 50}}
optimizers:
  - optimizer: backprop
    learning_rate: [0.3, 0.1, 0.03, 0.01, 0.003]
    batch_size: [16, 32, 64, 128, 256]
  - optimizer: random_walk
    step_size: [0.3, 0.1, 0.03, 0.01, 0.003]
    candidates: [1, 2, 4, 8, 16]
"""


@contextmanager
def pg_schema() -> Iterator[str]:
    admin = make_engine(PG_URL)
    schema = f"mlpq_bench_{uuid.uuid4().hex[:10]}"
    with admin.begin() as conn:
        conn.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
    url = make_url(PG_URL).update_query_dict({"options": f"-csearch_path={schema}"})
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.begin() as conn:
            conn.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        admin.dispose()


@contextmanager
def redis_db() -> Iterator[str]:
    base = redis.Redis.from_url(REDIS_URL, db=0)
    token = uuid.uuid4().hex
    deadline = time.monotonic() + 60
    db = None
    while db is None:
        for candidate in range(15, 0, -1):
            if base.set(f"mlpq-test-lease:{candidate}", token, nx=True, ex=1800):
                db = candidate
                break
        else:
            if time.monotonic() > deadline:
                raise SystemExit("submit bench: every Redis db 1..15 is leased")
            time.sleep(0.5)
    client = redis.Redis.from_url(REDIS_URL, db=db)
    client.flushdb()
    try:
        yield f"{REDIS_URL.rstrip('/')}/{db}"
    finally:
        client.flushdb()
        if base.get(f"mlpq-test-lease:{db}") == token.encode():
            base.delete(f"mlpq-test-lease:{db}")


def ours(grid_path: Path, store_url: str, app, client: redis.Redis) -> dict[str, float]:
    engine = make_engine(store_url)
    upgrade(engine)
    marks: dict[str, float] = {}

    def progress(phase: str, done: int, total: int) -> None:
        if done == total:
            marks[phase] = time.perf_counter()

    start = time.perf_counter()
    grid = load_grid(grid_path, yes=True)
    expanded = time.perf_counter()
    report = submit(grid=grid, engine=engine, app=app, progress=progress)
    end = time.perf_counter()
    with engine.connect() as conn:
        published = conn.execute(select(func.count()).where(Run.published)).scalar()
    engine.dispose()
    queued = client.llen(QUEUE)
    if not (report.published == published == queued == len(grid)):
        raise SystemExit(
            f"submit bench: {len(grid)} runs but {report.published} reported, "
            f"{published} marked published, {queued} messages on the queue"
        )
    return {
        "runs": len(grid),
        "seconds": end - start,
        "parse_expand_s": expanded - start,
        "insert_s": marks.get("insert", expanded) - expanded,
        "publish_s": end - marks.get("insert", expanded),
    }


def reference(app, client: redis.Redis, n: int) -> float:
    def train(run_id: int) -> None:  # never runs: only its messages are timed
        return None

    task = app.task(name=TRAIN_TASK)(train)
    start = time.perf_counter()
    for run_id in range(1, n + 1):
        task.apply_async(args=(run_id,))
    seconds = time.perf_counter() - start
    if client.llen(QUEUE) != n:
        raise SystemExit(f"submit bench: apply_async sent {client.llen(QUEUE)} of {n} messages")
    return n / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100_000, help="runs in the grid")
    parser.add_argument(
        "--sample", type=int, default=None, help="apply_async messages to time (default: runs)"
    )
    parser.add_argument("--quick", action="store_true", help="10,000 runs; ends within a minute")
    args = parser.parse_args()
    runs = 10_000 if args.quick else args.runs
    seeds = max(1, math.ceil(runs / PER_SEED))
    sample = args.sample or min(runs, 10_000 if args.quick else runs)

    with tempfile.TemporaryDirectory() as tmp, pg_schema() as store_url, redis_db() as broker:
        grid_path = Path(tmp) / "grid.yaml"
        grid_path.write_text(GRID.format(token=uuid.uuid4().hex[:8], seeds=seeds))
        settings = load_settings(broker_url=broker, database_url=store_url, home=Path(tmp))
        client = redis.Redis.from_url(broker)

        ref_rate = reference(make_app(settings), client, sample)
        client.flushdb()
        result = ours(grid_path, store_url, make_app(settings), client)
        client.flushdb()

    rate = result["runs"] / result["seconds"]
    speedup = rate / ref_rate
    print(f"grid of {result['runs']:,} runs, PostgreSQL store, Redis broker")
    print(
        f"  mlpq submit (parse+validate+expand {result['parse_expand_s']:.2f}s, "
        f"insert {result['insert_s']:.2f}s, publish {result['publish_s']:.2f}s): "
        f"{result['seconds']:.2f}s = {rate:,.0f} runs/s"
    )
    print(f"  plain apply_async loop ({sample:,} messages): {ref_rate:,.0f} messages/s")
    print(f"  speedup: {speedup:.2f}x")
    print(
        json.dumps(
            {
                "runs": result["runs"],
                "runs_per_s": round(rate, 1),
                "apply_async_loop_per_s": round(ref_rate, 1),
                "apply_async_sample": sample,
                "speedup_vs_apply_async_loop": round(speedup, 2),
                "seconds": round(result["seconds"], 3),
                "parse_expand_s": round(result["parse_expand_s"], 3),
                "insert_s": round(result["insert_s"], 3),
                "publish_s": round(result["publish_s"], 3),
            }
        )
    )


if __name__ == "__main__":
    main()
