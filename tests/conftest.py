"""Shared fixtures: isolated stores (SQLite and PostgreSQL) and an isolated Redis db.

Each store is migrated to head and removed after its test: a SQLite file in the
test's tmp dir, or a PostgreSQL schema of its own selected through the URL
(``options=-csearch_path=<schema>``), so a subprocess handed the URL as
``MLPQ_DATABASE_URL`` sees the same store. With ``CI=true`` a missing server
fails the test; elsewhere it skips it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.engine import make_url

#: PostgreSQL server the tests create their schemas in.
PG_URL = os.environ.get("MLPQ_TEST_PG_URL", "postgresql+psycopg://root@127.0.0.1:5432/test")
#: Redis server the tests take a db of.
REDIS_URL = os.environ.get("MLPQ_TEST_REDIS_URL", "redis://127.0.0.1:6379")
# Redis dbs 1..15 are handed out; db 0 holds only the leases that say which db is taken.
_REDIS_DBS = range(1, 16)
_REDIS_LEASE_SECONDS = 900


def _unavailable(what: str, exc: BaseException) -> None:
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    message = f"{what} is not reachable: {first}"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{message} (CI=true: the service is required)", pytrace=False)
    pytest.skip(message)


def _dispose_cached_engines() -> None:
    from service.store import dispose_engines

    dispose_engines()


@pytest.fixture
def sqlite_store_url(tmp_path: Path) -> Iterator[str]:
    """URL of a migrated SQLite store in a file of this test's own."""
    from service.store import make_engine, upgrade

    path = tmp_path / "store" / "mlpq.db"
    url = f"sqlite:///{path}"
    engine = make_engine(url)
    upgrade(engine)
    engine.dispose()
    yield url
    _dispose_cached_engines()
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


def _pg_admin_engine() -> Engine:
    from service.store import make_engine

    engine = make_engine(PG_URL, pool_pre_ping=False)
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:
        engine.dispose()
        _unavailable(f"PostgreSQL at {make_url(PG_URL).render_as_string()}", exc)
    return engine


def pg_schema_url(schema: str) -> str:
    """``PG_URL`` with ``schema`` first on the search path and a findable application name."""
    url = make_url(PG_URL).update_query_dict(
        {"options": f"-csearch_path={schema}", "application_name": f"mlpq-test-{schema}"}
    )
    return url.render_as_string(hide_password=False)


def _drop_schema(admin: Engine, schema: str) -> None:
    _dispose_cached_engines()
    with admin.begin() as conn:
        # Connections a test left open (a killed worker's, a subprocess's) would block the drop.
        conn.execute(
            text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name = :app AND pid <> pg_backend_pid()"
            ),
            {"app": f"mlpq-test-{schema}"},
        )
        conn.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


@pytest.fixture
def pg_store_url() -> Iterator[str]:
    """URL of a migrated PostgreSQL store in a schema of this test's own."""
    from service.store import make_engine, upgrade

    admin = _pg_admin_engine()
    schema = f"mlpq_test_{uuid.uuid4().hex[:12]}"
    with admin.begin() as conn:
        conn.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
    url = pg_schema_url(schema)
    try:
        engine = make_engine(url)
        upgrade(engine)
        engine.dispose()
        yield url
    finally:
        _drop_schema(admin, schema)
        admin.dispose()


@pytest.fixture
def empty_pg_store_url() -> Iterator[str]:
    """URL of a PostgreSQL schema of this test's own that was never migrated."""
    admin = _pg_admin_engine()
    schema = f"mlpq_test_{uuid.uuid4().hex[:12]}"
    with admin.begin() as conn:
        conn.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
    try:
        yield pg_schema_url(schema)
    finally:
        _drop_schema(admin, schema)
        admin.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def store_url(request: pytest.FixtureRequest) -> str:
    """URL of an isolated, migrated store; the test runs once on SQLite, once on PostgreSQL."""
    fixture = "pg_store_url" if request.param == "postgresql" else "sqlite_store_url"
    return request.getfixturevalue(fixture)


@pytest.fixture
def store_engine(store_url: str) -> Iterator[Engine]:
    """An engine on ``store_url``, disposed after the test."""
    from service.store import make_engine

    engine = make_engine(store_url)
    yield engine
    engine.dispose()


