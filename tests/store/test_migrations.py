"""The schema comes from Alembic migrations alone and matches the models, on both backends."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, inspect, text

from service.exceptions import StoreError
from service.store import Base, make_engine
from service.store.migrate import (
    VIEWS,
    current_revision,
    downgrade,
    head_revision,
    include_object,
    upgrade,
)

TABLES = {"experiments", "runs", "metrics", "artifacts", "datasets"}


def schema_diff(engine: Engine) -> list:
    with engine.connect() as conn:
        context = MigrationContext.configure(
            conn, opts={"compare_type": True, "include_object": include_object}
        )
        return compare_metadata(context, Base.metadata)


def test_migrating_an_empty_store_yields_exactly_the_models(store_engine: Engine) -> None:
    assert current_revision(store_engine) == head_revision()
    assert schema_diff(store_engine) == []
    inspector = inspect(store_engine)
    assert set(inspector.get_table_names()) == TABLES | {"alembic_version"}
    assert set(inspector.get_view_names()) == set(VIEWS)


def test_downgrade_to_base_then_upgrade_round_trips(store_engine: Engine) -> None:
    downgrade(store_engine, "base")
    assert current_revision(store_engine) is None
    inspector = inspect(store_engine)
    assert set(inspector.get_table_names()) <= {"alembic_version"}
    assert inspector.get_view_names() == []
    upgrade(store_engine)
    assert current_revision(store_engine) == head_revision()
    assert schema_diff(store_engine) == []
    assert set(inspect(store_engine).get_view_names()) == set(VIEWS)


def test_schema_comparison_notices_a_missing_index(store_engine: Engine) -> None:
    # Guards the two tests above: the comparison must be able to see a drift.
    with store_engine.begin() as conn:
        conn.execute(text("DROP INDEX ix_runs_experiment_status"))
    diff = schema_diff(store_engine)
    assert [d[0] for d in diff] == ["add_index"]
    assert diff[0][1].name == "ix_runs_experiment_status"


def test_the_hand_written_indexes_exist_and_dedupe_looks_hashes_up_by_hash(
    store_engine: Engine,
) -> None:
    # The comparison above skips them (HAND_WRITTEN_INDEXES): checked here instead.
    from service.store.migrate import HAND_WRITTEN_INDEXES

    names = {index["name"] for index in inspect(store_engine).get_indexes("runs")}
    assert names >= HAND_WRITTEN_INDEXES
    if store_engine.dialect.name != "postgresql":
        return
    with store_engine.connect() as conn:
        definition = conn.execute(
            text(
                "SELECT indexdef FROM pg_indexes "
                "WHERE schemaname = current_schema() AND indexname = 'ix_runs_config_hash'"
            )
        ).scalar_one()
        assert "USING hash (config_hash)" in definition
        conn.execute(text("SET enable_seqscan = off"))  # an empty table: force the choice
        plan = "\n".join(
            conn.execute(
                text(
                    "EXPLAIN SELECT id FROM runs WHERE config_hash = ANY(CAST(:hashes AS text[]))"
                ),
                {"hashes": ["a" * 64, "b" * 64]},
            ).scalars()
        )
    assert "ix_runs_config_hash" in plan, plan


def test_upgrade_when_at_head_changes_nothing(store_engine: Engine) -> None:
    with store_engine.begin() as conn:
        conn.execute(
            text("INSERT INTO experiments (name, spec, created_at) VALUES ('e', '{}', :t)"),
            {"t": "2024-01-01 00:00:00"},
        )
    upgrade(store_engine)
    with store_engine.connect() as conn:
        assert conn.execute(text("SELECT name FROM experiments")).scalars().all() == ["e"]


def test_postgres_tables_and_version_table_land_in_the_tests_own_schema(
    pg_store_url: str,
) -> None:
    engine = make_engine(pg_store_url)
    try:
        with engine.connect() as conn:
            schema = conn.execute(text("SELECT current_schema()")).scalar_one()
            rows = conn.execute(
                text(
                    "SELECT table_name, table_type FROM information_schema.tables "
                    "WHERE table_schema = :s"
                ),
                {"s": schema},
            ).all()
    finally:
        engine.dispose()
    assert schema.startswith("mlpq_test_")
    found = {name: kind for name, kind in rows}
    assert {n for n, k in found.items() if k == "BASE TABLE"} == TABLES | {"alembic_version"}
    assert {n for n, k in found.items() if k == "VIEW"} == set(VIEWS)


def test_upgrade_to_an_unknown_revision_is_one_line_store_error(sqlite_store_url: str) -> None:
    engine = make_engine(sqlite_store_url)
    try:
        with pytest.raises(StoreError) as info:
            upgrade(engine, "nosuchrevision")
    finally:
        engine.dispose()
    assert "cannot migrate" in str(info.value)
    assert "\n" not in str(info.value)


def _first_use(url: str) -> str | None:
    from service.store import get_engine

    return current_revision(get_engine(url))


def test_processes_starting_at_once_on_a_new_sqlite_store_migrate_it_once(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'fresh' / 'mlpq.db'}"
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        revisions = pool.map(_first_use, [url] * 4)
    assert revisions == [head_revision()] * 4
    engine = make_engine(url)
    try:
        assert schema_diff(engine) == []
        with engine.connect() as conn:
            versions = conn.execute(text("SELECT version_num FROM alembic_version")).all()
        assert len(versions) == 1
    finally:
        engine.dispose()


def mlpq(*args: str, url: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MLPQ_DATABASE_URL": url}
    code = "import sys; from cli.main import main; sys.argv[0] = 'mlpq'; main()"
    return subprocess.run(
        [sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=60
    )


def test_mlpq_db_upgrade_migrates_an_empty_store(store_url: str) -> None:
    engine = make_engine(store_url)
    try:
        downgrade(engine, "base")
        assert "empty" in mlpq("db", "current", url=store_url).stdout
        done = mlpq("db", "upgrade", url=store_url)
        assert done.returncode == 0, done.stderr
        assert mlpq("db", "current", url=store_url).stdout.strip() == head_revision()
        assert schema_diff(engine) == []
        bad = mlpq("db", "upgrade", "nosuch", url=store_url)
        assert bad.returncode == 1
        assert bad.stderr.startswith("mlpq: cannot migrate") and bad.stderr.count("\n") == 1
    finally:
        engine.dispose()


def _upgrade(url: str, start: Any) -> str | None:
    engine = make_engine(url)
    try:
        with engine.connect():
            pass  # connect before the start signal, so the upgrades overlap
        start.wait(30)
        upgrade(engine)
        return current_revision(engine)
    finally:
        engine.dispose()


def test_concurrent_upgrades_of_an_empty_postgres_schema_migrate_it_once(
    pg_store_url: str,
) -> None:
    engine = make_engine(pg_store_url)
    ctx = multiprocessing.get_context("spawn")
    try:
        downgrade(engine, "base")
        with ctx.Manager() as manager, ctx.Pool(3) as pool:
            start = manager.Event()
            pending = [pool.apply_async(_upgrade, (pg_store_url, start)) for _ in range(3)]
            time.sleep(1.0)  # let the three processes import and connect
            start.set()
            assert [p.get(timeout=60) for p in pending] == [head_revision()] * 3
        assert schema_diff(engine) == []
    finally:
        engine.dispose()


def test_the_head_read_from_the_files_is_alembics_head() -> None:
    from service.store.db import script_head

    assert script_head() == head_revision()


def test_the_sqlite_snapshot_is_the_schema_the_migrations_give(tmp_path: Path) -> None:
    """A new embedded store is created from sqlite_schema.sql: it must be Alembic's schema."""
    from service.store.db import _created_from_snapshot
    from service.store.sqlite_snapshot import SNAPSHOT, schema_statements, write_snapshot

    regenerate = "run `python -m service.store.sqlite_snapshot` and commit the file"
    assert write_snapshot(tmp_path / "now.sql") == SNAPSHOT.read_text(), regenerate

    migrated, snapped = make_engine("sqlite://"), make_engine(f"sqlite:///{tmp_path / 's.db'}")
    try:
        upgrade(migrated)
        assert _created_from_snapshot(snapped)
        assert not _created_from_snapshot(snapped)  # a store with tables is left alone
        with migrated.connect() as a, snapped.connect() as b:
            assert schema_statements(b.connection.driver_connection) == schema_statements(
                a.connection.driver_connection
            )
        assert current_revision(snapped) == head_revision()
        assert schema_diff(snapped) == []
        assert set(inspect(snapped).get_view_names()) == set(VIEWS)
        upgrade(snapped)  # Alembic finds it at head
        assert current_revision(snapped) == head_revision()
    finally:
        migrated.dispose()
        snapped.dispose()
