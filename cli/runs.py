"""``mlpq worker``, ``mlpq run``, ``mlpq cancel``, ``mlpq retry``: running runs."""

from __future__ import annotations

import os
from typing import Annotated

import typer
from rich.console import Console

console = Console()
err_console = Console(stderr=True)


def worker(
    concurrency: Annotated[
        int,
        typer.Option("--concurrency", "-c", min=1, help="Worker processes (default: CPU count)."),
    ] = 0,
    loglevel: Annotated[
        str, typer.Option("--loglevel", "-l", help="DEBUG, INFO, WARNING or ERROR.")
    ] = "INFO",
    hostname: Annotated[
        str | None, typer.Option("--hostname", "-n", help="Celery node name, e.g. w1@%h.")
    ] = None,
) -> None:
    """Start a Celery worker (prefork) that trains runs from the queue until stopped.

    Uses MLPQ_BROKER_URL and MLPQ_DATABASE_URL. Each worker process uses one BLAS
    thread; stale runs of dead workers are re-enqueued by every worker.
    """
    from service.settings import get_settings
    from worker.local import exec_worker

    get_settings()  # a bad setting fails here, in one line, not in every child
    level = loglevel.upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise typer.BadParameter(f"expected DEBUG, INFO, WARNING or ERROR, got {loglevel!r}")
    exec_worker(concurrency=concurrency or os.cpu_count() or 1, loglevel=level, hostname=hostname)


def cancel(
    experiment: Annotated[str, typer.Argument(help="Experiment name (or id).")],
) -> None:
    """Cancel an experiment: queued runs never start; running runs stop at their next heartbeat.

    Cancelled runs keep the metrics written so far.
    """
    from service.db import session_scope
    from service.runs import cancel_experiment, get_experiment

    with session_scope() as session:
        exp = get_experiment(session=session, name=experiment)
        result = cancel_experiment(session=session, experiment_id=exp.id)
    console.print(
        f"{exp.name}: {result.cancelled} queued run(s) cancelled, "
        f"{result.requested} running run(s) asked to stop"
    )


def retry(
    experiment: Annotated[str, typer.Argument(help="Experiment name (or id).")],
    failed: Annotated[
        bool, typer.Option("--failed", help="Start failed runs over (metrics and weights dropped).")
    ] = False,
    diverged: Annotated[
        bool, typer.Option("--diverged", help="Start diverged runs over as well.")
    ] = False,
    stale: Annotated[
        bool,
        typer.Option(
            "--stale", help="Re-enqueue running runs whose heartbeat expired (they resume)."
        ),
    ] = False,
) -> None:
    """Re-enqueue runs of an experiment; queued runs whose message was never sent are sent too.

    A stale run is one whose heartbeat is older than MLPQ_STALE_SECONDS: its
    worker died and its message may be lost. Running workers do this on their
    own every few seconds; --stale does it now.
    """
    from service.celery_app import make_app
    from service.db import get_engine, session_scope
    from service.models import RunStatus
    from service.runs import get_experiment, reap_stale, reset_finished
    from service.settings import get_settings
    from service.submit import publish_pending

    settings = get_settings()
    statuses = [s for s, on in ((RunStatus.failed, failed), (RunStatus.diverged, diverged)) if on]
    with session_scope() as session:
        exp = get_experiment(session=session, name=experiment)
        restarted = reset_finished(session=session, experiment_id=exp.id, statuses=statuses)
        reaped = (
            reap_stale(
                session=session,
                stale_seconds=settings.stale_seconds,
                max_attempts=settings.max_attempts,
                experiment_id=exp.id,
            )
            if stale
            else None
        )
    sent = publish_pending(app=make_app(settings), engine=get_engine(), experiment_id=exp.id)
    parts = [f"{len(restarted)} finished run(s) restarted"]
    if reaped is not None:
        parts.append(f"{len(reaped.requeued)} stale run(s) re-enqueued")
        if reaped.failed:
            parts.append(f"{reaped.failed} stale run(s) out of attempts marked failed")
        if reaped.cancelled:
            parts.append(f"{reaped.cancelled} stale cancelled run(s) closed")
    parts.append(f"{sent} message(s) published")
    console.print(f"{exp.name}: " + ", ".join(parts))


def register(app: typer.Typer) -> None:
    """Add ``worker``, ``run``, ``cancel`` and ``retry`` to ``app``."""
    app.command("worker")(worker)
    app.command("cancel")(cancel)
    app.command("retry")(retry)
