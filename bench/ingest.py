"""Metric ingest: the store API against the raw driver call, on PostgreSQL and SQLite.

Writes RUNS x STEPS metric rows (every metric column a float) the way workers do:
one call per run and batch of ``metrics_batch_rows`` (500 by default) rows, each
batch its own transaction — a worker flushes its buffer at that size (or every
``metrics_flush_seconds``) and commits. The same rows, in the same batches, go
through the reference into the same table (the migrated ``metrics`` table with
its primary key and foreign key):

* PostgreSQL: our ``write_metrics(engine, run_id, records)`` (dict records, as
  workers hold them) vs a raw psycopg binary ``COPY ... FROM STDIN`` with
  ``write_row`` of ready tuples (the fastest plain COPY; the text-format COPY is
  printed too).
* SQLite: ``write_metrics`` vs raw ``sqlite3`` ``executemany`` of a plain INSERT
  with the same pragmas (WAL, synchronous=NORMAL, foreign keys on).

Each figure is the median of REPEATS alternating passes into an emptied table.
The last line is JSON. ``--quick`` writes fewer runs and ends within a minute.

    python bench/ingest.py [--quick]
    MLPQ_BENCH_PG_URL=postgresql+psycopg://user@host/db python bench/ingest.py
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import Engine, text
from sqlalchemy.engine import make_url

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.metrics import METRICS, RECORD_FIELDS
from service.settings import load_settings
from service.store import METRIC_COLUMNS, make_engine, upgrade, write_metric_rows, write_metrics

PG_URL = os.environ.get("MLPQ_BENCH_PG_URL", "postgresql+psycopg://root@127.0.0.1:5432/test")

Rows = dict[int, list[tuple]]


def make_rows(runs: int, steps: int) -> Rows:
    rng = random.Random(0)
    return {
        run_id: [(run_id, step, *(rng.random() for _ in METRICS)) for step in range(steps)]
        for run_id in range(1, runs + 1)
    }


def as_records(rows: Rows) -> dict[int, list[dict]]:
    return {
        run_id: [dict(zip(RECORD_FIELDS, row[1:], strict=True)) for row in run_rows]
        for run_id, run_rows in rows.items()
    }


def batches(run_rows: list, size: int) -> list[list]:
    return [run_rows[i : i + size] for i in range(0, len(run_rows), size)]


def add_runs(engine: Engine, runs: int) -> None:
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO experiments (id, name, spec, created_at) VALUES (1, 'bench', '{}', :t)"
            ),
            {"t": "2024-01-01 00:00:00"},
        )
        conn.execute(
            text(
                "INSERT INTO runs (id, experiment_id, config, config_hash, optimizer, dataset, "
                "hidden, activation, seed, max_steps, status, published, attempt, created_at, "
                "cancel_requested) VALUES (:id, 1, '{}', 'h', 'backprop', 'iris', '16', 'relu', "
                ":id, 1000, 'running', true, 1, :t, false)"
            ),
            [{"id": i, "t": "2024-01-01 00:00:00"} for i in range(1, runs + 1)],
        )


def timed(fn: Callable[[], None], total_rows: int) -> float:
    start = time.perf_counter()
    fn()
    return total_rows / (time.perf_counter() - start)


# ----------------------------------------------------------------------------- PostgreSQL


def bench_postgres(rows: Rows, records: dict, batch: int, repeats: int) -> dict[str, float]:
    import psycopg

    admin = make_engine(PG_URL)
    schema = f"mlpq_bench_{uuid.uuid4().hex[:10]}"
    with admin.begin() as conn:
        conn.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
    url = make_url(PG_URL).update_query_dict({"options": f"-csearch_path={schema}"})
    engine = make_engine(url.render_as_string(hide_password=False))
    raw_url = url.set(drivername="postgresql").render_as_string(hide_password=False)
    raw = psycopg.connect(raw_url)
    columns = ", ".join(METRIC_COLUMNS)
    types = ["int4", "int4"] + ["float8"] * len(METRICS)
    total = sum(map(len, rows.values()))
    try:
        upgrade(engine)
        add_runs(engine, len(rows))

        def empty() -> None:
            with engine.begin() as conn:
                conn.exec_driver_sql("TRUNCATE metrics")

        def store() -> None:
            for run_id, recs in records.items():
                for part in batches(recs, batch):
                    write_metrics(engine, run_id, part)

        def store_rows() -> None:
            for run_rows in rows.values():
                for part in batches(run_rows, batch):
                    write_metric_rows(engine, part)

        def copy(binary: bool) -> Callable[[], None]:
            statement = f"COPY metrics ({columns}) FROM STDIN" + (
                " (FORMAT BINARY)" if binary else ""
            )

            def run() -> None:
                for run_rows in rows.values():
                    for part in batches(run_rows, batch):
                        with raw.transaction(), raw.cursor() as cur, cur.copy(statement) as cp:
                            if binary:
                                cp.set_types(types)
                            for row in part:
                                cp.write_row(row)

            return run

        methods = {
            "store": store,
            "store_rows": store_rows,
            "copy_binary": copy(True),
            "copy_text": copy(False),
        }
        results: dict[str, list[float]] = {name: [] for name in methods}
        for _ in range(repeats):
            for name, fn in methods.items():
                empty()
                results[name].append(timed(fn, total))
        with engine.connect() as conn:
            stored = conn.exec_driver_sql("SELECT count(*) FROM metrics").scalar_one()
        assert stored == total, f"postgres: {stored} rows stored, expected {total}"
        return {name: statistics.median(v) for name, v in results.items()}
    finally:
        raw.close()
        engine.dispose()
        with admin.begin() as conn:
            conn.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        admin.dispose()


# ----------------------------------------------------------------------------- SQLite


def bench_sqlite(rows: Rows, records: dict, batch: int, repeats: int) -> dict[str, float]:
    total = sum(map(len, rows.values()))
    insert = (
        f"INSERT INTO metrics ({', '.join(METRIC_COLUMNS)}) "
        f"VALUES ({', '.join('?' * len(METRIC_COLUMNS))})"
    )
    results: dict[str, list[float]] = {"store": [], "store_rows": [], "executemany": []}
    with tempfile.TemporaryDirectory(prefix="mlpq-bench-") as tmp:
        for i in range(repeats):
            for name in results:
                path = Path(tmp) / f"{name}-{i}.db"
                engine = make_engine(f"sqlite:///{path}")
                upgrade(engine)
                add_runs(engine, len(rows))
                if name == "store":

                    def fn(engine: Engine = engine) -> None:
                        for run_id, recs in records.items():
                            for part in batches(recs, batch):
                                write_metrics(engine, run_id, part)

                elif name == "store_rows":

                    def fn(engine: Engine = engine) -> None:
                        for run_rows in rows.values():
                            for part in batches(run_rows, batch):
                                write_metric_rows(engine, part)

                else:
                    raw = sqlite3.connect(path, isolation_level=None)
                    for pragma in ("journal_mode=WAL", "synchronous=NORMAL", "foreign_keys=ON"):
                        raw.execute(f"PRAGMA {pragma}")

                    def fn(raw: sqlite3.Connection = raw) -> None:
                        for run_rows in rows.values():
                            for part in batches(run_rows, batch):
                                raw.execute("BEGIN IMMEDIATE")
                                raw.executemany(insert, part)
                                raw.execute("COMMIT")

                results[name].append(timed(fn, total))
                with engine.connect() as conn:
                    stored = conn.exec_driver_sql("SELECT count(*) FROM metrics").scalar_one()
                assert stored == total, f"sqlite {name}: {stored} rows stored, expected {total}"
                if name == "executemany":
                    raw.close()
                engine.dispose()
                for suffix in ("", "-wal", "-shm"):
                    Path(f"{path}{suffix}").unlink(missing_ok=True)
    return {name: statistics.median(v) for name, v in results.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer runs; ends within a minute")
    parser.add_argument("--runs", type=int, help="runs to write (default 200, --quick 40)")
    parser.add_argument("--steps", type=int, default=1000, help="metric rows per run")
    parser.add_argument("--repeats", type=int, help="passes per method (median; default 3)")
    args = parser.parse_args()
    runs = args.runs or (40 if args.quick else 200)
    repeats = args.repeats or 3
    batch = load_settings().metrics_batch_rows
    rows = make_rows(runs, args.steps)
    records = as_records(rows)
    total = runs * args.steps
    print(
        f"{runs} runs x {args.steps} steps = {total} rows, batches of {batch} rows, "
        f"median of {repeats}"
    )

    out: dict[str, object] = {"runs": runs, "steps": args.steps, "rows": total, "batch_rows": batch}
    try:
        pg = bench_postgres(rows, records, batch, repeats)
    except Exception as exc:
        print(f"postgres: skipped ({type(exc).__name__}: {str(exc).splitlines()[0]})")
        pg = None
    if pg:
        ratio = pg["store"] / pg["copy_binary"]
        print(f"postgres  store write_metrics     {pg['store']:>10,.0f} rows/s")
        print(f"postgres  store write_metric_rows {pg['store_rows']:>10,.0f} rows/s")
        print(f"postgres  raw COPY binary         {pg['copy_binary']:>10,.0f} rows/s")
        print(f"postgres  raw COPY text           {pg['copy_text']:>10,.0f} rows/s")
        print(f"postgres  ratio store / raw COPY binary = {ratio:.2f}")
        out |= {
            "postgres_store_rows_per_s": round(pg["store"]),
            "postgres_store_tuple_rows_per_s": round(pg["store_rows"]),
            "postgres_copy_rows_per_s": round(pg["copy_binary"]),
            "postgres_copy_text_rows_per_s": round(pg["copy_text"]),
            "postgres_ratio_vs_copy": round(ratio, 3),
        }
    else:
        out |= {"postgres_ratio_vs_copy": None}
    lite = bench_sqlite(rows, records, batch, repeats)
    ratio = lite["store"] / lite["executemany"]
    print(f"sqlite    store write_metrics     {lite['store']:>10,.0f} rows/s")
    print(f"sqlite    store write_metric_rows {lite['store_rows']:>10,.0f} rows/s")
    print(f"sqlite    raw executemany         {lite['executemany']:>10,.0f} rows/s")
    print(f"sqlite    ratio store / raw executemany = {ratio:.2f}")
    out |= {
        "sqlite_store_rows_per_s": round(lite["store"]),
        "sqlite_store_tuple_rows_per_s": round(lite["store_rows"]),
        "sqlite_executemany_rows_per_s": round(lite["executemany"]),
        "sqlite_ratio_vs_executemany": round(ratio, 3),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
