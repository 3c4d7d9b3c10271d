"""`mlpq sql` only reads, on both stores: hostile statements are refused in one line, exit 2,
and the store is left exactly as it was."""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import Engine, text

TABLES = ("experiments", "runs", "metrics", "artifacts", "datasets", "alembic_version")

Sql = Callable[..., tuple[int, str, str]]


@pytest.fixture
def mlpq_sql(
    store_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Sql:
    """``mlpq sql ARGS...`` through the real entry point, in this process: (code, out, err)."""
    from cli.main import main
    from service.settings import get_settings

    monkeypatch.setenv("MLPQ_DATABASE_URL", store_url)
    monkeypatch.delenv("MLPQ_READ_DATABASE_URL", raising=False)
    get_settings.cache_clear()

    def run(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        monkeypatch.setattr(sys, "argv", ["mlpq", "sql", *args])
        try:
            main()
            code = 0
        except SystemExit as exc:
            code = int(exc.code or 0)
        out, err = capsys.readouterr()
        return code, out, err

    yield run
    get_settings.cache_clear()


@pytest.fixture
def filled(store_engine: Engine, add_runs: Callable[..., list[int]]) -> Engine:
    from service.store import write_metrics

    ids = add_runs(store_engine, 3)
    with store_engine.begin() as conn:
        for run_id in ids:
            write_metrics(conn, run_id, [{"step": s, "train_loss": 1.0 / s} for s in (1, 2)])
    return store_engine


def _digest(engine: Engine) -> str:
    """Every row of every table, and the list of tables and views, hashed."""
    from sqlalchemy import inspect

    h = hashlib.sha256()
    inspector = inspect(engine)
    h.update(
        repr(sorted(inspector.get_table_names()) + sorted(inspector.get_view_names())).encode()
    )
    with engine.connect() as conn:
        for table in TABLES:
            for row in conn.execute(text(f"SELECT * FROM {table} ORDER BY 1")):
                h.update(repr(tuple(row)).encode())
    if engine.dialect.name == "postgresql":
        with engine.connect() as conn:
            h.update(repr(conn.execute(text("SHOW default_transaction_read_only")).all()).encode())
    return h.hexdigest()


HOSTILE_COMMON = [
    "DROP TABLE runs",
    "DELETE FROM metrics",
    "UPDATE runs SET status = 'failed'",
    "INSERT INTO experiments (name, spec) VALUES ('x', '{}')",
    "CREATE TABLE t (a int)",
    "CREATE VIEW v AS SELECT 1 AS a",
    "ALTER TABLE runs ADD COLUMN x int",
    "SELECT 1; DROP TABLE datasets",
    "SELECT 1; DELETE FROM metrics;",
    "WITH d AS (DELETE FROM metrics RETURNING *) SELECT * FROM d",
    "INSERT INTO runs SELECT * FROM runs",
    "BEGIN",
    "COMMIT",
    "VACUUM",
    "ANALYZE",
]
HOSTILE_SQLITE = [
    "REPLACE INTO experiments (id, name, spec) VALUES (1, 'x', '{}')",
    "CREATE TRIGGER t AFTER INSERT ON runs BEGIN DELETE FROM metrics; END",
    "ATTACH '{tmp}/other.db' AS other",
    "DETACH main",
    "VACUUM INTO '{tmp}/copy.db'",
    "PRAGMA query_only = OFF",
    "PRAGMA journal_mode = DELETE",
    "PRAGMA user_version = 7",
    "PRAGMA foreign_keys = OFF",
    "SELECT load_extension('mod')",
    "REINDEX",
    "SAVEPOINT s",
]
HOSTILE_POSTGRESQL = [
    "SET transaction_read_only = off",
    "SET default_transaction_read_only = off",
    "SELECT set_config('default_transaction_read_only', 'off', false)",
    "SELECT \"set_config\"('statement_timeout', '0', false)",
    "DO $$ BEGIN DELETE FROM metrics; END $$",
    "CALL some_procedure()",
    "LISTEN channel",
    "NOTIFY channel",
    "COPY (SELECT 1) TO PROGRAM 'touch {tmp}/pwned'",
    "COPY runs TO '{tmp}/runs.csv'",
    "SELECT pg_read_file('/etc/hostname')",
    "SELECT lo_import('/etc/hostname')",
    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity",
    "SELECT nextval('runs_id_seq')",
    "TRUNCATE metrics",
    "GRANT ALL ON runs TO PUBLIC",
    "PREPARE p AS DELETE FROM runs",
    # An escape string hiding the calls after it from a reader that knows only '...'.
    "SELECT E'\\'' AS q, set_config('role', 'root', true), "
    "query_to_xml($x$SELECT pg_read_file('/etc/hostname')$x$, true, false, '') --'",
    "SELECT query_to_xml('SELECT 1', true, false, '')",
]


def _hostile(dialect: str) -> list[str]:
    extra = HOSTILE_SQLITE if dialect == "sqlite" else HOSTILE_POSTGRESQL
    return HOSTILE_COMMON + extra


def test_at_least_twenty_hostile_statements_per_store_are_refused_and_change_nothing(
    filled: Engine, mlpq_sql: Sql, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"  # where ATTACH, VACUUM INTO and COPY TO would write
    outside.mkdir()
    statements = _hostile(filled.dialect.name)
    assert len(statements) >= 20
    before = _digest(filled)
    for statement in statements:
        code, out, err = mlpq_sql(statement.replace("{tmp}", str(outside)))
        assert code == 2, (statement, code, out, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("mlpq: sql: "), (statement, err)
        assert "Traceback" not in err and out == ""
    assert _digest(filled) == before
    assert not any(outside.iterdir()), list(outside.iterdir())


def test_a_statement_past_its_timeout_is_canceled_in_one_line(
    filled: Engine, mlpq_sql: Sql
) -> None:
    slow = (
        "SELECT pg_sleep(5)"
        if filled.dialect.name == "postgresql"
        else "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT max(x) FROM c"
    )
    code, _, err = mlpq_sql(slow, "--timeout", "0.5")
    assert code == 2
    assert err.strip() == "mlpq: sql: canceled after 0.5 s (--timeout to allow longer)"


def test_reads_work_in_every_format_and_stddev_is_the_same_sql_on_both_stores(
    filled: Engine, mlpq_sql: Sql
) -> None:
    import csv
    import io
    import json

    query = (
        "SELECT count(*) AS n, avg(train_loss) AS mean, stddev(train_loss) AS sd, "
        "variance(train_loss) AS var FROM metrics"
    )
    code, out, _ = mlpq_sql(query, "--format", "csv")
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    assert int(rows[0]["n"]) == 6
    # Three runs at 1.0 and 0.5: the sample variance of [1, .5, 1, .5, 1, .5].
    assert float(rows[0]["var"]) == pytest.approx(0.075)
    assert float(rows[0]["sd"]) == pytest.approx(0.075**0.5)
    code, out, _ = mlpq_sql("SELECT run_id, step FROM metrics ORDER BY run_id, step", "-f", "jsonl")
    assert code == 0 and [json.loads(line)["step"] for line in out.splitlines()] == [1, 2] * 3
    code, out, _ = mlpq_sql("SELECT 'a;b' AS s, 1 AS one -- trailing; comment", "-f", "json")
    assert code == 0 and json.loads(out) == [{"s": "a;b", "one": 1}]


@pytest.mark.postgres
def test_an_unmigrated_postgresql_store_says_what_to_run(
    empty_pg_store_url: str, tmp_path: Path
) -> None:
    import os
    import subprocess

    env = {**os.environ, "MLPQ_DATABASE_URL": empty_pg_store_url, "MLPQ_HOME": str(tmp_path)}
    mlpq = str(Path(sys.executable).with_name("mlpq"))
    for args in (["ls"], ["show", "exp"], ["sql", "SELECT * FROM runs"]):
        result = subprocess.run([mlpq, *args], env=env, capture_output=True, text=True, timeout=60)
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "run `mlpq db upgrade`" in lines[0], result.stderr
