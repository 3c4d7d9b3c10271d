"""`mlpq export` on both stores: every format holds exactly what SQL returns, non-finite values
are written in each format's way, bad requests are one line and exit 2, a failure leaves no
file, and memory does not grow with the rows."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import math
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, text

from engine.metrics import METRICS

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

Export = Callable[..., tuple[int, str, str]]
TIME_COLUMNS = ("created_at", "started_at", "finished_at")
METRIC_COLUMNS = ("run_id", "step", *METRICS)
MLPQ = str(Path(sys.executable).with_name("mlpq"))


@pytest.fixture
def mlpq_export(
    store_env: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Export:
    """``mlpq export ARGS...`` through the real entry point, in this process: (code, out, err)."""
    from cli.main import main

    monkeypatch.delenv("MLPQ_READ_DATABASE_URL", raising=False)

    def run(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        monkeypatch.setattr(sys, "argv", ["mlpq", "export", *args])
        try:
            main()
            code = 0
        except SystemExit as exc:
            code = int(exc.code or 0)
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.fixture
def out_dir(tmp_path: Path) -> Path:
    """A folder for the exported files alone (the SQLite store lives in tmp_path too)."""
    path = tmp_path / "out"
    path.mkdir()
    return path


@pytest.fixture
def filled(store_engine: Engine, add_runs: Callable[..., list[int]]) -> Engine:
    """Experiment ``exp``: a succeeded run, a diverged one (NaN and infinite losses), a queued
    one; experiment ``other`` with metrics of its own that no export of ``exp`` may hold."""
    from service.store import metrics

    ok, diverged, _queued = add_runs(store_engine, 3, experiment="exp")
    (other,) = add_runs(store_engine, 1, experiment="other")
    start = dt.datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=dt.UTC)
    with store_engine.begin() as conn:
        conn.execute(
            text(
                "UPDATE runs SET status = 'succeeded', best_val_loss = 0.25, "
                "best_val_accuracy = 0.9, learning_rate = 0.1, started_at = :s, "
                "finished_at = :f, worker = 'w1@host', stop_reason = 'max_steps' WHERE id = :id"
            ),
            {"id": ok, "s": start, "f": start + dt.timedelta(seconds=3)},
        )
        conn.execute(
            text(
                "UPDATE runs SET status = 'diverged', final_val_loss = :nan, best_val_loss = :inf, "
                "final_train_loss = :ninf, started_at = :s WHERE id = :id"
            ),
            {"id": diverged, "nan": math.nan, "inf": math.inf, "ninf": -math.inf, "s": start},
        )
        rows = [
            {"run_id": ok, "step": s, "train_loss": 1.0 / (s + 1), "val_loss": 0.1 + s / 3,
             "val_accuracy": s / 7, "evaluations": float(s + 1), "elapsed": 0.001 * s,
             "grad_norm": 1e-300 * s, "learning_rate": 0.1}
            for s in range(5)
        ] + [
            {"run_id": diverged, "step": 0, "train_loss": 2.5, "val_loss": 1e20},
            {"run_id": diverged, "step": 1, "train_loss": math.inf, "val_loss": math.nan},
            {"run_id": diverged, "step": 2, "train_loss": -math.inf, "val_loss": None},
            {"run_id": other, "step": 0, "train_loss": 9.0},
        ]  # fmt: skip
        conn.execute(metrics.insert(), [{c: r.get(c) for c in METRIC_COLUMNS} for r in rows])
    return store_engine


def _expected(engine: Engine, what: str) -> tuple[list[str], list[tuple[Any, ...]]]:
    """Columns and rows of exp's run_summary / metrics, straight from SQL."""
    if what == "runs":
        sql = "SELECT * FROM run_summary WHERE experiment = 'exp' ORDER BY run_id"
    else:
        sql = (
            "SELECT m.* FROM metrics m JOIN runs r ON r.id = m.run_id "
            "JOIN experiments e ON e.id = r.experiment_id WHERE e.name = 'exp' "
            "ORDER BY m.run_id, m.step"
        )
    with engine.connect() as conn:
        result = conn.execute(text(sql))
        return list(result.keys()), [tuple(row) for row in result]


def _utc(value: Any) -> Any:
    if value is None:
        return None
    stamp = dt.datetime.fromisoformat(value) if isinstance(value, str) else value
    return stamp.replace(tzinfo=dt.UTC) if stamp.tzinfo is None else stamp.astimezone(dt.UTC)


def _same(expected: Any, got: Any, column: str, fmt: str) -> bool:
    """Whether ``got`` (read back from a ``fmt`` file) is the value SQL returned."""
    if fmt == "csv":  # CSV has text only: read it as the type SQL returned
        if got == "" or expected is None:
            return got == "" and expected is None
        got = type(expected)(got) if not isinstance(expected, str | dt.datetime) else got
    if column in TIME_COLUMNS:
        return _utc(expected) == _utc(got)
    if isinstance(expected, float) and math.isnan(expected):
        return isinstance(got, float) and math.isnan(got)
    if isinstance(expected, float) and fmt == "jsonl" and isinstance(got, int):
        return float(got) == expected  # JSON has one number type
    return type(expected) is type(got) and expected == got


