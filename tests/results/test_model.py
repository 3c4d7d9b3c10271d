"""``mlpq weights`` and ``mlpq predict``: a stored run's model reproduces its stored scores."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import Engine, insert

from engine.datasets import load_dataset
from engine.model import Model
from service.store import Experiment, Run, RunStatus

RUNS: dict[str, dict[str, Any]] = {
    "binary": {"dataset": "moons", "optimizer": "backprop", "hidden": [8], "max_steps": 15,
               "learning_rate": 0.1, "activation": "tanh", "seed": 3},
    "multiclass": {"dataset": "iris", "optimizer": "random_walk", "hidden": [6], "max_steps": 40,
                   "step_size": 0.1, "seed": 1, "dtype": "float32"},
    "regression": {"dataset": "sine", "optimizer": "backprop", "hidden": [16, 8],
                   "max_steps": 20, "learning_rate": 0.05, "batch_size": 32, "seed": 2},
}  # fmt: skip


def _train(engine: Engine, store_url: str, tmp_path: Path, configs: list[dict]) -> list[int]:
    """Insert ``configs`` as queued runs and train each in this process; their ids."""
    from engine.config import TrainConfig
    from service.settings import load_settings
    from worker.training import execute_run

    with engine.begin() as conn:
        exp_id = conn.execute(
            insert(Experiment).values(name="models", spec={}).returning(Experiment.id)
        ).scalar_one()
        ids = []
        for given in configs:
            cfg = TrainConfig.from_dict(given).to_dict()
            ids.append(
                conn.execute(
                    insert(Run)
                    .values(
                        experiment_id=exp_id, config=cfg, status=RunStatus.queued,
                        config_hash=hashlib.sha256(json.dumps(cfg).encode()).hexdigest(),
                        optimizer=cfg["optimizer"], dataset=cfg["dataset"],
                        hidden="x".join(map(str, cfg["hidden"])), activation=cfg["activation"],
                        seed=cfg["seed"], max_steps=cfg["max_steps"], published=False,
                        attempt=0, cancel_requested=False,
                    )
                    .returning(Run.id)
                ).scalar_one()
            )  # fmt: skip
    settings = load_settings(database_url=store_url, home=tmp_path / "home")
    for run_id in ids:
        assert execute_run(run_id=run_id, settings=settings, worker="t:1").status == "succeeded"
    return ids


def _validation_rows(config: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, Any]:
    """The run's validation split in the dataset's own units (inputs and labels or values)."""
    data = load_dataset(
        config["dataset"], seed=config["seed"], val_fraction=config.get("val_fraction", 0.2)
    )
    X = data.X_val.astype(np.float64) * data.x_scale + data.x_mean
    if data.task == "regression":
        return X, data.y_mean + data.y_scale * data.y_val, data
    return X, np.asarray(data.classes, dtype=object)[data.y_val], data


def test_stored_model_predicts_its_stored_validation_scores(
    store_engine: Engine, store_url: str, tmp_path: Path
) -> None:
    from service.results.runs import run_weights

    ids = _train(store_engine, store_url, tmp_path, list(RUNS.values()))
    for run_id, (task, config) in zip(ids, RUNS.items(), strict=True):
        with store_engine.connect() as conn:
            stored = conn.execute(
                Run.__table__.select().where(Run.id == run_id)
            ).one()._mapping  # fmt: skip
        model = Model.from_npz(run_weights(store_engine, run_id))
        assert model.task == task
        X, truth, data = _validation_rows(config)
        assert model.feature_names == list(data.feature_names)
        predicted = model.predict(X)
        if task == "regression":
            r2 = 1 - np.sum((predicted - truth) ** 2) / np.sum((truth - truth.mean()) ** 2)
            assert r2 == pytest.approx(stored["final_val_r2"], rel=1e-6), task
        else:
            accuracy = float(np.mean(predicted == truth))
            assert accuracy == stored["final_val_accuracy"], task
            assert set(predicted) <= set(data.classes)
            proba = model.probabilities(X)
            assert proba.shape == (len(X), len(data.classes))
            np.testing.assert_allclose(proba.sum(axis=1), 1, rtol=1e-5)


def _mlpq(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "from cli.main import main; main()", *args],
        capture_output=True, text=True, cwd=cwd, env=dict(os.environ, COLUMNS="100"), timeout=120,
    )  # fmt: skip


def test_weights_and_predict_commands(store_env: str, store_engine: Engine, tmp_path: Path) -> None:
    (run_id,) = _train(store_engine, store_env, tmp_path, [RUNS["binary"]])
    done = _mlpq("weights", str(run_id), "-o", "model.npz", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    with np.load(tmp_path / "model.npz", allow_pickle=False) as z:
        assert {"W0", "b0", "W1", "b1", "x_mean", "x_scale", "config", "meta"} <= set(z.files)
        assert z["W0"].shape == (2, 8) and z["W1"].shape == (8, 1)
        assert json.loads(str(z["config"]))["learning_rate"] == 0.1

    X, truth, data = _validation_rows(RUNS["binary"])
    with open(tmp_path / "val.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["label", *data.feature_names])  # features need not come first
        writer.writerows([t, *map(repr, x.tolist())] for x, t in zip(X, truth, strict=True))
    done = _mlpq(
        "predict", str(run_id), "val.csv", "--target", "label", "-o", "p.csv", cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    with store_engine.connect() as conn:
        stored = conn.execute(
            Run.__table__.select().where(Run.id == run_id)
        ).one()._mapping  # fmt: skip
    assert f"accuracy {stored['final_val_accuracy']:.6g} against column 'label'" in done.stderr
    with open(tmp_path / "p.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(X)
    assert (
        np.mean([r["prediction"] == str(t) for r, t in zip(rows, truth, strict=True)])
        == (stored["final_val_accuracy"])
    )
    # to standard output, with probabilities
    done = _mlpq("predict", str(run_id), "val.csv", "--proba", cwd=tmp_path)
    header, first = done.stdout.splitlines()[:2]
    assert header == "prediction,p_0,p_1"
    assert float(first.split(",")[1]) + float(first.split(",")[2]) == pytest.approx(1)


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["weights", "999"], "no run with id 999"),
        (["predict", "999", "val.csv"], "no run with id 999"),
        (["predict", "{run}", "missing.csv"], "missing.csv: cannot read"),
        (["predict", "{run}", "bad.csv"], "lacks the model's feature column(s) x1"),
        (["predict", "{run}", "text.csv"], "line 3, column 'x1': not a finite number: 'abc'"),
        (["predict", "{run}", "val.csv", "--target", "nope"], "has no column 'nope'"),
        (["weights", "{run}", "-o", "nodir/model.npz"], "no directory"),
        (["weights", "{queued}"], "no final weights (status queued)"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    sqlite_store_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args, says
) -> None:
    from service.store import make_engine

    monkeypatch.setenv("MLPQ_DATABASE_URL", sqlite_store_url)
    engine = make_engine(sqlite_store_url)
    (run_id,) = _train(engine, sqlite_store_url, tmp_path, [RUNS["binary"]])
    with engine.begin() as conn:
        conn.execute(Run.__table__.update().where(Run.id == run_id).values(seed=0))
        queued = conn.execute(
            insert(Run).values(
                experiment_id=1, config={}, config_hash="1" * 64, optimizer="backprop",
                dataset="moons", hidden="8", activation="relu", seed=9, max_steps=1,
                status=RunStatus.queued, published=False, attempt=0, cancel_requested=False,
            ).returning(Run.id)
        ).scalar_one()  # fmt: skip
    engine.dispose()
    (tmp_path / "val.csv").write_text("x0,x1\n0.5,0.25\n")
    (tmp_path / "bad.csv").write_text("x0,y\n0.5,1\n")
    (tmp_path / "text.csv").write_text("x0,x1\n0.5,1\n0.5,abc\n")
    argv = [a.format(run=run_id, queued=queued) for a in args]
    done = _mlpq(*argv, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert says in done.stderr
    assert not list(tmp_path.glob("**/*.part")) and not (tmp_path / "model.npz").exists()
