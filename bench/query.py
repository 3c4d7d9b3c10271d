"""Query latency on a large PostgreSQL store: leaderboard and loss curve.

Builds a store in a schema of its own (dropped at the end): 100 experiments,
100,000 runs with summary results, 10,000,000 metric rows (100 steps per run),
generated in the server with ``generate_series`` (the fastest bulk path: no
bytes cross the wire). The metrics table gets its primary key and foreign key
back after the load, as a bulk load would do; then VACUUM ANALYZE.

Experiment ``exp-1`` holds a tenth of the runs (10,000; its hidden sizes and
learning rates vary, the rest are seeds); the last 100 runs log 1,000 steps
instead of 100 (90,000 more metric rows).

Then it times, as median milliseconds over many different experiments / runs,
the statements a user types (``service.results.queries``):

* top 10 runs of an experiment by best validation accuracy (``run_summary``),
* the full loss curve of one run (``metrics`` by primary key),
* ``mlpq top exp-1 --group-by optimizer,hidden,learning_rate`` (mean and std
  per group over 10,000 runs), beside the plain SQL with PostgreSQL's own
  ``stddev_samp`` that returns the same rows,
* the data behind a plot of 100 runs x 1,000 steps (``curves``: one statement),
  beside the plain SQL run through the driver's cursor,

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

from service.results import (
    curves,
    group_leaderboard,
    group_leaderboard_sql,
    leaderboard,
    leaderboard_sql,
    loss_curve,
)
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

#: Reference for the grouped leaderboard: PostgreSQL's own stddev_samp.
GROUPS_REFERENCE_SQL = """\
SELECT optimizer, hidden, learning_rate, count(*) AS n_runs,
       avg(best_val_accuracy) AS mean, stddev_samp(best_val_accuracy) AS std
