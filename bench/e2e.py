"""End to end: a grid from the prompt to the prompt, `mlpq run` against a joblib loop.

The same grid is trained and recorded twice in one invocation, each from a fresh
directory:

(a) ``mlpq run grid.yaml --concurrency 2``, embedded mode (SQLite store, filesystem
    queue, two local worker processes): per-epoch metrics and final weights in SQL;
(b) what a researcher writes without us: a joblib loop with 2 processes around
    scikit-learn's ``MLPClassifier.partial_fit``, one epoch per call, recording per
    epoch the train loss, validation loss and validation accuracy, and the final
    weights, into an SQLite file. It runs as its own command (this file with
    ``--joblib-loop``), as a researcher runs their script, and is timed the same way
    as (a): from the prompt to the prompt. The loop's own time inside that process
    (from before ``Parallel`` to the commit: no interpreter start, no imports in the
    parent) is printed beside it, with the ratio against it.

Both split the data 80/20 and standardize on the training split (moons: 400 samples
with noise 0.1 on both sides, as mlpq generates them); both use plain SGD
(no momentum, no L2) at the grid's learning rates. Two grids: digits (hidden [32],
[64], [64, 32]; learning rates 0.1 and 0.03; 4 seeds; 30 epochs; batch 32; relu)
and a tiny one (moons, hidden 16, 4 learning rates, 25 seeds, 20 full-batch
epochs). For each: the wall seconds of (a) and (b), their ratio, and the mean best
validation accuracy of each (the comparison is fair only if these are close).

With ``--broker``, (a) is run a second time against Redis and PostgreSQL (a Redis db
and a PostgreSQL schema of the benchmark's own), and for both modes the start and
stop cost is printed: the command's wall time minus the training's own (first
claim to last finish, from the store).

mlpq's own modules are byte-compiled first, as an install compiles them (and
scikit-learn's). The last line is JSON (``speedup_digits``, ``speedup_tiny``, ...). ``--quick``
trains smaller grids in under a minute.

    python bench/e2e.py [--quick] [--broker]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
MLPQ = [sys.executable, "-c", "import sys; from cli.launch import entry; sys.exit(entry())"]
PG_URL = os.environ.get("MLPQ_BENCH_PG_URL", "postgresql+psycopg://root@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("MLPQ_BENCH_REDIS_URL", "redis://127.0.0.1:6379/14")


def grids(quick: bool) -> dict[str, dict[str, Any]]:
    if quick:
        digits = {"hidden": [[32], [64]], "lr": [0.1], "seeds": 2, "epochs": 10}
        tiny = {"hidden": [[16]], "lr": [0.3, 0.1], "seeds": 6, "epochs": 20}
    else:
        digits = {"hidden": [[32], [64], [64, 32]], "lr": [0.1, 0.03], "seeds": 4, "epochs": 30}
        tiny = {"hidden": [[16]], "lr": [1.0, 0.3, 0.1, 0.03], "seeds": 25, "epochs": 20}
    digits.update(dataset="digits", batch_size=32)
    tiny.update(dataset="moons", batch_size=None)  # full batch
    return {"digits": digits, "tiny": tiny}


def grid_yaml(name: str, g: dict[str, Any]) -> str:
    block = {"optimizer": "backprop", "learning_rate": g["lr"]}
    if g["batch_size"] is not None:
        block["batch_size"] = g["batch_size"]
    spec = {
        "name": name,
        "datasets": [g["dataset"]],
        "model": {"hidden": g["hidden"], "activation": "relu"},
        "seeds": g["seeds"],
        "budget": {"epochs": g["epochs"]},
        "optimizers": [block],
    }
    return json.dumps(spec)


def configs(g: dict[str, Any]) -> list[tuple[tuple[int, ...], float, int]]:
    return [(tuple(h), lr, s) for h in g["hidden"] for lr in g["lr"] for s in range(g["seeds"])]


def timed_command(
    what: str, argv: list[str], env: dict[str, str], cwd: Path | None = None
) -> tuple[subprocess.CompletedProcess[str], float]:
    """Run ``argv`` as a command of its own: its result and wall seconds, prompt to prompt."""
    start = time.perf_counter()
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{what} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return proc, wall


# -- (a) mlpq run ---------------------------------------------------------------------------


def run_mlpq(name: str, g: dict[str, Any], env: dict[str, str]) -> dict[str, float]:
    work = Path(tempfile.mkdtemp(prefix="mlpq-e2e-"))
    try:
        (work / "grid.json").write_text(grid_yaml(name, g))
        _, wall = timed_command(
            "mlpq run", [*MLPQ, "run", "grid.json", "--concurrency", "2"], env, work
        )
        from sqlalchemy import create_engine, text

        url = env.get("MLPQ_DATABASE_URL") or f"sqlite:///{work / '.mlpq' / 'mlpq.db'}"
        engine = create_engine(url)
        with engine.connect() as conn:
            row = conn.execute(
                text(
                    "SELECT avg(r.best_val_accuracy), count(*), "
                    "(SELECT count(*) FROM metrics m JOIN runs q ON q.id = m.run_id "
                    " JOIN experiments e2 ON e2.id = q.experiment_id WHERE e2.name = :n), "
                    "min(r.started_at), max(r.finished_at) "
                    "FROM runs r JOIN experiments e ON e.id = r.experiment_id WHERE e.name = :n"
                ),
                {"n": name},
            ).one()
        engine.dispose()
        acc, runs, rows, first, last = row
        training = _seconds(last) - _seconds(first)
        return {"wall": wall, "acc": float(acc), "runs": runs, "rows": rows, "train": training}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _seconds(value: Any) -> float:
    if isinstance(value, str):
        from datetime import datetime

        value = datetime.fromisoformat(value)
    return value.timestamp()


# -- (b) the joblib loop ------------------------------------------------------------------


def _train_one(
    dataset: str, hidden: tuple[int, ...], lr: float, seed: int, epochs: int, batch: int | None
) -> tuple[list[tuple[int, float, float, float]], bytes]:
    """What a researcher writes: sklearn's data, split, scaler and MLP, one epoch a call."""
    import warnings

    from sklearn.datasets import load_digits, make_moons
    from sklearn.metrics import log_loss
    from sklearn.model_selection import train_test_split
    from sklearn.neural_network import MLPClassifier
    from sklearn.preprocessing import StandardScaler

    if dataset == "digits":
        X, y = load_digits(return_X_y=True)
    else:
        # The moons mlpq generates: 400 samples, noise 0.1 (engine/datasets.py).
        X, y = make_moons(n_samples=400, noise=0.1, random_state=seed)
    X_tr, X_val, y_tr, y_val = train_test_split(X, y, test_size=0.2, random_state=seed)
    scaler = StandardScaler().fit(X_tr)
    X_tr, X_val = scaler.transform(X_tr), scaler.transform(X_val)
    clf = MLPClassifier(
        hidden_layer_sizes=hidden,
        activation="relu",
        solver="sgd",
        learning_rate_init=lr,
        momentum=0.0,
        alpha=0.0,
        batch_size=len(X_tr) if batch is None else batch,
        random_state=seed,
    )
    classes = np.unique(y)
    rows = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for epoch in range(1, epochs + 1):
            clf.partial_fit(X_tr, y_tr, classes=classes)
            proba = clf.predict_proba(X_val)
            val_loss = log_loss(y_val, proba, labels=classes)
            val_acc = float((classes[proba.argmax(axis=1)] == y_val).mean())
            rows.append((epoch, float(clf.loss_), float(val_loss), val_acc))
    buf = io.BytesIO()
    arrays = {f"W{i}": w for i, w in enumerate(clf.coefs_)}
    arrays.update({f"b{i}": b for i, b in enumerate(clf.intercepts_)})
    np.savez(buf, **arrays)
    return rows, buf.getvalue()


