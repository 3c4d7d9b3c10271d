"""Run throughput: tiny runs through real Celery workers vs a no-op task on the same setup.

2,000 tiny runs (moons, 2-16-1 network, 20 steps each, half backprop and half
random walk, a metrics row every step, final weights stored) go through one
``celery worker`` with 2 prefork processes (``mlpq worker --concurrency 2``'s
command line) on Redis, into PostgreSQL. The reference, measured in the same
invocation with the same worker command and broker: the same number of no-op
tasks (``mlpq.ping``). Each figure is the time from the submit (for the runs:
storing them, then publishing) to the last message done (every run finished in
SQL; the Redis queue and its unacked set empty for the no-ops), workers already
up. The two take turns in rounds (``--rounds``, default 4: a quarter of the runs
each, and as many no-ops), starting and ending with the no-ops, so drift in the
machine's speed during the benchmark falls on both figures alike; each figure is
its total count over its total time. Beside them, where the CPU went during the
runs (from /proc, per run): the worker's processes, its main process,
PostgreSQL, Redis and the whole machine (2 cores give 2 s of CPU a second).
A second reference bounds what any queue and store could reach: the engine
alone (dataset, steps, result) on a sample of the same configs in this
process, times the number of worker processes; measured before the first round
and again before each round of runs (100 configs each time, the workers idle),
so that it drifts with the machine as the runs do.

``--steps N`` trains each run N steps instead of 20, everything else unchanged:
``--steps 1`` shows what the rest of a run's life (claim, setup, weights file,
final write, its own message) leaves of the no-op rate before any training.

Redis is a ``redis-server`` of the benchmark's own on a free port (no
persistence), PostgreSQL a schema of its own in ``MLPQ_BENCH_PG_URL``; both are
removed at the end. The last line is JSON. ``--quick`` uses 300 runs and ends
within a minute.

    python bench/throughput.py [--quick] [--runs N] [--rounds R] [--concurrency 2] [--steps 20]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sqlalchemy import Engine, func, select, text
from sqlalchemy.engine import make_url

from service.grids import load_grid
from service.queue import QUEUE, make_app, submit
from service.settings import load_settings
from service.store import FINISHED, Run, make_engine, upgrade
from worker.local import worker_command, worker_environment

PG_URL = os.environ.get("MLPQ_BENCH_PG_URL", "postgresql+psycopg://root@127.0.0.1:5432/test")
PING_TASK = "mlpq.ping"
GRID = """\
name: {name}
datasets: [moons]
seeds: {seeds}
model: {{hidden: [[16]], activation: tanh}}
budget: {{epochs: {steps}, iterations: {steps}}}
optimizers:
  - optimizer: backprop
    learning_rate: 0.1
  - optimizer: random_walk
    step_size: 0.1
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(predicate, timeout: float, what: str, every: float = 0.01) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"throughput: timed out waiting for {what}")
        time.sleep(every)


class Redis:
    def __init__(self, directory: Path) -> None:
        import redis

        binary = shutil.which("redis-server")
        if binary is None:
            raise SystemExit("throughput: redis-server is not installed")
        self.port = free_port()
        self.proc = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(directory),
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.client = redis.Redis(port=self.port)

        def up() -> bool:
            try:
                return bool(self.client.ping())
            except redis.RedisError:
                return False

        wait_until(up, 10, "redis-server")
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def idle(self) -> bool:
        return self.client.llen(QUEUE) == 0 and self.client.hlen("unacked") == 0

    def close(self) -> None:
        self.client.close()
        self.proc.terminate()
        self.proc.wait(timeout=10)


class Workers:
    def __init__(self, env: dict[str, str], concurrency: int, log: Path) -> None:
        self.log_path = log
        self._log = open(log, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            worker_command(concurrency=concurrency, loglevel="WARNING", hostname="bench@%h"),
            env=worker_environment(env),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=Path(__file__).resolve().parent.parent,
        )

    def wait_ready(self, app) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise SystemExit(f"throughput: worker exited:\n{self.log_path.read_text()[-3000:]}")
            replies = app.control.ping(timeout=0.5)
            return bool(replies)

        wait_until(ready, 60, "the worker", every=0.2)

    def children(self) -> list[int]:
        path = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        try:
            return [int(p) for p in path.read_text().split()]
        except OSError:
            return []

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()


