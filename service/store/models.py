"""The store's schema as SQLAlchemy 2.0 typed models.

The schema changes only through Alembic migrations in ``migrations/``; a test
checks that migrating an empty database yields exactly these models.
Column names of ``metrics`` come from ``engine.metrics`` so the engine, the store
and the SQL users type agree on one set of names.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Double,
    Enum,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from engine.metrics import METRICS, STEP

# Stable constraint names so migrations are the same on SQLite and PostgreSQL.
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


class RunStatus(enum.StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    diverged = "diverged"
    cancelled = "cancelled"

    @property
    def finished(self) -> bool:
        return self in FINISHED


FINISHED = frozenset(
    {RunStatus.succeeded, RunStatus.failed, RunStatus.diverged, RunStatus.cancelled}
)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map: ClassVar = {dict[str, Any]: JSON, datetime: DateTime(timezone=True)}


class Experiment(Base):
    __tablename__ = "experiments"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    # The grid as submitted (after parsing), for the record.
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    runs: Mapped[list[Run]] = relationship(back_populates="experiment")


class Run(Base):
    __tablename__ = "runs"
    __table_args__ = (
        Index("ix_runs_experiment_status", "experiment_id", "status"),
        # Written by hand in the migrations: ix_runs_config_hash (a btree, a hash index on
        # PostgreSQL since 0005), the window's partial indexes ix_runs_unsent and
        # ix_runs_in_broker (0004) and the reaper's ix_runs_running_heartbeat (0006,
        # heartbeat_at of running runs only). Declared here, their postgresql_using and
        # postgresql_where would import SQLAlchemy's PostgreSQL dialect into every
        # process, a SQLite one too.
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    experiment_id: Mapped[int] = mapped_column(ForeignKey("experiments.id", ondelete="CASCADE"))
    # Canonical run config (engine.TrainConfig.to_dict()) and its sha256.
    config: Mapped[dict[str, Any]] = mapped_column(JSON)
    config_hash: Mapped[str] = mapped_column(String(64))
    # The common hyperparameters as real columns, for plain SQL.
    optimizer: Mapped[str] = mapped_column(String(32))
    dataset: Mapped[str] = mapped_column(String(100))
    hidden: Mapped[str] = mapped_column(String(200))  # layer sizes joined by "x", e.g. "32x16"
    activation: Mapped[str] = mapped_column(String(32))
    seed: Mapped[int] = mapped_column(Integer)
    max_steps: Mapped[int] = mapped_column(Integer)
    learning_rate: Mapped[float | None] = mapped_column(Double)
    batch_size: Mapped[int | None] = mapped_column(Integer)
    momentum: Mapped[float | None] = mapped_column(Double)
    step_size: Mapped[float | None] = mapped_column(Double)
    temperature: Mapped[float | None] = mapped_column(Double)
    candidates: Mapped[int | None] = mapped_column(Integer)
    # Lifecycle.
    status: Mapped[RunStatus] = mapped_column(
        Enum(RunStatus, native_enum=False, length=16, create_constraint=True, name="status"),
        default=RunStatus.queued,
    )
    # False until the run's message was handed to the broker (queued-but-unsent otherwise).
    published: Mapped[bool] = mapped_column(Boolean, default=False)
    # When the message was handed to the broker (the window: a run still queued long
    # after later ones started lost its message, and is published again).
    published_at: Mapped[datetime | None]
    # Estimated training seconds (engine.cost), for packing short runs into one message.
    est_seconds: Mapped[float | None] = mapped_column(Double)
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    worker: Mapped[str | None] = mapped_column(String(200))
    heartbeat_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    resumed_from_step: Mapped[int | None] = mapped_column(Integer)  # set when a retry resumed
    stop_reason: Mapped[str | None] = mapped_column(String(32))
    error: Mapped[str | None] = mapped_column(Text)
    # Summary results, written with the final status in one transaction.
    final_train_loss: Mapped[float | None] = mapped_column(Double)
    final_val_loss: Mapped[float | None] = mapped_column(Double)
    best_val_loss: Mapped[float | None] = mapped_column(Double)
    final_train_accuracy: Mapped[float | None] = mapped_column(Double)
    final_val_accuracy: Mapped[float | None] = mapped_column(Double)
    best_val_accuracy: Mapped[float | None] = mapped_column(Double)
    final_val_r2: Mapped[float | None] = mapped_column(Double)
    best_val_r2: Mapped[float | None] = mapped_column(Double)
    iterations: Mapped[int | None] = mapped_column(Integer)
    evaluations: Mapped[float | None] = mapped_column(Double)
    wall_seconds: Mapped[float | None] = mapped_column(Double)

    experiment: Mapped[Experiment] = relationship(back_populates="runs")


#: Summary columns of ``runs`` filled from the engine's TrainResult.summary.
SUMMARY_COLUMNS: tuple[str, ...] = (
    "final_train_loss",
    "final_val_loss",
    "best_val_loss",
    "final_train_accuracy",
    "final_val_accuracy",
    "best_val_accuracy",
    "final_val_r2",
    "best_val_r2",
    "iterations",
    "evaluations",
    "wall_seconds",
)

# Metrics are a plain Core table: rows are written in bulk (COPY / executemany),
# never one ORM object at a time.
metrics = Table(
    "metrics",
    Base.metadata,
    Column("run_id", ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True),
    Column(STEP, Integer, primary_key=True, autoincrement=False),
    *(Column(name, Double) for name in METRICS),
)


class ArtifactKind(enum.StrEnum):
    weights = "weights"
    checkpoint = "checkpoint"


class Artifact(Base):
    """Final weights (one per run) and the latest checkpoint (one per run), as npz bytes."""

    __tablename__ = "artifacts"

    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    kind: Mapped[ArtifactKind] = mapped_column(
        Enum(ArtifactKind, native_enum=False, length=16, create_constraint=True, name="kind"),
        primary_key=True,
    )
    format: Mapped[str] = mapped_column(String(16), default="npz")
    # {"W0": [64, 32], "b0": [32], ...} so shapes are visible from SQL.
    shapes: Mapped[dict[str, Any]] = mapped_column(JSON)
    step: Mapped[int | None] = mapped_column(Integer)  # checkpoints: the step they hold
    data: Mapped[bytes] = mapped_column(LargeBinary)
    size: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Dataset(Base):
    """A user's CSV, stored once by content hash so remote workers need no shared disk."""

    __tablename__ = "datasets"

    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))  # file name as submitted
    format: Mapped[str] = mapped_column(String(16), default="csv")
    size: Mapped[int] = mapped_column(BigInteger)
    data: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