def run_joblib(g: dict[str, Any], env: dict[str, str]) -> dict[str, float]:
    """The joblib loop as its own command, timed from the prompt to the prompt."""
    argv = [sys.executable, str(Path(__file__).resolve()), "--joblib-loop", json.dumps(g)]
    proc, wall = timed_command("joblib loop", argv, env)
    inside = json.loads(proc.stdout.strip().splitlines()[-1])
    return {**inside, "loop": inside["wall"], "wall": wall}


def joblib_loop(g: dict[str, Any]) -> dict[str, float]:
    """The loop itself (in the process of ``--joblib-loop``); its wall time from inside."""
    from joblib import Parallel, delayed

    work = Path(tempfile.mkdtemp(prefix="joblib-e2e-"))
    try:
        start = time.perf_counter()
        jobs = configs(g)
        results = Parallel(n_jobs=2)(
            delayed(_train_one)(g["dataset"], h, lr, s, g["epochs"], g["batch_size"])
            for h, lr, s in jobs
        )
        db = sqlite3.connect(work / "results.db")
        db.execute(
            "CREATE TABLE runs (id INTEGER PRIMARY KEY, hidden TEXT, lr REAL, seed INT, "
            "weights BLOB)"
        )
        db.execute(
            "CREATE TABLE metrics (run_id INT, epoch INT, train_loss REAL, val_loss REAL, "
            "val_accuracy REAL, PRIMARY KEY (run_id, epoch))"
        )
        best = []
        for run_id, ((h, lr, s), (rows, weights)) in enumerate(zip(jobs, results, strict=True)):
            db.execute("INSERT INTO runs VALUES (?, ?, ?, ?, ?)", (run_id, str(h), lr, s, weights))
            db.executemany(
                "INSERT INTO metrics VALUES (?, ?, ?, ?, ?)", [(run_id, *r) for r in rows]
            )
            best.append(max(r[3] for r in rows))
        db.commit()
        db.close()
        wall = time.perf_counter() - start
        return {"wall": wall, "acc": float(np.mean(best)), "runs": len(jobs)}
    finally:
        shutil.rmtree(work, ignore_errors=True)