FROM runs
WHERE experiment_id = 1 AND status = 'succeeded' AND best_val_accuracy IS NOT NULL
GROUP BY optimizer, hidden, learning_rate
ORDER BY mean DESC, n_runs DESC
LIMIT 10"""
GROUP_BY = ["optimizer", "hidden", "learning_rate"]
#: Reference for the plot fetch: the same rows by a BETWEEN on the primary key.
CURVES_REFERENCE_SQL = (
    "SELECT run_id, step, val_loss FROM metrics WHERE run_id BETWEEN %(a)s AND %(b)s "
    "ORDER BY run_id, step"
)
LONG_RUNS, LONG_STEPS = 100, 1000


def build(engine: Engine, runs: int, steps: int) -> None:
    big = runs // 10  # exp-1
    per_rest = -(-(runs - big) // (EXPERIMENTS - 1))
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
            SELECT g,
                CASE WHEN g <= {big} THEN 1
                    ELSE LEAST((g - {big} - 1) / {per_rest} + 2, {EXPERIMENTS}) END,
                '{{}}', md5(g::text),
                CASE WHEN mod(g, 2) = 0 THEN 'backprop' ELSE 'random_walk' END, 'digits',
                (ARRAY['32x16', '64x32', '16'])[mod(g / 2, 3) + 1],
                'relu', g, {steps}, 0.001 * (1 + mod(g / 6, 4)), 32, 'succeeded', true, 1,
                now(), now(), now(), false,
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
        # The last LONG_RUNS runs log LONG_STEPS steps (the plot fetch).
        conn.exec_driver_sql(
            f"""INSERT INTO metrics (run_id, step, train_loss, val_loss)
            SELECT r, s, exp(-s / 300.0) + random() * 0.01, exp(-s / 300.0) + random() * 0.02
            FROM generate_series({runs - LONG_RUNS + 1}, {runs}) r,
                generate_series({steps}, {LONG_STEPS - 1}) s"""
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


def text_of_curves() -> str:
    from service.results.queries import CURVES_SQL

    return CURVES_SQL.format(metric="val_loss")


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
        run_ids = [rng.randrange(1, runs - LONG_RUNS + 1) for _ in range(args.samples)]
        long_ids = list(range(runs - LONG_RUNS + 1, runs + 1))

        # Correctness first: the answers must be what the data says.
        top = leaderboard(engine, experiment="exp-1", limit=10)
        curve = loss_curve(engine, run_id=run_ids[0])
        assert len(top) == 10 and len(curve) == steps, (len(top), len(curve))
        with engine.connect() as conn:
            history = conn.execute(text(FROM_HISTORY_SQL), {"experiment": "exp-1"}).all()
        assert len(history) == 10
        groups = group_leaderboard(
            engine, experiment="exp-1", by="best_val_accuracy", group_by=GROUP_BY, limit=10
        )
        with engine.connect() as conn:
            reference = conn.execute(text(GROUPS_REFERENCE_SQL)).all()
        assert [(g["optimizer"], g["hidden"], g["learning_rate"], g["n_runs"]) for g in groups] == [
            tuple(r[:4]) for r in reference
        ]
        for g, r in zip(groups, reference, strict=True):
            assert abs(g["mean"] - float(r.mean)) < 1e-9 and abs(g["std"] - float(r.std)) < 1e-9
        plot_rows = curves(engine, run_ids=long_ids, metric="val_loss")
        raw = engine.raw_connection()
        try:

            def plain_curves(_: int) -> object:
                with raw.cursor() as cur:
                    cur.execute(CURVES_REFERENCE_SQL, {"a": long_ids[0], "b": long_ids[-1]})
                    return cur.fetchall()

            assert [tuple(r) for r in plain_curves(0)] == plot_rows
            assert len(plot_rows) == LONG_RUNS * LONG_STEPS

            def grouped(_: int) -> object:
                return group_leaderboard(
                    engine, experiment="exp-1", by="best_val_accuracy", group_by=GROUP_BY
                )

            def grouped_plain(_: int) -> object:
                with engine.connect() as conn:
                    return conn.execute(text(GROUPS_REFERENCE_SQL)).all()

            def plot_fetch(_: int) -> object:
                return curves(engine, run_ids=long_ids, metric="val_loss")

            few = list(range(max(5, args.samples // 4)))
            for fn in (grouped, grouped_plain, plot_fetch, plain_curves):
                fn(0)
            grouped_ms = median_ms(grouped, few)
            grouped_plain_ms = median_ms(grouped_plain, few)
            plot_ms = median_ms(plot_fetch, few)
            plot_plain_ms = median_ms(plain_curves, few)
        finally:
            raw.close()

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
        print(f"mlpq top exp-1 --group-by {','.join(GROUP_BY)} (10% of the runs):")
        print("  " + group_leaderboard_sql("best_val_accuracy", GROUP_BY).replace("\n", "\n  "))
        print(f"  median {grouped_ms:.2f} ms")
        print("  reference, the plain SQL with stddev_samp:")
        print("  " + GROUPS_REFERENCE_SQL.replace("\n", "\n  "))
        print(f"  median {grouped_plain_ms:.2f} ms (ratio {grouped_ms / grouped_plain_ms:.3f})")
        print(f"plot data: val_loss of {LONG_RUNS} runs x {LONG_STEPS} steps, one statement:")
        print("  " + text_of_curves().replace("\n", "\n  "))
        print(f"  median {plot_ms:.2f} ms")
        print("  reference, the plain SQL through the driver's cursor:")
        print("  " + CURVES_REFERENCE_SQL)
        print(f"  median {plot_plain_ms:.2f} ms (ratio {plot_ms / plot_plain_ms:.3f})")
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
                    "group_by_ms": round(grouped_ms, 3),
                    "group_by_plain_sql_ms": round(grouped_plain_ms, 3),
                    "group_by_ratio": round(grouped_ms / grouped_plain_ms, 4),
                    "group_by_runs": runs // 10,
                    "plot_fetch_ms": round(plot_ms, 3),
                    "plot_fetch_plain_sql_ms": round(plot_plain_ms, 3),
                    "plot_fetch_ratio": round(plot_ms / plot_plain_ms, 4),
                    "plot_rows": LONG_RUNS * LONG_STEPS,
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
