"""The shared fixtures isolate each test and fail (not skip) on CI when a service is missing."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis
from sqlalchemy import text

from service.db import make_engine

CONFTEST = Path(__file__).resolve().parent.parent / "conftest.py"
REPO = CONFTEST.parent.parent
CLOSED_PORT = 1  # nothing listens on port 1

INNER_TESTS = """
def test_pg(pg_store_url):
    pass

def test_redis(redis_url):
    pass
"""


def run_inner(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, *, ci: bool):
    pytester.makeconftest(CONFTEST.read_text())
    pytester.makepyfile(INNER_TESTS)
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    monkeypatch.setenv("MLPQ_TEST_PG_URL", f"postgresql+psycopg://root@127.0.0.1:{CLOSED_PORT}/x")
    monkeypatch.setenv("MLPQ_TEST_REDIS_URL", f"redis://127.0.0.1:{CLOSED_PORT}")
    if ci:
        monkeypatch.setenv("CI", "true")
    else:
        monkeypatch.delenv("CI", raising=False)
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rfs")


def test_missing_services_fail_the_tests_when_ci_is_true(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    result = run_inner(pytester, monkeypatch, ci=True)
    result.assert_outcomes(errors=2)
    result.stdout.fnmatch_lines(
        [
            "*PostgreSQL at *:1/x is not reachable*CI=true: the service is required*",
            "*Redis at redis://127.0.0.1:1 is not reachable*CI=true: the service is required*",
        ]
    )


def test_missing_services_skip_the_tests_elsewhere(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    result = run_inner(pytester, monkeypatch, ci=False)
    result.assert_outcomes(skipped=2)
    result.stdout.fnmatch_lines(["*SKIPPED*PostgreSQL at*not reachable*"])


def test_postgres_store_is_a_schema_of_its_own_dropped_after_the_test(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, pg_store_url: str
) -> None:
    # The outer fixture's engine finds out which schemas exist before and after an inner run.
    pytester.makeconftest(CONFTEST.read_text())
    pytester.makepyfile(
        """
        from sqlalchemy import text
        from service.db import make_engine

        def test_inner(pg_store_url, tmp_path_factory):
            engine = make_engine(pg_store_url)
            with engine.connect() as conn:
                schema = conn.execute(text("SELECT current_schema()")).scalar_one()
            engine.dispose()
            open("schema.txt", "w").write(schema)
        """
    )
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    inner_schema = (pytester.path / "schema.txt").read_text()
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