# -- the broker variant ---------------------------------------------------------------------


def broker_env(base: dict[str, str]) -> tuple[dict[str, str], Any]:
    """Env for mlpq on Redis + a PostgreSQL schema of the bench's own; and a cleanup."""
    import redis
    from sqlalchemy import create_engine
    from sqlalchemy.engine import make_url

    schema = f"mlpq_e2e_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG_URL)
    with admin.begin() as conn:
        conn.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
    url = make_url(PG_URL).update_query_dict({"options": f"-csearch_path={schema}"})
    env = {
        **base,
        "MLPQ_DATABASE_URL": url.render_as_string(hide_password=False),
        "MLPQ_BROKER_URL": REDIS_URL,
    }
    subprocess.run([*MLPQ, "db", "upgrade"], env=env, check=True, capture_output=True)
    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()

    def cleanup() -> None:
        client.flushdb()
        with admin.begin() as conn:
            conn.exec_driver_sql(f'DROP SCHEMA "{schema}" CASCADE')
        admin.dispose()

    return env, cleanup


def compile_sources() -> None:
    """Byte-compile mlpq's packages, as installing them does.

    pip compiles what it installs (scikit-learn and joblib here); a source checkout
    run with PYTHONDONTWRITEBYTECODE set would instead compile mlpq's modules again in
    every process of every command.
    """
    import compileall

    for package in ("cli", "engine", "migrations", "service", "worker"):
        compileall.compile_dir(ROOT / package, quiet=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller grids, under a minute")
    parser.add_argument("--broker", action="store_true", help="also time mlpq on Redis+PG")
    parser.add_argument("--joblib-loop", metavar="GRID", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.joblib_loop:  # the reference, as its own command (run_joblib)
        print(json.dumps(joblib_loop(json.loads(args.joblib_loop))))
        return

    compile_sources()
    base = {k: v for k, v in os.environ.items() if not k.startswith("MLPQ_")}
    base["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), base.get("PYTHONPATH")]))
    out: dict[str, Any] = {"quick": args.quick}
    print(
        f"{'grid':<8} {'runs':>5} {'mlpq s':>8} {'joblib s':>9} {'speedup':>8} "
        f"{'mlpq acc':>9} {'joblib acc':>11} {'start+stop s':>13} {'loop s':>7} {'vs loop':>8}"
    )
    for name, g in grids(args.quick).items():
        ours = run_mlpq(f"e2e-{name}", g, base)
        theirs = run_joblib(g, base)
        speedup = theirs["wall"] / ours["wall"]
        vs_loop = theirs["loop"] / ours["wall"]
        overhead = ours["wall"] - ours["train"]
        print(
            f"{name:<8} {ours['runs']:>5} {ours['wall']:>8.2f} {theirs['wall']:>9.2f} "
            f"{speedup:>7.2f}x {ours['acc']:>9.3f} {theirs['acc']:>11.3f} {overhead:>13.2f} "
            f"{theirs['loop']:>7.2f} {vs_loop:>7.2f}x"
        )
        out[f"speedup_{name}"] = round(speedup, 2)
        out[f"speedup_vs_loop_{name}"] = round(vs_loop, 2)
        out[f"mlpq_seconds_{name}"] = round(ours["wall"], 3)
        out[f"joblib_seconds_{name}"] = round(theirs["wall"], 3)
        out[f"joblib_loop_seconds_{name}"] = round(theirs["loop"], 3)
        out[f"mlpq_acc_{name}"] = round(ours["acc"], 4)
        out[f"joblib_acc_{name}"] = round(theirs["acc"], 4)
        out[f"start_stop_seconds_{name}"] = round(overhead, 3)
        if args.broker:
            env, cleanup = broker_env(base)
            try:
                remote = run_mlpq(f"e2e-{name}-broker", g, env)
            finally:
                cleanup()
            extra = remote["wall"] - remote["train"]
            print(
                f"{name + '+rp':<8} {remote['runs']:>5} {remote['wall']:>8.2f} {'':>9} "
                f"{theirs['wall'] / remote['wall']:>7.2f}x {remote['acc']:>9.3f} {'':>11} "
                f"{extra:>13.2f}"
            )
            out[f"broker_seconds_{name}"] = round(remote["wall"], 3)
            out[f"broker_start_stop_seconds_{name}"] = round(extra, 3)
    print(
        "(+rp: mlpq on Redis and PostgreSQL; start+stop: wall time minus first claim to "
        "last finish; both commands timed from the prompt to the prompt; loop s: the joblib "
        "loop timed inside its process, without the interpreter's start and the imports)"
    )
    print(json.dumps(out))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
