"""Query latency on a large PostgreSQL store: leaderboard and loss curve.

Builds a store in a schema of its own (dropped at the end): 100 experiments,
100,000 runs with summary results, 10,000,000 metric rows (100 steps per run),
generated in the server with ``generate_series`` (the fastest bulk path: no
bytes cross the wire). The metrics table gets its primary key and foreign key
back after the load, as a bulk load would do; then VACUUM ANALYZE.

Then it times, as median milliseconds over many different experiments / runs,
the statements a user types (``service.results.queries``):

* top 10 runs of an experiment by best validation accuracy (``run_summary``),
* the full loss curve of one run (``metrics`` by primary key),

and, as the reference in the same run, the top 10 computed from the metric
history instead of the runs' summary columns (what a store without summary
columns has to do). The last line is JSON. ``--quick``: 10,000 runs, 1,000,000 rows.

    python bench/query.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import Engine, text
from sqlalchemy.engine import make_url

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from service.results import leaderboard, leaderboard_sql, loss_curve
from service.store import make_engine, upgrade

PG_URL = os.environ.get("MLPQ_BENCH_PG_URL", "postgresql+psycopg://root@127.0.0.1:5432/test")
EXPERIMENTS = 100

#: Reference: the leaderboard computed from the metric history.
FROM_HISTORY_SQL = """\
SELECT m.run_id, MAX(m.val_accuracy) AS best_val_accuracy
FROM metrics m
JOIN runs r ON r.id = m.run_id
JOIN experiments e ON e.id = r.experiment_id
WHERE e.name = :experiment
GROUP BY m.run_id
ORDER BY best_val_accuracy DESC, m.run_id
LIMIT 10"""


def build(engine: Engine, runs: int, steps: int) -> None:
    per_experiment = runs // EXPERIMENTS
    with engine.begin() as conn:
        conn.exec_driver_sql("SET LOCAL synchronous_commit = off")
        conn.exec_driver_sql("SET LOCAL maintenance_work_mem = '512MB'")
        conn.exec_driver_sql(
            f"""INSERT INTO experiments (id, name, spec, created_at)
            SELECT g, 'exp-' || g, '{{}}', now() FROM generate_series(1, {EXPERIMENTS}) g"""
        )
        # Summary columns: a best accuracy in [0.5, 1), the rest derived from it.
        conn.exec_driver_sql(
            f"""INSERT INTO runs (id, experiment_id, config, config_hash, optimizer, dataset,
                hidden, activation, seed, max_steps, learning_rate, batch_size, status,
                published, attempt, created_at, started_at, finished_at, cancel_requested,
                final_train_loss, final_val_loss, best_val_loss, final_train_accuracy,
                final_val_accuracy, best_val_accuracy, iterations, evaluations, wall_seconds)
            SELECT g, (g - 1) / {per_experiment} + 1, '{{}}', md5(g::text),
                CASE WHEN mod(g, 2) = 0 THEN 'backprop' ELSE 'random_walk' END, 'digits', '32x16',
                'relu', g, {steps}, 0.01, 32, 'succeeded', true, 1, now(), now(), now(), false,
                a.loss, a.loss * 1.1, a.loss, a.acc, a.acc - 0.01, a.acc, {steps}, {steps}, 1.5
            FROM generate_series(1, {runs}) g,
                LATERAL (SELECT 0.5 + random() * 0.5 + g * 0 AS acc, random() + g * 0 AS loss) a"""
        )
        conn.exec_driver_sql("ALTER TABLE metrics DROP CONSTRAINT fk_metrics_run_id_runs")
        conn.exec_driver_sql("ALTER TABLE metrics DROP CONSTRAINT pk_metrics")
        conn.exec_driver_sql(
            f"""INSERT INTO metrics (run_id, step, train_loss, val_loss, train_accuracy,
                val_accuracy, evaluations, elapsed, grad_norm, learning_rate)
            SELECT r, s, exp(-s / 30.0) + random() * 0.01, exp(-s / 30.0) + random() * 0.02,
                1 - exp(-s / 30.0) * 0.5, 1 - exp(-s / 30.0) * 0.5 - random() * 0.02,
                s + 1, (s + 1) * 0.015, random(), 0.01
            FROM generate_series(1, {runs}) r, generate_series(0, {steps - 1}) s"""
        )
        conn.exec_driver_sql(
            "ALTER TABLE metrics ADD CONSTRAINT pk_metrics PRIMARY KEY (run_id, step)"
        )
        conn.exec_driver_sql(
            "ALTER TABLE metrics ADD CONSTRAINT fk_metrics_run_id_runs FOREIGN KEY (run_id) "
            "REFERENCES runs (id) ON DELETE CASCADE"
        )
    with engine.connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT").exec_driver_sql("VACUUM ANALYZE")


def median_ms(fn: Callable[[int], object], args: list[int]) -> float:
    times = []
    for arg in args:
        start = time.perf_counter()
        fn(arg)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10,000 runs, 1,000,000 rows")
    parser.add_argument("--samples", type=int, default=41, help="timed calls per query")
    args = parser.parse_args()
    runs = 10_000 if args.quick else 100_000
    steps = 100
    admin = make_engine(PG_URL)
    schema = f"mlpq_bench_{uuid.uuid4().hex[:10]}"
    with admin.begin() as conn:
        conn.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
    url = make_url(PG_URL).update_query_dict({"options": f"-csearch_path={schema}"})
    engine = make_engine(url.render_as_string(hide_password=False))
    try:
        upgrade(engine)
        start = time.perf_counter()
        build(engine, runs, steps)
        build_s = time.perf_counter() - start
        with engine.connect() as conn:
            metric_rows = conn.execute(text("SELECT count(*) FROM metrics")).scalar_one()
            run_count = conn.execute(text("SELECT count(*) FROM runs")).scalar_one()
        print(f"built {run_count:,} runs and {metric_rows:,} metric rows in {build_s:.1f} s")

        rng = random.Random(0)
        experiments = [rng.randrange(1, EXPERIMENTS + 1) for _ in range(args.samples)]
        run_ids = [rng.randrange(1, runs + 1) for _ in range(args.samples)]

        # Correctness first: the answers must be what the data says.
        top = leaderboard(engine, experiment="exp-1", limit=10)
        curve = loss_curve(engine, run_id=run_ids[0])
        assert len(top) == 10 and len(curve) == steps, (len(top), len(curve))
        with engine.connect() as conn:
            history = conn.execute(text(FROM_HISTORY_SQL), {"experiment": "exp-1"}).all()
        assert len(history) == 10

        def top10(exp: int) -> object:
            return leaderboard(engine, experiment=f"exp-{exp}", limit=10)

        def curve_of(run_id: int) -> object:
            return loss_curve(engine, run_id=run_id)

        def from_history(exp: int) -> object:
            with engine.connect() as conn:
                return conn.execute(text(FROM_HISTORY_SQL), {"experiment": f"exp-{exp}"}).all()

        for fn, arg in ((top10, 1), (curve_of, 1), (from_history, 1)):
            fn(arg)  # warm the pool and the plan cache
        top10_ms = median_ms(top10, experiments)
        curve_ms = median_ms(curve_of, run_ids)
        history_ms = median_ms(from_history, experiments)
        print("top 10 of an experiment by best validation accuracy:")
        print("  " + leaderboard_sql("best_val_accuracy").replace("\n", "\n  "))
        print(f"  median {top10_ms:.2f} ms")
        print("the full loss curve of one run:")
        print(
            "  SELECT step, train_loss, val_loss FROM metrics WHERE run_id = :run_id ORDER BY step"
        )
        print(f"  median {curve_ms:.2f} ms")
        print(
            f"reference: top 10 from the metric history instead of summary columns: "
            f"median {history_ms:.2f} ms (ratio summary / history = {top10_ms / history_ms:.3f})"
        )
        print(
            json.dumps(
                {
                    "runs": run_count,
                    "metric_rows": metric_rows,
                    "build_seconds": round(build_s, 1),
                    "top10_ms": round(top10_ms, 3),
                    "curve_ms": round(curve_ms, 3),
                    "top10_from_history_ms": round(history_ms, 3),
                    "top10_ratio_vs_history": round(top10_ms / history_ms, 4),
                    "samples": args.samples,
                }
            )
        )
    finally:
        engine.dispose()
        with admin.begin() as conn:
            conn.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        admin.dispose()


if __name__ == "__main__":
    main()