def _times(pid: int) -> tuple[int, int]:
    """(own, reaped children's) CPU ticks of ``pid``; zeros once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0, 0
    return int(fields[11]) + int(fields[12]), int(fields[13]) + int(fields[14])


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def tree_cpu(parent: int) -> tuple[float, float]:
    """CPU seconds so far of ``parent`` itself and of all its children, exited ones included."""
    own, reaped = _times(parent)
    live = sum(_times(child)[0] for child in _children(parent))
    tick = os.sysconf("SC_CLK_TCK")
    return own / tick, (reaped + live) / tick


def postmaster_pid() -> int | None:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() == "postgres" and (
                    entry / "stat"
                ).read_text().rsplit(")", 1)[1].split()[1] == "1":
                    return int(entry.name)
            except OSError:
                pass
    return None


def machine_cpu_seconds() -> float:
    """CPU seconds the whole machine has spent busy (all cores, idle and iowait excluded)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    busy = sum(fields) - fields[3] - fields[4]
    return busy / os.sysconf("SC_CLK_TCK")


def cpu_breakdown(worker: int, redis: int) -> dict[str, float]:
    """CPU seconds so far, by who spent them (on Linux, from /proc)."""
    main, children = tree_cpu(worker)
    postmaster = postmaster_pid()
    postgres = sum(tree_cpu(postmaster)) if postmaster else float("nan")
    return {
        "worker processes": children,
        "worker main process": main,
        "PostgreSQL": postgres,
        "Redis": sum(tree_cpu(redis)),
        "whole machine": machine_cpu_seconds(),
    }


def publish_pings(app, n: int) -> None:
    """n no-op messages, published the way service.queue.enqueue.publish_runs publishes runs."""
    amqp = app.amqp
    with app.connection_for_write() as conn:
        producer = amqp.Producer(conn, auto_declare=False)
        with producer.batch(max_size=n + 1):
            for _ in range(n):
                task_id = str(uuid.uuid4())
                message = amqp.create_task_message(
                    task_id, PING_TASK, (), {}, argsrepr="()", kwargsrepr="{}"
                )
                amqp.send_task_message(producer, PING_TASK, message, queue=QUEUE, retry=False)


def engine_seconds_per_run(configs: list[dict], sample: int, offset: int = 0) -> float:
    """Mean seconds the engine alone spends on one of ``configs`` (load, train, result).

    ``sample`` configs drawn at random (seeded by ``offset``: each call its own).
    """
    import random

    from threadpoolctl import threadpool_limits

    from engine import TrainConfig, Trainer, load_dataset

    picked = random.Random(offset).sample(configs, min(sample, len(configs)))
    # One BLAS thread, as in every worker process.
    with threadpool_limits(limits=1):
        start = time.perf_counter()
        for raw in picked:
            cfg = TrainConfig.from_dict(raw)
            data = load_dataset(
                cfg.dataset, seed=cfg.seed, val_fraction=cfg.val_fraction, dtype=cfg.dtype
            )
            trainer = Trainer(cfg, data)
            records = [r for r in trainer.steps() if r is not None]
            trainer.result()
            assert len(records) == cfg.max_steps
    return (time.perf_counter() - start) / len(picked)


def finished(engine: Engine) -> int:
    with engine.connect() as conn:
        return conn.execute(
            select(func.count()).select_from(Run).where(Run.status.in_(list(FINISHED)))
        ).scalar_one()


def last_finish(engine: Engine) -> float:
    """When the last run finished (seconds since the epoch, the workers' clock is this one).

    A round ends there, not when the bench's next look at the store sees it: looking
    every 50 ms added 25 ms a round on average (4% of a 0.6 s round), and looking more
    often takes CPU from the workers.
    """
    with engine.connect() as conn:
        return conn.execute(select(func.max(Run.finished_at))).scalar_one().timestamp()