def _read(path: Path, fmt: str, columns: list[str]) -> tuple[list[str], list[tuple[Any, ...]]]:
    """Header and rows of an exported file (CSV values as text)."""
    if fmt == "parquet":
        table = pq.read_table(path)
        return table.column_names, [tuple(r.values()) for r in table.to_pylist()]
    if fmt == "jsonl":
        records = [json.loads(line) for line in path.read_text().splitlines()]
        assert all(list(r) == columns for r in records)
        return columns, [tuple(r.values()) for r in records]
    reader = csv.reader(io.StringIO(path.read_text(), newline=""))
    header = next(reader)
    return header, [tuple(row) for row in reader]


@pytest.mark.parametrize("fmt", ["csv", "parquet", "jsonl"])
@pytest.mark.parametrize("what", ["runs", "metrics"])
def test_each_format_holds_exactly_the_rows_sql_returns(
    filled: Engine, mlpq_export: Export, out_dir: Path, what: str, fmt: str
) -> None:
    out = out_dir / f"{what}.{fmt}"
    code, stdout, err = mlpq_export("exp", "--what", what, "-o", str(out))  # format from suffix
    assert code == 0, err
    assert stdout == ""
    columns, rows = _expected(filled, what)
    assert err.startswith(f"{len(rows)} {'runs' if what == 'runs' else 'metric rows'} of exp ")
    header, got = _read(out, fmt, columns)
    assert header == columns
    assert len(got) == len(rows) == (3 if what == "runs" else 8)
    for want, have in zip(rows, got, strict=True):
        for column, a, b in zip(columns, want, have, strict=True):
            if fmt == "jsonl" and isinstance(a, float) and not math.isfinite(a):
                a = None  # JSON has no NaN or infinity
            assert _same(a, b, column, fmt), (column, a, b)
    assert [p.name for p in out_dir.iterdir() if p.name.startswith(".")] == []


def test_non_finite_values_are_spelled_as_each_format_allows(
    filled: Engine, mlpq_export: Export, out_dir: Path
) -> None:
    nan_kept = filled.dialect.name == "postgresql"  # SQLite stores NaN as NULL
    for what in ("metrics", "runs"):
        assert mlpq_export("exp", "--what", what, "-o", str(out_dir / f"{what}.csv"))[0] == 0
        assert mlpq_export("exp", "--what", what, "-o", str(out_dir / f"{what}.jsonl"))[0] == 0
    lines = (out_dir / "metrics.csv").read_text().splitlines()
    assert lines[-2].split(",")[2:4] == ["Infinity", "NaN" if nan_kept else ""]
    assert lines[-1].split(",")[2:4] == ["-Infinity", ""]
    runs = list(csv.DictReader((out_dir / "runs.csv").open(newline="")))
    assert (runs[1]["best_val_loss"], runs[1]["final_val_loss"]) == (
        "Infinity",
        "NaN" if nan_kept else "",
    )

    def not_json(constant: str) -> None:
        pytest.fail(f"{constant} is not JSON")

    for what in ("metrics", "runs"):
        for line in (out_dir / f"{what}.jsonl").read_text().splitlines():
            json.loads(line, parse_constant=not_json)
    record = json.loads((out_dir / "metrics.jsonl").read_text().splitlines()[-2])
    assert (record["train_loss"], record["val_loss"]) == (None, None)
    assert json.loads((out_dir / "runs.jsonl").read_text().splitlines()[0])["started_at"] == (
        "2024-05-01T12:00:00.123456+00:00"
    )


def test_stdout_gets_the_same_bytes_as_a_file(
    filled: Engine, store_env: str, out_dir: Path
) -> None:
    for fmt in ("csv", "jsonl"):
        file = out_dir / f"m.{fmt}"
        args = [MLPQ, "export", "exp", "--what", "metrics", "-f", fmt]
        to_file = subprocess.run([*args, "-o", str(file)], capture_output=True, timeout=60)
        assert to_file.returncode == 0, to_file.stderr
        to_stdout = subprocess.run([*args, "-o", "-"], capture_output=True, timeout=60)
        assert to_stdout.returncode == 0, to_stdout.stderr
        assert to_stdout.stdout == file.read_bytes()
        assert to_stdout.stderr == b""


def test_bad_requests_are_one_line_and_exit_2_and_write_nothing(
    filled: Engine, mlpq_export: Export, out_dir: Path
) -> None:
    a_file = out_dir / "plain"
    a_file.write_text("x")
    cases = {
        ("nope", "-o", str(out_dir / "a.csv")): "mlpq: experiment: no experiment named 'nope'",
        ("exp", "--what", "steps", "-o", str(out_dir / "a.csv")): "mlpq: --what: expected one",
        ("exp", "-f", "xlsx", "-o", str(out_dir / "a.csv")): "mlpq: --format: expected one",
        ("exp", "-f", "parquet", "-o", "-"): "mlpq: -o: Parquet cannot go to standard output",
        ("exp", "-o", str(out_dir / "missing" / "a.csv")): "mlpq: -o: no such directory",
        ("exp", "-o", str(out_dir)): "mlpq: -o: " + str(out_dir) + " is a directory",
        ("exp", "-o", str(a_file / "a.csv")): "mlpq: -o: no such directory",
    }
    for args, start in cases.items():
        code, out, err = mlpq_export(*args)
        assert code == 2, (args, err)
        assert len(err.splitlines()) == 1 and err.startswith(start), (args, err)
        assert out == ""
    assert sorted(p.name for p in out_dir.iterdir()) == ["plain"]


