"""docker-compose.yml and the Dockerfile agree with each other and with the repository.

Docker itself does not run in CI; these checks catch the drift that breaks
`docker compose up --scale worker=N` before anyone runs it.
"""

from __future__ import annotations

import re

import yaml
from worker_testlib import REPO


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