def start_profilers(folder: Path, pids: list[int]) -> list[subprocess.Popen]:
    folder.mkdir(parents=True, exist_ok=True)
    return [
        subprocess.Popen(
            [
                *("py-spy", "record", "--pid", str(pid), "--idle", "--rate", "250"),
                *("--format", "raw", "-o", str(folder / f"worker-{pid}.txt")),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for pid in pids
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="300 runs; ends within a minute")
    parser.add_argument("--runs", type=int, default=None, help="runs (default 2000)")
    parser.add_argument(
        "--rounds", type=int, default=None, help="alternations of the two (default 4; quick 2)"
    )
    parser.add_argument("--concurrency", type=int, default=2, help="worker processes")
    parser.add_argument(
        "--steps", type=int, default=20, help="training steps per run (default 20, the spec)"
    )
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="py-spy record the worker's processes into this folder (no-op rounds included)",
    )
    args = parser.parse_args()
    if args.steps < 1:
        parser.error(f"--steps: expected a whole number of at least 1, got {args.steps}")
    rounds = args.rounds or (2 if args.quick else 4)
    per_round = -(-(args.runs or (300 if args.quick else 2000)) // (2 * rounds)) * 2
    runs = per_round * rounds
    # Other work on the machine slows the runs (CPU-bound: children, PostgreSQL, the
    # worker's main process) far more than the no-op tasks (bound by the main process).
    load_before = os.getloadavg()[0]

    tmp = Path(tempfile.mkdtemp(prefix="mlpq-bench-"))
    schema = f"mlpq_bench_{uuid.uuid4().hex[:10]}"
    admin = make_engine(PG_URL)
    with admin.begin() as conn:
        conn.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
    url = make_url(PG_URL).update_query_dict({"options": f"-csearch_path={schema}"})
    store_url = url.render_as_string(hide_password=False)
    redis = Redis(tmp)
    engine = make_engine(store_url)
    workers = None
    try:
        upgrade(engine)
        settings = {"database_url": store_url, "broker_url": redis.url, "home": tmp / "home"}
        app = make_app(load_settings(**settings))
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLPQ_")}
        env.update({f"MLPQ_{k.upper()}": str(v) for k, v in settings.items()})
        # One grid a round, with seeds of its own (the same seeds would be skipped as done).
        # Each round trains a grid packed as mlpq packs it and one with a message per run
        # (MLPQ_PACK_SECONDS=0, the switch), so both rates come from the same minutes.
        single_app = make_app(load_settings(**settings, pack_seconds=0))
        grids, single_grids = [], []
        for r in range(2 * rounds):
            seeds = list(range(r * per_round // 2, (r + 1) * per_round // 2))
            grid_file = tmp / f"grid-{r}.yaml"
            grid_file.write_text(GRID.format(name=f"throughput-{r}", seeds=seeds, steps=args.steps))
            grid = load_grid(grid_file, max_runs=per_round, yes=True)
            assert len(grid.runs) == per_round, len(grid.runs)
            (grids if r % 2 == 0 else single_grids).append(grid)

        # The engine alone on the same configs, in this process: what no queue or store could
        # beat. Measured before every round of runs too (the workers idle meanwhile), so the
        # machine's drift falls on it as on the runs.
        configs = [run.config for grid in grids for run in grid.runs]
        engine_times = [engine_seconds_per_run(configs, sample=100)]

        workers = Workers(env, args.concurrency, tmp / "worker.log")
        workers.wait_ready(app)
        profilers = []
        if args.profile:
            profilers = start_profilers(args.profile, [workers.proc.pid, *workers.children()])
            time.sleep(1.0)

        def noop_round() -> float:
            start = time.perf_counter()
            publish_pings(app, per_round)
            wait_until(redis.idle, 300, "the no-op tasks")
            return time.perf_counter() - start

        # The no-op reference and the runs take turns, a round of each, starting and
        # ending with the reference: drift in the machine's speed (other tenants, its
        # clock) falls on both figures alike.
        noop_times = [noop_round()]
        run_times, single_times, submit_s, published = [], [], 0.0, 0
        cpu = dict.fromkeys(cpu_breakdown(workers.proc.pid, redis.proc.pid), 0.0)
        done = 0
        for r, (grid, single) in enumerate(zip(grids, single_grids, strict=True)):
            engine_times.append(engine_seconds_per_run(configs, sample=100, offset=r + 1))
            cpu_before = cpu_breakdown(workers.proc.pid, redis.proc.pid)
            start, start_wall = time.perf_counter(), time.time()
            report = submit(grid=grid, engine=engine, app=app)
            submit_s += time.perf_counter() - start
            published += report.published
            done += per_round
            wait_until(lambda done=done: finished(engine) >= done, 900, "the runs", every=0.05)
            run_times.append(last_finish(engine) - start_wall)
            cpu_after = cpu_breakdown(workers.proc.pid, redis.proc.pid)
            for name in cpu:
                cpu[name] += cpu_after[name] - cpu_before[name]
            start_wall = time.time()
            submit(grid=single, engine=engine, app=single_app)
            done += per_round
            wait_until(lambda done=done: finished(engine) >= done, 900, "the runs", every=0.05)
            single_times.append(last_finish(engine) - start_wall)
            noop_times.append(noop_round())
        for prof in profilers:
            prof.send_signal(signal.SIGINT)
            prof.wait(timeout=60)

        with engine.connect() as conn:
            statuses = dict(
                conn.execute(text("SELECT status, count(*) FROM runs GROUP BY status")).all()
            )
            rows = conn.execute(text("SELECT count(*) FROM metrics")).scalar_one()
            weights = conn.execute(
                text("SELECT count(*) FROM artifacts WHERE kind = 'weights'")
            ).scalar_one()
        trained = 2 * runs
        if statuses != {"succeeded": trained} or rows != trained * args.steps or weights != trained:
            raise SystemExit(
                f"throughput: wrong result: {statuses}, {rows} rows, {weights} weights"
            )
    finally:
        if workers is not None:
            workers.stop()
        engine.dispose()
        redis.close()
        with admin.begin() as conn:
            conn.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        admin.dispose()
        shutil.rmtree(tmp, ignore_errors=True)

    runs_s, noops = sum(run_times), per_round * len(noop_times)
    runs_per_s = runs / runs_s
    single_per_s = runs / sum(single_times)
    noop_per_s = noops / sum(noop_times)
    fraction = runs_per_s / noop_per_s
    print(
        f"tiny runs:  {runs} in {runs_s:.2f}s = {runs_per_s:.1f} runs/s "
        f"({args.steps} step{'s' if args.steps != 1 else ''} each; {args.concurrency} worker "
        f"processes, Redis, PostgreSQL; {rounds} rounds of {per_round}, of which "
        f"{submit_s:.2f}s storing and publishing {published} runs)"
    )
    print(
        f"no-op task: {noops} in {sum(noop_times):.2f}s = {noop_per_s:.1f} tasks/s (same "
        f"worker and broker; {len(noop_times)} rounds, before, between and after the runs: "
        + ", ".join(f"{per_round / t:.0f}" for t in noop_times)
        + "/s)"
    )
    print(
        f"one message per run (MLPQ_PACK_SECONDS=0): {runs} in {sum(single_times):.2f}s = "
        f"{single_per_s:.1f} runs/s; packed: {runs_per_s / single_per_s:.2f}x that"
    )
    print("runs by round: " + ", ".join(f"{per_round / t:.0f}" for t in run_times) + " runs/s")
    print(
        "CPU per run (ms): "
        + ", ".join(f"{name} {seconds / runs * 1000:.2f}" for name, seconds in cpu.items())
    )
    engine_s = sum(engine_times) / len(engine_times)
    engine_bound = args.concurrency / engine_s
    print(
        f"engine only: {engine_s * 1000:.2f} ms per run in one process "
        f"= at most {engine_bound:.1f} runs/s on {args.concurrency} processes (mean of "
        f"{len(engine_times)} samples of 100 runs, before each round: "
        + ", ".join(f"{t * 1000:.2f}" for t in engine_times)
        + " ms)"
    )
    print(
        f"ratio: {runs_per_s / engine_bound:.2f} of the engine-only bound (target >= 0.5 at 20 "
        f"steps; one message per run: {single_per_s / engine_bound:.2f}); "
        f"{fraction:.2f} of the no-op rate"
    )
    print(
        json.dumps(
            {
                "runs": runs,
                "rounds": rounds,
                "concurrency": args.concurrency,
                "steps": args.steps,
                "runs_per_s": round(runs_per_s, 1),
                "one_message_per_run_per_s": round(single_per_s, 1),
                "noop_per_s": round(noop_per_s, 1),
                "runs_per_s_by_round": [round(per_round / t, 1) for t in run_times],
                "noop_per_s_by_round": [round(per_round / t, 1) for t in noop_times],
                "fraction_of_noop": round(fraction, 3),
                "engine_only_per_s": round(engine_bound, 1),
                "engine_ms_per_run_by_round": [round(t * 1000, 2) for t in engine_times],
                "fraction_of_engine_only": round(runs_per_s / engine_bound, 3),
                "one_message_per_run_fraction_of_engine_only": round(
                    single_per_s / engine_bound, 3
                ),
                "cpu_ms_per_run": {k: round(v / runs * 1000, 2) for k, v in cpu.items()},
                "load_1m_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
            }
        )
    )


if __name__ == "__main__":
    main()
