"""The shared fixtures isolate each test and fail (not skip) on CI when a service is missing."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import redis
from sqlalchemy import text

from service.store import make_engine

CONFTEST = Path(__file__).resolve().parent.parent / "conftest.py"
REPO = CONFTEST.parent.parent
CLOSED_PORT = 1  # nothing listens on port 1

INNER_TESTS = """
def test_pg(pg_store_url):
    pass

def test_redis(redis_url):
    pass
"""


def run_inner(
    tmp_path: Path, test_code: str, *, ci: bool | None, services: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run pytest on ``test_code`` beside a copy of the shared conftest, in a child process."""
    (tmp_path / "conftest.py").write_text(CONFTEST.read_text())
    (tmp_path / "test_inner.py").write_text(textwrap.dedent(test_code))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("CI", None)
    if ci:
        env["CI"] = "true"
    if not services:
        env["MLPQ_TEST_PG_URL"] = f"postgresql+psycopg://root@127.0.0.1:{CLOSED_PORT}/x"
        env["MLPQ_TEST_REDIS_URL"] = f"redis://127.0.0.1:{CLOSED_PORT}"
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rfEs", "-q", str(tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_missing_services_fail_the_tests_when_ci_is_true(tmp_path: Path) -> None:
    result = run_inner(tmp_path, INNER_TESTS, ci=True, services=False)
    assert result.returncode == 1, result.stdout
    assert "2 errors" in result.stdout
    assert re.search(
        r"PostgreSQL at \S+:1/x is not reachable.*CI=true: the service is required", result.stdout
    )
    assert re.search(
        r"Redis at redis://127.0.0.1:1 is not reachable.*CI=true: the service is required",
        result.stdout,
    )


def test_missing_services_skip_the_tests_elsewhere(tmp_path: Path) -> None:
    result = run_inner(tmp_path, INNER_TESTS, ci=False, services=False)
    assert result.returncode == 0, result.stdout
    assert "2 skipped" in result.stdout
    assert re.search(r"SKIPPED.*PostgreSQL at \S+ is not reachable", result.stdout)


def test_postgres_store_is_a_schema_of_its_own_dropped_after_the_test(
    tmp_path: Path, pg_store_url: str
) -> None:
    inner = """
        from sqlalchemy import text
        from service.store import make_engine

        def test_inner(pg_store_url):
            engine = make_engine(pg_store_url)
            with engine.connect() as conn:
                schema = conn.execute(text("SELECT current_schema()")).scalar_one()
            engine.dispose()
            open("schema.txt", "w").write(schema)
    """
    result = run_inner(tmp_path, inner, ci=None)
    assert result.returncode == 0 and "1 passed" in result.stdout, result.stdout
    inner_schema = (tmp_path / "schema.txt").read_text()
    engine = make_engine(pg_store_url)
    try:
        with engine.connect() as conn:
            ours = conn.execute(text("SELECT current_schema()")).scalar_one()
            left = conn.execute(
                text("SELECT count(*) FROM pg_namespace WHERE nspname = :s"), {"s": inner_schema}
            ).scalar_one()
    finally:
        engine.dispose()
    assert inner_schema.startswith("mlpq_test_") and inner_schema != ours
    assert left == 0


def test_redis_db_is_leased_to_this_test_and_starts_empty(redis_url: str) -> None:
    db = int(redis_url.rsplit("/", 1)[1])
    assert 1 <= db <= 15
    client = redis.Redis.from_url(redis_url)
    lease = redis.Redis.from_url(redis_url.rsplit("/", 1)[0], db=0)
    try:
        assert client.dbsize() == 0
        assert lease.get(f"mlpq-test-lease:{db}") is not None
        client.set("k", "v")
    finally:
        client.close()
        lease.close()


def test_store_env_points_the_settings_and_get_engine_at_the_tests_store(
    store_env: str, add_runs: Callable[..., list[int]]
) -> None:
    from service.settings import get_settings
    from service.store import get_engine

    assert get_settings().database_url == store_env
    engine = get_engine()
    (run,) = add_runs(engine, 1)
    with make_engine(store_env).connect() as conn:
        assert conn.execute(text("SELECT id FROM runs")).scalar_one() == run
