"""One settings object, read from ``MLPQ_*`` environment variables and validated once.

Defaults need no server: the store is a SQLite file and the queue is kombu's
``filesystem://`` transport, both under ``MLPQ_HOME`` (``./.mlpq`` in the current
directory, like MLflow's ``./mlruns``). Point ``MLPQ_DATABASE_URL`` at PostgreSQL
and ``MLPQ_BROKER_URL`` at Redis to run a cluster.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.exceptions import SettingsError

DATABASE_SCHEMES = ("sqlite", "postgresql")
BROKER_SCHEMES = ("redis", "rediss", "amqp", "pyamqp", "filesystem")
# scheme[+driver]://rest, read without SQLAlchemy (importing it costs every command 0.1 s).
_DATABASE_URL = re.compile(r"(?P<backend>[A-Za-z][\w.-]*)(?:\+(?P<driver>[\w.-]+))?://")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MLPQ_", extra="ignore", frozen=True)

    # Folder for the embedded store and queue; relative paths are taken from the cwd.
    home: Path = Path(".mlpq")
    # Store URL; None -> sqlite:///<home>/mlpq.db, created and migrated on first use.
    database_url: str | None = None
    # Store URL for the read-only commands (mlpq sql, ls, show, ...), e.g. a login role
    # that is a member of mlpq_reader; None -> database_url, read in read-only transactions.
    read_database_url: str | None = None
    # Seconds a statement of `mlpq sql` may run (its --timeout overrides it).
    sql_timeout_seconds: float = Field(30.0, gt=0)
    # Celery broker URL; None -> embedded kombu filesystem:// queue under <home>/queue (no server).
    broker_url: str | None = None
    # Seconds between a running run's heartbeats.
    heartbeat_seconds: float = Field(5.0, gt=0)
    # Seconds between checkpoints of a running run (parameters, optimizer and RNG state).
    checkpoint_seconds: float = Field(30.0, gt=0)
    # A running run whose heartbeat is older than this is stale: its worker is presumed dead.
    stale_seconds: float = Field(120.0, gt=0)
    # Attempts a run gets (claims by a worker) before it is marked failed.
    max_attempts: int = Field(3, ge=1)
    # Hard time limit of one train task in seconds; the broker's visibility timeout is larger.
    task_time_limit: int = Field(6 * 3600, ge=1)
    # Largest CSV dataset a grid may name (read with this bound, stored in the database).
    max_csv_bytes: int = Field(64 * 2**20, ge=1)
    # Largest network a grid may ask for, in weights and biases.
    max_parameters: int = Field(10_000_000, ge=1)
    # Largest estimated memory of one run's parameter arrays (x candidates for random walk).
    max_run_memory_mb: int = Field(2048, ge=1)
    # Grids larger than this need --yes to be submitted.
    max_grid_runs: int = Field(10_000, ge=1)
    # Metric rows buffered by a worker before they are written in one batch.
    metrics_batch_rows: int = Field(500, ge=1)
    # Seconds a worker may hold metric rows before it writes them.
    metrics_flush_seconds: float = Field(2.0, gt=0)
    # Tasks a worker child process runs before it is replaced (bounds leaks). Rarely: a
    # replacement idles a process for over a second (billiard's exiting child sleeps 1 s,
    # and a message already handed to it waits for its successor); at 1,000, tiny runs
    # lost a tenth of their throughput to it.
    worker_max_tasks_per_child: int = Field(20_000, ge=1)
    # Estimated training seconds one message carries: short runs share a message up to
    # this (engine.cost estimates each run from its config); 0 = one run per message.
    pack_seconds: float = Field(0.2, ge=0, le=3600)
    # Messages the broker holds at most (the window; the store holds the rest of the
    # queue and the workers top it up). 0 = automatic: 64, or 4x the runs in progress.
    window: int = Field(0, ge=0, le=1_000_000)
    # Seconds between polls of the embedded filesystem queue (kombu's default of 1 s is slow).
    polling_interval: float = Field(0.01, gt=0)
    # Seconds a running run keeps reconnecting to a store whose connection dropped before
    # it leaves the run to the stale-run reaper (it is never marked failed for that).
    store_retry_seconds: float = Field(60.0, gt=0)
    # Seconds a worker told to stop (SIGTERM) lets its runs go on before it hands them back
    # (Celery's worker_soft_shutdown_timeout); 0: checkpoint and hand back at once.
    worker_soft_shutdown_seconds: float = Field(0.0, ge=0)
    # Celery task events (for Flower's task views): off by default, they cost every task
    # two more messages to the broker.
    task_events: bool = False

    @field_validator("database_url", "read_database_url")
    @classmethod
    def _check_database_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        match = _DATABASE_URL.match(value)
        if match is None or match["backend"] not in DATABASE_SCHEMES:
            raise ValueError(f"expected a sqlite:/// or postgresql:// URL, got {value!r}")
        if match["backend"] == "postgresql" and match["driver"] is None:
            # psycopg 3 is the driver we ship; plain postgresql:// would ask for psycopg2.
            value = "postgresql+psycopg" + value[len("postgresql") :]
        return value

    @field_validator("broker_url")
    @classmethod
    def _check_broker_url(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        scheme = value.split("://", 1)[0] if "://" in value else ""
        if scheme not in BROKER_SCHEMES:
            expected = ", ".join(f"{s}://" for s in BROKER_SCHEMES)
            raise ValueError(f"expected a URL starting with one of {expected}; got {value!r}")
        return value

    @model_validator(mode="after")
    def _fill_defaults(self) -> Settings:
        if self.database_url is None:
            object.__setattr__(self, "database_url", f"sqlite:///{self.home / 'mlpq.db'}")
        return self

    @property
    def embedded_broker(self) -> bool:
        """True when no broker server is configured and the filesystem queue is used."""
        return self.broker_url is None

    @property
    def queue_dir(self) -> Path:
        """Folder of the embedded filesystem queue."""
        return self.home / "queue"


def _one_line(exc: ValidationError) -> str:
    err = exc.errors()[0]
    key = "MLPQ_" + "_".join(str(p) for p in err["loc"]).upper()
    msg = err["msg"].removeprefix("Value error, ")
    value = err.get("input")
    return f"{key}: {msg} (got {value!r})" if "got" not in msg else f"{key}: {msg}"


def load_settings(**overrides: object) -> Settings:
    """Read and validate the settings; a bad value raises SettingsError with one line."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise SettingsError(_one_line(exc)) from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once."""
    return load_settings()
