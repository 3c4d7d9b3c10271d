"""Metric ingest, artifacts and datasets, on SQLite and PostgreSQL."""

from __future__ import annotations

import hashlib
import io
import math
from collections.abc import Callable

import numpy as np
import pytest
from sqlalchemy import Engine, text, update
from sqlalchemy.orm import Session

from engine.metrics import METRICS, RECORD_FIELDS
from service.exceptions import NotFoundError, StoreError
from service.store import (
    METRIC_COLUMNS,
    Run,
    RunStatus,
    load_artifact,
    load_dataset_bytes,
    save_artifact,
    store_dataset,
    write_metric_rows,
    write_metrics,
)

AddRuns = Callable[..., list[int]]


def stored(engine: Engine, run_id: int | None = None) -> list[tuple]:
    where = "" if run_id is None else f"WHERE run_id = {int(run_id)}"
    with engine.connect() as conn:
        sql = f"SELECT {', '.join(METRIC_COLUMNS)} FROM metrics {where} ORDER BY run_id, step"
        return [tuple(row) for row in conn.execute(text(sql))]


def full_record(step: int, base: float) -> dict[str, float | int]:
    return {"step": step, **{name: base + i / 7 for i, name in enumerate(METRICS)}}


def npz(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def test_records_round_trip_exactly_and_missing_fields_are_null(
    store_engine: Engine, add_runs: AddRuns
) -> None:
    (run,) = add_runs(store_engine, 1)
    records = [full_record(0, 0.1), {"step": 1, "train_loss": 0.5, "val_accuracy": 1 / 3}]
    write_metrics(store_engine, run, records)
    rows = stored(store_engine, run)
    assert rows[0] == (run, *(full_record(0, 0.1)[f] for f in RECORD_FIELDS))
    expected = dict.fromkeys(METRIC_COLUMNS) | {"run_id": run, **records[1]}
    assert rows[1] == tuple(expected[c] for c in METRIC_COLUMNS)


def test_a_step_sent_again_keeps_its_first_value_and_new_steps_are_added(
    store_engine: Engine, add_runs: AddRuns
) -> None:
    (run,) = add_runs(store_engine, 1)
    write_metrics(store_engine, run, [{"step": s, "train_loss": float(s)} for s in range(5)])
    # A redelivered run resends steps 3..4 with other values and goes on to 5..7.
    write_metrics(store_engine, run, [{"step": s, "train_loss": -1.0} for s in range(3, 8)])
    assert [(r[1], r[2]) for r in stored(store_engine, run)] == [
        (0, 0.0),
        (1, 1.0),
        (2, 2.0),
        (3, 3.0),
        (4, 4.0),
        (5, -1.0),
        (6, -1.0),
        (7, -1.0),
    ]


def test_a_step_twice_in_one_batch_is_stored_once_with_the_first_value(
    store_engine: Engine, add_runs: AddRuns
) -> None:
    (run,) = add_runs(store_engine, 1)
    write_metrics(store_engine, run, [{"step": 0, "train_loss": 1.0}])
    batch = [{"step": 1, "train_loss": 2.0}, {"step": 0, "train_loss": 9.0}]
    batch += [{"step": 1, "train_loss": 8.0}]
    write_metrics(store_engine, run, batch)
    assert [(r[1], r[2]) for r in stored(store_engine, run)] == [(0, 1.0), (1, 2.0)]


def test_metric_rows_of_many_runs_go_in_one_call(store_engine: Engine, add_runs: AddRuns) -> None:
    runs = add_runs(store_engine, 3)
    width = len(METRICS)
    rows = [(run, step, *([step / 10] * width)) for run in runs for step in range(4)]
    write_metric_rows(store_engine, rows)
    write_metric_rows(store_engine, [list(rows[0])])  # lists work too; a repeat changes nothing
    assert stored(store_engine) == rows


def test_metrics_join_the_callers_transaction(store_engine: Engine, add_runs: AddRuns) -> None:
    run, other = add_runs(store_engine, 2)
    with Session(store_engine) as session:
        write_metrics(session, run, [{"step": 0, "train_loss": 1.0}])
        session.execute(update(Run).where(Run.id == run).values(status=RunStatus.succeeded))
        session.rollback()
    assert stored(store_engine, run) == []
    with Session(store_engine) as session:
        write_metrics(session, other, [{"step": 0, "train_loss": 1.0}])
        session.execute(update(Run).where(Run.id == other).values(status=RunStatus.succeeded))
        # Before commit another connection sees neither the rows nor the status.
        session.commit()
    assert len(stored(store_engine, other)) == 1
    with store_engine.connect() as conn:
        status = conn.execute(text("SELECT status FROM runs WHERE id = :i"), {"i": other}).scalar()
    assert status == "succeeded"


def test_unknown_run_is_a_store_error_and_the_callers_transaction_goes_on(
    store_engine: Engine, add_runs: AddRuns
) -> None:
    (run,) = add_runs(store_engine, 1)
    with store_engine.connect() as conn:
        write_metrics(conn, run, [{"step": 0, "train_loss": 1.0}])
        with pytest.raises(StoreError, match=r"metrics: no run with id in \[987654\]"):
            write_metric_rows(conn, [(987654, 0, *([None] * len(METRICS)))])
        with pytest.raises(StoreError):
            write_metrics(conn, 987654, [{"step": 0}, {"step": 1}])
        write_metrics(conn, run, [{"step": 1, "train_loss": 0.5}])
        conn.commit()
    assert [r[1] for r in stored(store_engine)] == [0, 1]


def test_bad_records_are_refused_before_anything_is_written(
    store_engine: Engine, add_runs: AddRuns
) -> None:
    (run,) = add_runs(store_engine, 1)
    good = {"step": 0, "train_loss": 1.0}
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['trian_loss'\]"):
        write_metrics(store_engine, run, [good, {"step": 1, "trian_loss": 1.0}])
    with pytest.raises(ValueError, match="has no 'step'"):
        write_metrics(store_engine, run, [good, {"train_loss": 1.0}])
    with pytest.raises(ValueError, match="a row has 3 values"):
        write_metric_rows(store_engine, [(run, 0, 1.0)])
    assert stored(store_engine) == []


def test_numpy_scalars_and_infinities_are_stored_as_floats(
    store_engine: Engine, add_runs: AddRuns
) -> None:
    (run,) = add_runs(store_engine, 1)
    record = {
        "step": np.int64(3),
        "train_loss": np.float32(0.5),
        "val_loss": np.float64(0.25),
        "grad_norm": math.inf,
    }
    write_metrics(store_engine, run, [record])
    (row,) = stored(store_engine, run)
    assert row[:4] == (run, 3, 0.5, 0.25)
    assert row[METRIC_COLUMNS.index("grad_norm")] == math.inf


def test_deleting_a_run_deletes_its_metrics_and_artifacts(
    store_engine: Engine, add_runs: AddRuns
) -> None:
    run, kept = add_runs(store_engine, 2)
    for r in (run, kept):
        write_metrics(store_engine, r, [{"step": 0}, {"step": 1}])
        save_artifact(store_engine, r, "weights", npz(W0=np.ones((2, 2))))
    with store_engine.begin() as conn:
        conn.execute(text("DELETE FROM runs WHERE id = :i"), {"i": run})
    assert {r[0] for r in stored(store_engine)} == {kept}
    assert load_artifact(store_engine, run, "weights") is None
    assert load_artifact(store_engine, kept, "weights") is not None


def test_artifacts_keep_one_weights_and_the_latest_checkpoint_per_run(
    store_engine: Engine, add_runs: AddRuns
) -> None:
    (run,) = add_runs(store_engine, 1)
    first = npz(W0=np.zeros((4, 3)), b0=np.zeros(3))
    latest = npz(W0=np.ones((4, 3)), b0=np.ones(3), step=np.array(7))
    weights = npz(W0=np.full((4, 3), 2.0), b0=np.zeros(3))
    save_artifact(store_engine, run, "checkpoint", first, step=3)
    save_artifact(store_engine, run, "checkpoint", latest, step=7)
    save_artifact(store_engine, run, "weights", weights)
    checkpoint = load_artifact(store_engine, run, "checkpoint")
    assert checkpoint is not None
    assert (checkpoint.step, checkpoint.data, checkpoint.size) == (7, latest, len(latest))
    assert checkpoint.shapes == {"W0": [4, 3], "b0": [3], "step": []}
    stored_weights = load_artifact(store_engine, run, "weights")
    assert stored_weights is not None and stored_weights.data == weights
    with np.load(io.BytesIO(stored_weights.data), allow_pickle=False) as arrays:
        assert arrays["W0"][0, 0] == 2.0
    with store_engine.connect() as conn:
        count = conn.execute(text("SELECT count(*) FROM artifacts")).scalar_one()
    assert count == 2


def test_artifacts_refuse_pickles_and_non_npz_bytes(
    store_engine: Engine, add_runs: AddRuns
) -> None:
    (run,) = add_runs(store_engine, 1)
    pickled = npz(obj=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError, match="artifact: expected npz bytes without pickled objects"):
        save_artifact(store_engine, run, "weights", pickled)
    with pytest.raises(ValueError, match="artifact: expected npz bytes"):
        save_artifact(store_engine, run, "checkpoint", b"not an npz")
    with pytest.raises(ValueError):
        save_artifact(store_engine, run, "model", npz(W0=np.zeros(1)))
    assert load_artifact(store_engine, run, "weights") is None
    assert load_artifact(store_engine, run, "checkpoint") is None


def test_datasets_are_stored_once_by_content_hash(store_engine: Engine) -> None:
    data = b"x1,x2,y\n0.5,1.5,0\n1.0,2.0,1\n"
    digest = store_dataset(store_engine, "train.csv", data)
    assert digest == hashlib.sha256(data).hexdigest()
    assert store_dataset(store_engine, "copy-of-train.csv", data) == digest
    assert load_dataset_bytes(store_engine, digest) == data
    with store_engine.connect() as conn:
        rows = conn.execute(text("SELECT name, size FROM datasets")).all()
    assert [tuple(r) for r in rows] == [("train.csv", len(data))]
    with pytest.raises(NotFoundError, match="no dataset with sha256 " + "0" * 64):
        load_dataset_bytes(store_engine, "0" * 64)


def test_metric_arrays_for_postgresql_refuse_a_float_step_and_leave_absent_metrics_null() -> None:
    from service.store.pg_ingest import PgFloat8Array, PgInt4Array, pg_metric_arrays

    arrays = pg_metric_arrays(1, [{"step": 1, "train_loss": 0.5}, {"step": 2, "val_loss": 0.25}])
    by_field = dict(zip(RECORD_FIELDS, arrays, strict=True))
    assert isinstance(by_field["step"], PgInt4Array)
    assert isinstance(by_field["train_loss"], PgFloat8Array)  # NULL at step 2
    assert isinstance(by_field["val_loss"], PgFloat8Array)
    assert {name for name, a in by_field.items() if a is None} == set(METRICS) - {
        "train_loss",
        "val_loss",
    }
    with pytest.raises(TypeError):
        pg_metric_arrays(1, [{"step": 3.7, "train_loss": 0.5}])
