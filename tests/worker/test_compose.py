"""docker-compose.yml and the Dockerfile agree with each other and with the repository.

Docker itself does not run in CI; these checks catch the drift that breaks
`docker compose up --scale worker=N` before anyone runs it.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from worker_testlib import REPO, wait_for


def _compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def test_workers_scale_and_wait_for_a_single_migration_run() -> None:
    services = _compose()["services"]
    assert {"postgres", "redis", "migrate", "worker"} <= set(services)
    for service in services.values():
        for dependency in service.get("depends_on", {}):
            assert dependency in services
    assert "healthcheck" in services["postgres"] and "healthcheck" in services["redis"]
    migrate, worker = services["migrate"], services["worker"]
    assert migrate["command"] == ["mlpq", "db", "upgrade"]
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert migrate.get("restart", "no") == "no"
    assert worker["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert worker["command"][:2] == ["mlpq", "worker"] and "upgrade" not in worker["command"]
    # A scaled service cannot pin a container name or a host port.
    assert "container_name" not in worker and "ports" not in worker
    env = worker["environment"]
    assert env["MLPQ_DATABASE_URL"].startswith("postgresql://")
    assert env["MLPQ_BROKER_URL"].startswith("redis://redis:")
    assert migrate["environment"] == env and migrate["image"] == worker["image"]


def test_dockerfile_copies_what_exists_and_pins_one_blas_thread() -> None:
    text = (REPO / "Dockerfile").read_text()
    for source in re.findall(r"^COPY (\S+) ", text, flags=re.M):
        assert (REPO / source).exists(), source
    for var in ("OMP_NUM_THREADS=1", "OPENBLAS_NUM_THREADS=1", "MKL_NUM_THREADS=1"):
        assert var in text
    assert 'CMD ["mlpq", "worker"]' in text
    ignored = (REPO / ".dockerignore").read_text().split()
    assert ".mlpq" in ignored and ".git" in ignored


# ${VAR} or ${VAR:-default}; $${VAR} is escaped (the container's shell expands it).
_VAR = re.compile(r"(?<!\$)\$\{(\w+)(?::-([^}]*))?\}")


def _interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's ``${VAR:-default}`` with ``env`` (a missing variable takes its default)."""
    return _VAR.sub(lambda m: env.get(m.group(1), m.group(2) or ""), value)


def _env_example() -> dict[str, str]:
    lines = (REPO / ".env.example").read_text().splitlines()
    pairs = [line.split("=", 1) for line in lines if line.strip() and not line.startswith("#")]
    return {key.strip(): value.strip() for key, value in pairs}


def test_broker_keeps_its_messages_and_no_port_is_published_without_a_profile() -> None:
    compose = _compose()
    services = compose["services"]
    redis = " ".join(services["redis"]["command"])
    assert "--appendonly yes" in redis and "--maxmemory-policy noeviction" in redis
    assert any(v.startswith("redisdata:") for v in services["redis"]["volumes"])
    assert any(v.startswith("pgdata:") for v in services["postgres"]["volumes"])
    assert {"pgdata", "redisdata"} <= set(compose["volumes"])
    for name, service in services.items():
        if "ports" in service:
            assert service.get("profiles"), f"{name} publishes a port without a profile"
            assert all(p.startswith("127.0.0.1:") for p in service["ports"]), name
    assert services["flower"]["profiles"] == ["monitoring"]
    assert services["flower"]["command"][:4] == ["celery", "-A", "worker.app", "flower"]
    assert services["flower"]["environment"] == services["worker"]["environment"]
    assert '".[monitoring]"' in (REPO / "Dockerfile").read_text()


def test_credentials_come_from_env_with_the_defaults_of_env_example() -> None:
    text = (REPO / "docker-compose.yml").read_text()
    example = _env_example()
    used = {m.group(1): m.group(2) for m in _VAR.finditer(text)}
    assert {"POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB"} <= set(used)
    for var, default in used.items():
        assert var in example, f"{var} is not in .env.example"
        assert default == example[var], f"{var}: compose default {default!r} != .env.example"
    # Without a .env file, the store URL the workers get matches the database postgres creates.
    env = _compose()["services"]["worker"]["environment"]
    url = _interpolate(env["MLPQ_DATABASE_URL"], {})
    assert url == "postgresql://mlpq:mlpq@postgres:5432/mlpq"
    assert ".env" in (REPO / ".gitignore").read_text().split()


def test_worker_stop_grace_outlasts_the_hand_back() -> None:
    worker = _compose()["services"]["worker"]
    grace = worker["stop_grace_period"]
    seconds = int(grace.rstrip("s")) * (60 if grace.endswith("m") else 1)
    soft = float(_env_example()["MLPQ_WORKER_SOFT_SHUTDOWN_SECONDS"])
    # The hand-back takes well under a second (tests/worker/test_scaling.py); leave a margin.
    assert seconds >= soft + 10


@pytest.mark.slow
@pytest.mark.redis
@pytest.mark.postgres
def test_the_containers_commands_run_as_plain_processes(
    pg_store_url: str, redis_url: str, tmp_path: Path
) -> None:
    """migrate, then a worker, then `cli submit`: each service's command and environment."""
    from sqlalchemy import text

    from service.store import make_engine

    services = _compose()["services"]
    base = {k: v for k, v in os.environ.items() if not k.startswith("MLPQ_")}
    env = {
        **base,
        **{k: _interpolate(v, {}) for k, v in services["worker"]["environment"].items()},
        # Where the containers' hostnames `postgres` and `redis` point, here.
        "MLPQ_DATABASE_URL": pg_store_url,
        "MLPQ_BROKER_URL": redis_url,
        "MLPQ_HOME": str(tmp_path / "home"),
    }
    bin_dir = Path(sys.executable).parent
    engine = make_engine(pg_store_url)
    with engine.begin() as conn:  # an empty schema, as a fresh postgres volume
        conn.execute(text("DROP TABLE IF EXISTS alembic_version, metrics, artifacts CASCADE"))
        conn.execute(text("DROP TABLE IF EXISTS runs, experiments, datasets CASCADE"))
        conn.execute(text("DROP VIEW IF EXISTS run_summary, experiment_progress CASCADE"))

    def command(argv: list[str]) -> list[str]:
        return [str(bin_dir / argv[0]), *argv[1:]]

    migrate = subprocess.run(
        command(services["migrate"]["command"]), env=env, capture_output=True, text=True
    )
    assert migrate.returncode == 0, migrate.stderr
    log = open(tmp_path / "worker.log", "ab")  # noqa: SIM115
    worker = subprocess.Popen(
        command([*services["worker"]["command"], "--concurrency", "2"]),
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        cli = services["cli"]
        assert cli["working_dir"] == "/grids" and "./examples:/grids:ro" in cli["volumes"]
        submit = subprocess.run(
            command([*cli["entrypoint"], "submit", "quickstart.yaml"]),
            env=env,
            cwd=REPO / "examples",
            capture_output=True,
            text=True,
        )
        assert submit.returncode == 0, submit.stderr

        def finished() -> tuple[int, int] | None:
            with engine.connect() as conn:
                done, total = conn.execute(
                    text("SELECT count(*) FILTER (WHERE status = 'succeeded'), count(*) FROM runs")
                ).one()
            return (done, total) if total and done == total else None

        _, total = wait_for(finished, timeout=120, what="the quickstart grid to finish")
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=30)
        log.close()
        engine.dispose()
    assert total == 48
