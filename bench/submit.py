"""Submitting a big grid: the whole ``mlpq submit`` path against a plain ``apply_async`` loop.

Ours, as ``mlpq submit`` does it: read and validate a grid file of RUNS runs
(``service.grids.loader.load_grid(lazy=True)``), then ``service.queue.enqueue.submit``:
one transaction storing the experiment and every run unsent with its cost estimate
(COPY on PostgreSQL, executemany on SQLite), then the window: at most ``MLPQ_WINDOW``
(by default 64) packed messages go to the broker, the workers publish the rest later.
On PostgreSQL a grid of 50,000 runs or more is expanded while it is stored (a chunk
at a time, its lookups on a second connection, beside the COPY); ``--eager`` expands
it whole first, as ``mlpq submit`` did before. Timed from reading the grid file to
``submit()`` returning, in phases: parse+validate (+expand with ``--eager``), prepare
(the dedupe lookup and the rows; eager only), insert (to the commit), publish.

Reported beside it: Redis ``used_memory`` before the submit, after it, and its
peak while the submit runs (sampled every 50 ms from a thread; the bench's Redis
is one leased db of a shared server, so the increase is what counts), the length
of the queue, and the store's size (PostgreSQL: ``pg_total_relation_size`` of
``runs`` and ``experiments``; SQLite: the database file and its WAL).

Reference, in the same process and on the same Redis: what a user would write
with Celery alone, ``task.apply_async(args=(run_id,))`` once per run, timed on a
sample of ``--sample`` messages (by default 10,000). It only publishes (no
parsing, no SQL), so the ratio is conservative; its Redis memory per message
shows what one message per run would have put in Redis.

The store is a PostgreSQL schema of the benchmark's own (``MLPQ_BENCH_PG_URL``) or,
with ``--store sqlite``, a fresh SQLite file; the broker a Redis db of its own
(``MLPQ_BENCH_REDIS_URL``; a db 1..15 taken by the same lease the tests use);
both are removed or flushed at the end. The store is checked to hold every run,
the runs it marks published are those the submit reported, and the queue holds
no more than the window. Then the same grid is submitted again and timed: every
run is found queued already (dedupe), and nothing is stored or sent twice. The
last line is JSON.

    python bench/submit.py [--runs 100000] [--quick] [--store sqlite] [--sample N] [--eager]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import threading
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
from service.queue.window import window_size
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
def store(kind: str, tmp: Path) -> Iterator[str]:
    if kind == "sqlite":
        yield f"sqlite:///{tmp / 'store.db'}"
        return
    with pg_schema() as url:
        yield url


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


def used_memory(client: redis.Redis) -> int:
    return int(client.info("memory")["used_memory"])


class MemorySampler:
    """Redis ``used_memory`` every ``interval`` seconds from a thread; ``peak`` is the largest."""

    def __init__(self, client: redis.Redis, interval: float = 0.05) -> None:
        self.client = client
        self.interval = interval
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="redis-memory", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, used_memory(self.client))
            self.samples += 1
            self._stop.wait(self.interval)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, used_memory(self.client))


def store_bytes(engine) -> int:
    with engine.connect() as conn:
        if conn.dialect.name == "postgresql":
            return int(
                conn.exec_driver_sql(
                    "SELECT pg_total_relation_size('runs') + pg_total_relation_size('experiments')"
                ).scalar_one()
            )
    database = Path(engine.url.database)
    return sum(p.stat().st_size for p in (database, Path(f"{database}-wal")) if p.exists())


def ours(
    grid_path: Path, store_url: str, app, client: redis.Redis, lazy: bool = True
) -> dict[str, float]:
    engine = make_engine(store_url)
    upgrade(engine)
    marks: dict[str, float] = {}

    def progress(phase: str, done: int, total: int) -> None:
        now = time.perf_counter()
        if done == 0:
            marks.setdefault(f"{phase}_start", now)
        if done == total:
            marks[phase] = now  # the last call of "insert" comes after the commit

    before = used_memory(client)
    with MemorySampler(client) as memory:
        start = time.perf_counter()
        grid = load_grid(grid_path, yes=True, lazy=lazy)
        expanded = time.perf_counter()
        streamed = not grid.expanded  # PostgreSQL and LAZY_MIN_RUNS runs or more
        report = submit(grid=grid, engine=engine, app=app, progress=progress)
        end = time.perf_counter()
    after = used_memory(client)
    with engine.connect() as conn:
        stored = conn.execute(select(func.count()).select_from(Run)).scalar()
        published = conn.execute(select(func.count()).where(Run.published)).scalar()
    size = store_bytes(engine)
    engine.dispose()
    queued = client.llen(QUEUE)
    window = window_size(app, 0)
    if not (stored == len(grid) and report.published == published and 0 < queued <= window):
        raise SystemExit(
            f"submit bench: {len(grid)} runs but {stored} stored, {report.published} reported "
            f"published, {published} marked published, {queued} messages on the queue "
            f"(window {window})"
        )
    if report.unsent != len(grid) - published:
        raise SystemExit(f"submit bench: {report.unsent} unsent of {len(grid) - published}")
    # The same grid again: every run is found queued already (dedupe), nothing is stored
    # or sent twice.
    engine = make_engine(store_url)
    again_start = time.perf_counter()
    again = submit(grid=load_grid(grid_path, yes=True, lazy=lazy), engine=engine, app=app)
    again_seconds = time.perf_counter() - again_start
    with engine.connect() as conn:
        stored_again = conn.execute(select(func.count()).select_from(Run)).scalar()
    engine.dispose()
    if again.new or again.already_queued != len(grid) or stored_again != stored:
        raise SystemExit(
            f"submit bench: the re-submit stored {again.new} new runs ({stored_again} in all) "
            f"and found {again.already_queued} of {len(grid)} queued"
        )
    if client.llen(QUEUE) > window:
        raise SystemExit(f"submit bench: {client.llen(QUEUE)} messages after the re-submit")
    inserted = marks.get("insert", expanded)
    prepared = marks.get("insert_start", inserted)
    return {
        "runs": len(grid),
        "streamed": streamed,
        "seconds": end - start,
        "parse_expand_s": expanded - start,
        "prepare_s": prepared - expanded,
        "insert_s": inserted - prepared,
        "publish_s": end - inserted,
        "published_runs": published,
        "queue_messages": queued,
        "window": window,
        "memory_before": before,
        "memory_after": after,
        "memory_peak": memory.peak,
        "memory_samples": memory.samples,
        "store_bytes": size,
        "resubmit_s": again_seconds,
    }


def reference(app, client: redis.Redis, n: int) -> tuple[float, float]:
    """apply_async messages/s over ``n`` messages, and Redis bytes per message queued."""

    def train(run_id: int) -> None:  # never runs: only its messages are timed
        return None

    task = app.task(name=TRAIN_TASK)(train)
    before = used_memory(client)
    start = time.perf_counter()
    for run_id in range(1, n + 1):
        task.apply_async(args=(run_id,))
    seconds = time.perf_counter() - start
    if client.llen(QUEUE) != n:
        raise SystemExit(f"submit bench: apply_async sent {client.llen(QUEUE)} of {n} messages")
    return n / seconds, (used_memory(client) - before) / n


def mb(n: float) -> str:
    return f"{n / 1e6:,.1f} MB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100_000, help="runs in the grid")
    parser.add_argument(
        "--sample", type=int, default=None, help="apply_async messages to time (default: 10,000)"
    )
    parser.add_argument("--quick", action="store_true", help="10,000 runs; ends within a minute")
    parser.add_argument(
        "--store", choices=("postgresql", "sqlite"), default="postgresql", help="the SQL store"
    )
    parser.add_argument(
        "--eager",
        action="store_true",
        help="expand the whole grid before storing it (as before grids were expanded as stored)",
    )
    args = parser.parse_args()
    runs = 10_000 if args.quick else args.runs
    seeds = max(1, math.ceil(runs / PER_SEED))
    sample = args.sample or min(runs, 10_000)

    with (
        tempfile.TemporaryDirectory() as tmp,
        store(args.store, Path(tmp)) as store_url,
        redis_db() as broker,
    ):
        grid_path = Path(tmp) / "grid.yaml"
        grid_path.write_text(GRID.format(token=uuid.uuid4().hex[:8], seeds=seeds))
        settings = load_settings(broker_url=broker, database_url=store_url, home=Path(tmp))
        client = redis.Redis.from_url(broker)

        ref_rate, ref_bytes = reference(make_app(settings), client, sample)
        client.flushdb()
        result = ours(grid_path, store_url, make_app(settings), client, lazy=not args.eager)
        client.flushdb()

    rate = result["runs"] / result["seconds"]
    speedup = rate / ref_rate
    increase = result["memory_peak"] - result["memory_before"]
    store_name = "PostgreSQL" if args.store == "postgresql" else "SQLite"
    print(f"grid of {result['runs']:,} runs, {store_name} store, Redis broker")
    print(
        f"  mlpq submit (parse+validate{'' if result['streamed'] else '+expand'} "
        f"{result['parse_expand_s']:.2f}s, prepare {result['prepare_s']:.2f}s, insert"
        f"{' (expanded meanwhile)' if result['streamed'] else ''} {result['insert_s']:.2f}s, "
        f"publish {result['publish_s']:.2f}s): {result['seconds']:.2f}s = {rate:,.0f} runs/s"
    )
    waiting = result["runs"] - result["published_runs"]
    print(
        f"  queue: {result['queue_messages']} messages (window {result['window']}) carrying "
        f"{result['published_runs']:,} runs; the other {waiting:,} wait in the store"
    )
    print(
        f"  Redis used_memory: before {mb(result['memory_before'])}, after "
        f"{mb(result['memory_after'])}, peak {mb(result['memory_peak'])} "
        f"({result['memory_samples']} samples): increase {increase / 1e3:,.0f} kB"
    )
    print(f"  store (runs + experiments): {mb(result['store_bytes'])}")
    print(
        f"  the same grid submitted again (every run found queued, nothing stored or sent): "
        f"{result['resubmit_s']:.2f}s = {result['runs'] / result['resubmit_s']:,.0f} runs/s"
    )
    print(
        f"  plain apply_async loop ({sample:,} messages): {ref_rate:,.0f} messages/s, "
        f"{ref_bytes:,.0f} Redis bytes per message (one message per run: "
        f"{mb(ref_bytes * result['runs'])})"
    )
    print(f"  speedup: {speedup:.2f}x")
    print(
        json.dumps(
            {
                "runs": result["runs"],
                "store": args.store,
                "expanded_while_stored": result["streamed"],
                "runs_per_s": round(rate, 1),
                "seconds": round(result["seconds"], 3),
                "parse_expand_s": round(result["parse_expand_s"], 3),
                "prepare_s": round(result["prepare_s"], 3),
                "insert_s": round(result["insert_s"], 3),
                "publish_s": round(result["publish_s"], 3),
                "queue_messages": result["queue_messages"],
                "published_runs": result["published_runs"],
                "redis_used_memory_before_bytes": result["memory_before"],
                "redis_used_memory_after_bytes": result["memory_after"],
                "redis_used_memory_peak_bytes": result["memory_peak"],
                "redis_used_memory_increase_bytes": increase,
                "store_bytes": result["store_bytes"],
                "resubmit_s": round(result["resubmit_s"], 3),
                "resubmit_runs_per_s": round(result["runs"] / result["resubmit_s"], 1),
                "apply_async_loop_per_s": round(ref_rate, 1),
                "apply_async_sample": sample,
                "apply_async_redis_bytes_per_message": round(ref_bytes, 1),
                "speedup_vs_apply_async_loop": round(speedup, 2),
            }
        )
    )


if __name__ == "__main__":
    main()