def test_an_unwritable_directory_is_one_line(
    filled: Engine, mlpq_export: Export, out_dir: Path
) -> None:
    if os.geteuid() == 0:  # root writes into any directory of a disk, not into sysfs
        locked = Path("/sys")
    else:
        locked = out_dir / "locked"
        locked.mkdir(mode=0o500)
    code, out, err = mlpq_export("exp", "-o", str(locked / "a.csv"))
    assert (code, out) == (2, "")
    assert err == f"mlpq: -o: cannot write in {locked}: Permission denied\n"


def test_without_pyarrow_parquet_says_how_to_install_it(
    filled: Engine, mlpq_export: Export, out_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    code, _, err = mlpq_export("exp", "-o", str(out_dir / "m.parquet"), "--what", "metrics")
    assert code == 2
    assert err == "mlpq: --format parquet: needs pyarrow, not installed here: " + (
        "pip install 'mlpq[parquet]'\n"
    )
    assert list(out_dir.iterdir()) == []


@pytest.mark.parametrize("fmt", ["csv", "parquet", "jsonl"])
def test_a_failure_midway_leaves_the_destination_as_it_was(
    filled: Engine,
    mlpq_export: Export,
    out_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    fmt: str,
) -> None:
    import service.results.export as export

    def failing(source: Any, sql: str, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("the store went away")

    monkeypatch.setattr(export._Source, "batches", failing)
    monkeypatch.setattr(export._Source, "copy", failing)
    out = out_dir / f"metrics.{fmt}"
    out.write_text("the previous export")
    with pytest.raises(RuntimeError, match="went away"):
        mlpq_export("exp", "--what", "metrics", "-o", str(out))
    assert [p.name for p in out_dir.iterdir()] == [out.name]
    assert out.read_text() == "the previous export"


# -- memory --------------------------------------------------------------------------------


def _fill_metrics(engine: Engine, add_runs: Callable[..., list[int]], rows: int) -> None:
    """``rows`` synthetic metric rows (a backprop run's columns) in runs of 1,000 steps,
    generated by the database itself."""
    steps = 1000
    add_runs(engine, rows // steps, experiment=f"big{rows}")
    values = (
        "r.id, s.i, {r}, {r}, {r}, {r}, NULL, NULL, NULL, NULL, s.i + 1, s.i * 0.01, {r}, "
        "0.1, NULL, NULL, NULL"
    )
    insert = f"INSERT INTO metrics ({', '.join(METRIC_COLUMNS)}) "
    where = f"FROM runs r JOIN experiments e ON e.id = r.experiment_id WHERE e.name = 'big{rows}'"
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(
                text(
                    insert
                    + "SELECT "
                    + values.format(r="random()")
                    + f" {where.replace('WHERE', f', generate_series(0, {steps - 1}) s(i) WHERE')}"
                )
            )
        else:
            conn.execute(
                text(
                    f"WITH RECURSIVE s(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM s "
                    f"WHERE i < {steps - 1}) "
                    + insert
                    + "SELECT "
                    + values.format(r="abs(random()) / 9.3e18")
                    + f" {where.replace('WHERE', ', s WHERE')}"
                )
            )


def _peak_rss_mb(args: list[str]) -> float:
    """Peak RSS of ``mlpq ARGS`` run alone in a child of a fresh interpreter."""
    probe = (
        "import resource, subprocess, sys\n"
        "done = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
        "assert done.returncode == 0, done.stderr\n"
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe, MLPQ, *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return int(out.stdout) / 1024


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_memory_does_not_grow_with_the_rows(
    store_engine: Engine,
    store_env: str,
    add_runs: Callable[..., list[int]],
    out_dir: Path,
    fmt: str,
) -> None:
    small, large = 100_000, 400_000
    for rows in (small, large):
        _fill_metrics(store_engine, add_runs, rows)
    peaks = {}
    for rows in (small, large):
        out = out_dir / f"{rows}.{fmt}"
        peaks[rows] = _peak_rss_mb(["export", f"big{rows}", "--what", "metrics", "-o", str(out)])
        if fmt == "parquet":
            assert pq.read_metadata(out).num_rows == rows
        else:
            with out.open("rb") as f:
                assert sum(1 for _ in f) == rows + 1
        out.unlink()
    print(f"peak RSS of mlpq export ({fmt}): {peaks} MB")
    # Holding the extra 300,000 rows would take over 40 MB as Arrow arrays, far more as tuples.
    assert peaks[large] - peaks[small] < 30, peaks