def _add_runs(
    engine: Engine, count: int, *, experiment: str = "exp", **columns: object
) -> list[int]:
    """Insert an experiment named ``experiment`` (if new) with ``count`` queued runs; their ids.

    ``columns`` override run columns (same value for every run).
    """
    from sqlalchemy import select

    from service.store import Experiment, Run, session_scope

    with session_scope(engine) as session:
        exp = session.scalar(select(Experiment).where(Experiment.name == experiment))
        if exp is None:
            exp = Experiment(name=experiment, spec={})
            session.add(exp)
        values = {
            "optimizer": "backprop",
            "dataset": "iris",
            "hidden": "8",
            "activation": "relu",
            "max_steps": 10,
            "config_hash": "0" * 64,
            **columns,
        }
        runs = [Run(experiment=exp, seed=i, config={"seed": i}, **values) for i in range(count)]
        session.add_all(runs)
        session.flush()
        return [run.id for run in runs]


@pytest.fixture
def add_runs() -> Callable[..., list[int]]:
    """``add_runs(engine, count, *, experiment="exp", **columns) -> run ids``: queued runs."""
    return _add_runs


@pytest.fixture
def store_env(store_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Point MLPQ_HOME at a tmp dir and MLPQ_DATABASE_URL at ``store_url`` for this test.

    Subprocesses started by the test inherit both; the settings cache is cleared
    before and after.
    """
    from service.settings import get_settings

    monkeypatch.setenv("MLPQ_HOME", str(tmp_path / "mlpq-home"))
    monkeypatch.setenv("MLPQ_DATABASE_URL", store_url)
    get_settings.cache_clear()
    yield store_url
    get_settings.cache_clear()


@pytest.fixture
def redis_url() -> Iterator[str]:
    """URL of a Redis db (1..15) leased to this test alone, flushed before and after.

    Several pytest sessions may share one Redis server, so a db is taken by a
    lease key in db 0 (SET NX with an expiry) rather than from a pid or worker id.
    """
    import redis

    base = redis.Redis.from_url(REDIS_URL, db=0, socket_connect_timeout=2)
    try:
        base.ping()
    except redis.RedisError as exc:
        base.close()
        _unavailable(f"Redis at {REDIS_URL}", exc)
    token = f"{os.getpid()}-{uuid.uuid4().hex}"
    db = None
    deadline = time.monotonic() + 120
    while db is None:
        for candidate in _REDIS_DBS:
            if base.set(f"mlpq-test-lease:{candidate}", token, nx=True, ex=_REDIS_LEASE_SECONDS):
                db = candidate
                break
        else:
            if time.monotonic() > deadline:
                base.close()
                pytest.fail("Redis: every test db 1..15 is leased by other tests", pytrace=False)
            time.sleep(0.2)
    client = redis.Redis.from_url(REDIS_URL, db=db)
    client.flushdb()
    try:
        yield f"{REDIS_URL.rstrip('/')}/{db}"
    finally:
        client.flushdb()
        client.close()
        # Release only our own lease.
        if base.get(f"mlpq-test-lease:{db}") == token.encode():
            base.delete(f"mlpq-test-lease:{db}")
        base.close()


# -- a redis-server of the test's own (restarts, kills), persistence on ------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisServer:
    """A redis-server of one test: append-only file fsynced on every write, so a SIGKILL
    loses nothing acknowledged and a restart finds every message again."""

    def __init__(self, directory: Path, *, persist: bool = True) -> None:
        self.port = free_port()
        self.dir = directory
        self.persist = persist  # False: nothing on disk, a restart starts empty
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        import redis

        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed", pytrace=False)
        self.dir.mkdir(parents=True, exist_ok=True)
        args = ["--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir)]
        if self.persist:
            args += ["--appendonly", "yes", "--appendfsync", "always", "--save", ""]
        else:
            args += ["--appendonly", "no", "--save", ""]
        self.proc = subprocess.Popen(
            [binary, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        client = redis.Redis(port=self.port)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.RedisError:
                if time.monotonic() > deadline:
                    pytest.fail("redis-server did not start", pytrace=False)
                time.sleep(0.05)
        client.close()

    def stop(self) -> None:
        """SIGTERM: Redis flushes its append-only file and exits."""
        self._end(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL: the server dies at once."""
        self._end(signal.SIGKILL)

    def _end(self, sig: signal.Signals) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=10)
        self.proc = None


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A started redis-server of this test's own on a free port, killed after the test."""
    server = RedisServer(tmp_path / "redis-server")
    server.start()
    yield server
    server.kill()


@pytest.fixture
def volatile_redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A started redis-server of this test's own that keeps nothing on disk (as CI's)."""
    server = RedisServer(tmp_path / "redis-volatile", persist=False)
    server.start()
    yield server
    server.kill()


@pytest.fixture
def unused_port() -> int:
    """A free TCP port (a broker URL nothing answers at)."""
    return free_port()
