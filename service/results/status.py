"""An experiment's progress: counts by status, throughput, ETA, the workers heard from lately."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Engine, func, select

from service.store import FINISHED, Experiment, Run, RunStatus

#: A worker counts as alive if one of its runs sent a heartbeat this recently.
RECENT_SECONDS = 60.0


@dataclass(frozen=True)
class Status:
    """What ``mlpq status`` shows; ``as_dict()`` is its ``--json``."""

    experiment_id: int
    experiment: str
    total: int
    counts: dict[str, int]
    finished: int
    mean_duration_seconds: float | None  # of the finished runs that report one
    runs_per_second: float | None  # finished runs over the span they were run in
    eta_seconds: float | None  # runs left at that rate
    workers: dict[str, int] = field(default_factory=dict)  # host -> runs in flight

    @property
    def done(self) -> bool:
        return self.total > 0 and self.finished == self.total

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "done": self.done}


def _aware(value: datetime | None) -> datetime | None:
    # SQLite hands back naive datetimes (stored in UTC); PostgreSQL aware ones.
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)


def experiment_status(
    engine: Engine, experiment: Experiment, *, now: datetime | None = None
) -> Status:
    """The progress of ``experiment``: one read of the store."""
    now = now or datetime.now(UTC)
    finished_states = [s.value for s in FINISHED]
    with engine.connect() as conn:
        counts = {s.value: 0 for s in RunStatus}
        for status, n in conn.execute(
            select(Run.status, func.count())
            .where(Run.experiment_id == experiment.id)
            .group_by(Run.status)
        ):
            counts[RunStatus(status).value] = n
        mean_duration, first_start, last_finish = conn.execute(
            select(
                func.avg(Run.wall_seconds), func.min(Run.started_at), func.max(Run.finished_at)
            ).where(Run.experiment_id == experiment.id, Run.status.in_(finished_states))
        ).one()
        workers = {
            worker: n
            for worker, n in conn.execute(
                select(Run.worker, func.count())
                .where(
                    Run.experiment_id == experiment.id,
                    Run.status == RunStatus.running,
                    Run.heartbeat_at >= now - timedelta(seconds=RECENT_SECONDS),
                )
                .group_by(Run.worker)
                .order_by(Run.worker)
            )
        }
    total = sum(counts.values())
    finished = sum(counts[s] for s in finished_states)
    rate = None
    first_start, last_finish = _aware(first_start), _aware(last_finish)
    if finished and first_start and last_finish and last_finish > first_start:
        rate = finished / (last_finish - first_start).total_seconds()
    left = total - finished
    eta = left / rate if rate else None
    if eta is None and left and mean_duration and workers:
        eta = left * float(mean_duration) / sum(workers.values())
    return Status(
        experiment_id=experiment.id,
        experiment=experiment.name,
        total=total,
        counts=counts,
        finished=finished,
        mean_duration_seconds=float(mean_duration) if mean_duration is not None else None,
        runs_per_second=rate,
        eta_seconds=eta if left else 0.0,
        workers={str(w): n for w, n in workers.items()},
    )
