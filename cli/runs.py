"""``mlpq worker``, ``mlpq run``, ``mlpq cancel``, ``mlpq retry``: running runs."""

from __future__ import annotations

import inspect
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console

from cli.submit import submit as submit_command

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from worker.local import LocalWorkers

console = Console()
err_console = Console(stderr=True)

#: Polling of the store while a grid trains: every POLL_MIN_SECONDS at first (a short
#: grid's end is seen at once), slowing to POLL_MAX_SECONDS over the first seconds. On
#: SQLite it looks for a commit every POLL_MIN_SECONDS and counts only after one; in a
#: grid's tail at once (``_await_change``).
POLL_MIN_SECONDS, POLL_MAX_SECONDS = 0.02, 0.25
#: Seconds between two top-ups of the broker's window by `mlpq run` (the workers top it
#: up as they finish messages; this keeps a grid going if they cannot).
FEED_SECONDS = 0.5
# Seconds local workers get to hand back their runs in progress (or finish the last ones
# of other experiments) when `mlpq run` stops them with work pending.
INTERRUPT_GRACE_SECONDS = 10.0


def worker(
    concurrency: Annotated[
        int | None,
        typer.Option("--concurrency", "-c", min=1, help="Worker processes (default: CPU count)."),
    ] = None,
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

    Example:

        $ mlpq worker --concurrency 2
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

    Example:

        $ mlpq cancel quickstart
    """
    from service.store import cancel_experiment, get_experiment, session_scope

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
    queued: Annotated[
        bool,
        typer.Option(
            "--queued",
            help="Send the messages of all queued runs again (the broker lost them, e.g. "
            "Redis restarted without persistence); a run is still trained once.",
        ),
    ] = False,
) -> None:
    """Re-enqueue runs of an experiment; queued runs whose message was never sent are sent too.

    A stale run is one whose heartbeat is older than MLPQ_STALE_SECONDS: its
    worker died and its message may be lost. Running workers do this on their
    own every few seconds; --stale does it now.

    Example:

        $ mlpq retry quickstart --stale
    """
    from service.queue import feed, make_app
    from service.settings import get_settings
    from service.store import (
        RunStatus,
        get_engine,
        get_experiment,
        mark_unsent,
        reap_stale,
        reset_finished,
        session_scope,
    )

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
        if queued:
            mark_unsent(session=session, experiment_id=exp.id)
    sent = feed(make_app(settings), get_engine(), block=True)
    parts = [f"{len(restarted)} finished run(s) restarted"]
    if reaped is not None:
        parts.append(f"{len(reaped.requeued)} stale run(s) re-enqueued")
        if reaped.failed:
            parts.append(f"{reaped.failed} stale run(s) out of attempts marked failed")
        if reaped.cancelled:
            parts.append(f"{reaped.cancelled} stale cancelled run(s) closed")
    parts.append(f"{sent} run(s) sent to the broker (the window; the rest follow as runs finish)")
    console.print(f"{exp.name}: " + ", ".join(parts))


def run(**options: Any) -> None:
    """Submit a grid and train it here, showing progress, then print the leaderboard.

    Takes the grid exactly as `mlpq submit` does (a file or inline options). With
    no MLPQ_BROKER_URL nothing else is needed: local Celery worker processes
    train the runs from the embedded queue into the SQLite store. With a broker,
    remote workers help the local ones (or do it all with --no-local-workers).
    Waits until every run of the experiment is finished, then stops the local
    workers. Exit code 0 when the grid finished, whatever its runs' outcomes
    (failed runs are listed with their error); 130 when interrupted.

    Example:

        $ mlpq run examples/quickstart.yaml
    """
    from service.exceptions import GridError
    from service.results import read_engine
    from service.settings import get_settings
    from service.store import get_engine

    concurrency = options.pop("concurrency") or os.cpu_count() or 1
    local = options.pop("local_workers")
    top = options.pop("top")
    if options["dry_run"]:
        submit_command(**options)
        return
    settings = get_settings()
    if settings.embedded_broker and not _new_embedded_store(settings):
        # Before any worker consumes: what a stopped local worker took with it is re-sent.
        _recover_embedded_queue(get_engine())
    from cli.interrupts import interrupts
    from cli.launch import collector_back_on, take

    workers: LocalWorkers | None = None
    reader: Engine | None = None
    try:
        # SIGTERM (a CI timeout, `kill`) unwinds like Ctrl-C, so the workers are stopped below.
        with interrupts(terminate=True):
            # The workers start first: their second of start-up overlaps creating the store
            # and submitting (the store's migration takes a lock; whoever comes second finds
            # it done).
            early = take(concurrency, settings.home) if local else None  # started by cli.launch
            home_existed = early[1] if early else settings.home.exists()
            if early:
                workers = early[0]
            elif local:
                workers = _start_local_workers(concurrency, settings)
            try:
                report = submit_command(**options)
            except GridError:
                # A refused grid leaves nothing behind (nothing was stored): the workers
                # started for it go at once, with the folder they made if it is new.
                if workers is not None:
                    workers.kill()
                    workers = None
                if not home_existed:
                    shutil.rmtree(settings.home, ignore_errors=True)
                raise
            reader = read_engine()
            collector_back_on()  # off since the command started (cli.launch.entry)
            if workers is not None:  # said once the grid is accepted: a bad grid gets one line
                err_console.print(
                    f"{concurrency} local worker process(es); log: {workers.log_path}",
                    highlight=False,
                )
            if not local and settings.embedded_broker:
                err_console.print(
                    "--no-local-workers with the embedded queue: runs start only when "
                    "`mlpq worker` runs on this machine with the same MLPQ_HOME",
                    highlight=False,
                )
            _wait(reader, report.experiment_id, workers, feeder=_feeder(settings))
            if workers is not None:
                _stop_local_workers(workers, reader)  # before the results: nothing left to wait for
                workers = None
            from cli.experiments import print_leaderboard

            print_leaderboard(reader, report.experiment, limit=top)
    except KeyboardInterrupt:
        err_console.print(
            "interrupted: stopping local workers; runs in progress are handed back and stay "
            "queued (`mlpq run` again or `mlpq worker` resumes them)",
            highlight=False,
        )
        raise typer.Exit(code=130) from None
    finally:
        if workers is not None:
            _stop_local_workers(workers, reader or read_engine())


def _new_embedded_store(settings: Any) -> bool:
    """Whether the store is a SQLite file that does not exist yet (nothing to recover)."""
    url = str(settings.database_url)
    if not url.startswith("sqlite:///"):
        return False
    path = url.removeprefix("sqlite:///").split("?", 1)[0]
    return bool(path) and not os.path.exists(path)


def _start_local_workers(concurrency: int, settings: Any) -> LocalWorkers:
    from worker.local import LocalWorkers, log_file

    return LocalWorkers(concurrency=concurrency, log_path=log_file(settings.home))


def _stop_local_workers(workers: LocalWorkers, reader: Engine) -> None:
    """Stop at once when the store has nothing queued or running; else hand runs back."""
    from sqlalchemy import text

    try:
        with reader.connect() as conn:
            pending = conn.execute(
                text("SELECT count(*) FROM runs WHERE status IN ('queued', 'running')")
            ).scalar_one()
    except Exception:
        pending = 1  # cannot tell: take the careful way
    if not pending:
        # No run in flight and none to take: nothing to hand back or to restore.
        workers.kill()
        return
    with err_console.status("stopping local workers (handing back runs in progress)"):
        workers.stop(timeout=INTERRUPT_GRACE_SECONDS)


def _recover_embedded_queue(engine: Engine) -> None:
    """Re-send what a stopped local worker took with it.

    Runs it was training (its process is gone) go back to the queue at once, and
    queued runs whose message the embedded queue no longer holds (a worker had
    fetched it) get a new one; a second message for a run is dropped by the claim.
    """
    from service.queue import feed, make_app, mark_for_resend
    from service.settings import get_settings
    from service.store import queued_published, requeue_dead_owners, session_scope
    from worker.local import embedded_queue_run_ids

    settings = get_settings()
    with session_scope(engine) as session:
        dead = requeue_dead_owners(session=session)
        queued = queued_published(session=session)
        gone = sorted(set(queued) - embedded_queue_run_ids(settings))
        mark_for_resend(session.connection(), gone)
    lost = sorted(set(dead) | set(gone))
    if lost:
        feed(make_app(settings), engine, block=True)
        err_console.print(
            f"{len(lost)} run(s) interrupted by a stopped local worker: queued again",
            highlight=False,
        )


def _feeder(settings: Any) -> Callable[[], object]:
    """Top the broker's window up from the store (beside the workers, which do it too)."""
    from service.queue import feed_quietly, make_app
    from service.store import get_engine

    app, engine = make_app(settings), get_engine()
    return lambda: feed_quietly(app, engine)


def _wait(
    engine: Engine,
    experiment_id: int,
    workers: LocalWorkers | None,
    feeder: Callable[[], object] | None = None,
) -> None:
    """Poll the experiment's counts until every run is finished, with a progress bar.

    ``feeder`` is called every ``FEED_SECONDS`` while runs are left.
    """
    from sqlalchemy.orm import Session

    from service.store import RunStatus, status_counts

    def counts() -> dict[RunStatus, int]:
        # A read-only engine: polling never takes the store's write lock from the workers.
        with Session(engine) as session:
            return status_counts(session=session, experiment_id=experiment_id)

    with _change_watch(engine) as changed:
        _follow(counts, changed, workers, feeder)


def _follow(
    counts: Callable[[], dict[Any, int]],
    changed: Callable[[], bool] | None,
    workers: LocalWorkers | None,
    feeder: Callable[[], object] | None,
) -> None:
    """``_wait``'s loop: ``counts`` after each change ``changed`` sees (None: each poll)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    from cli.interrupts import check_interrupt
    from service.exceptions import MlpqError
    from service.store import FINISHED, RunStatus

    first = counts()
    total = sum(first.values())
    done_at_start = sum(first[s] for s in FINISHED)
    start = time.monotonic()
    progress = Progress(
        BarColumn(bar_width=24),
        MofNCompleteColumn(),
        TextColumn("{task.fields[detail]}"),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=err_console,
        disable=not err_console.is_terminal,
    )
    from rich.text import Text

    from cli.output import PlainProgress

    plain = PlainProgress(enabled=progress.disable)
    with progress:
        task = progress.add_task("runs", total=total, completed=done_at_start, detail="")
        current = first
        fed_at = 0.0
        while True:
            done = sum(current[s] for s in FINISHED)
            rate = (done - done_at_start) / max(time.monotonic() - start, 1e-9)
            parts = [f"{current[RunStatus.running]} running"]
            if current[RunStatus.failed]:
                parts.append(f"[red]{current[RunStatus.failed]} failed[/red]")
            if current[RunStatus.diverged]:
                parts.append(f"[yellow]{current[RunStatus.diverged]} diverged[/yellow]")
            parts.append(f"{rate:.1f} runs/s")
            detail = ", ".join(parts)
            progress.update(task, completed=done, total=sum(current.values()), detail=detail)
            plain.update(done, sum(current.values()), Text.from_markup(detail).plain)
            if done == sum(current.values()):
                break
            if workers is not None and not workers.alive():
                err_console.print(workers.log_tail(), highlight=False, markup=False)
                raise MlpqError(
                    f"run: the local workers exited (code {workers.proc.returncode}) with "
                    f"{sum(current.values()) - done} run(s) unfinished; log: {workers.log_path}"
                )
            elapsed = time.monotonic() - start
            if feeder is not None and elapsed >= fed_at + FEED_SECONDS:
                feeder()
                fed_at = elapsed
            interval = min(POLL_MAX_SECONDS, POLL_MIN_SECONDS + elapsed / 20)
            if changed is None:
                time.sleep(interval)
                check_interrupt()  # a signal whose KeyboardInterrupt a callback swallowed
            else:
                _await_change(changed, interval, tail=not current[RunStatus.queued])
            current = counts()
    if not progress.disable:
        return
    # No terminal: one summary line instead of the bar.
    elapsed = time.monotonic() - start
    print(f"{total} run(s) finished in {elapsed:.1f}s", file=sys.stderr)


def _await_change(changed: Callable[[], bool], interval: float, *, tail: bool) -> None:
    """Wait until the runs are worth counting again (SQLite, see ``_change_watch``).

    In a grid's tail (nothing queued) at the first commit seen: it may be the last
    result. Before, at the first commit after ``interval``, the pace counts kept
    without the watch: counting a big experiment's runs takes tens of milliseconds,
    and its workers commit all the time. With no commit at all, after
    ``interval + POLL_MAX_SECONDS`` (the caller checks on its workers).
    """
    from cli.interrupts import check_interrupt

    due = time.monotonic() + interval
    seen = False
    while True:
        time.sleep(POLL_MIN_SECONDS)
        check_interrupt()  # a signal whose KeyboardInterrupt a callback swallowed
        seen = changed() or seen
        now = time.monotonic()
        if (seen and (tail or now >= due)) or now >= due + POLL_MAX_SECONDS:
            return


@contextmanager
def _change_watch(engine: Engine) -> Iterator[Callable[[], bool] | None]:
    """On SQLite, a test of whether anyone committed since it was last called; else None.

    ``PRAGMA data_version`` on one connection held open changes when another
    connection commits: a look costs microseconds, where counting the runs costs a
    millisecond or two (tens for a big experiment). So `mlpq run` looks every
    POLL_MIN_SECONDS, counts only after a change, and sees a grid's last result at
    once, not at its next count.
    """
    if engine.dialect.name != "sqlite":
        yield None
        return
    raw = engine.raw_connection()
    try:
        cursor = raw.cursor()
        last = cursor.execute("PRAGMA data_version").fetchone()[0]

        def changed() -> bool:
            nonlocal last
            version = cursor.execute("PRAGMA data_version").fetchone()[0]
            if version == last:
                return False
            last = version
            return True

        yield changed
    finally:
        raw.close()


def _run_signature() -> inspect.Signature:
    # `mlpq run` takes every option of `mlpq submit` (one grid syntax), plus its own.
    own = [
        inspect.Parameter(
            "concurrency",
            inspect.Parameter.KEYWORD_ONLY,
            default=0,
            annotation=Annotated[
                int,
                typer.Option(
                    "--concurrency", "-c", min=0, help="Local worker processes (default: CPUs)."
                ),
            ],
        ),
        inspect.Parameter(
            "local_workers",
            inspect.Parameter.KEYWORD_ONLY,
            default=True,
            annotation=Annotated[
                bool,
                typer.Option(
                    "--local-workers/--no-local-workers",
                    help="Start worker processes here (off: remote workers do everything).",
                ),
            ],
        ),
        inspect.Parameter(
            "top",
            inspect.Parameter.KEYWORD_ONLY,
            default=10,
            annotation=Annotated[int, typer.Option(min=1, help="Runs in the final leaderboard.")],
        ),
    ]
    params = list(inspect.signature(submit_command, eval_str=True).parameters.values())
    return inspect.Signature(params + own, return_annotation=None)


run.__signature__ = _run_signature()  # type: ignore[attr-defined]
run.__annotations__ = {p.name: p.annotation for p in run.__signature__.parameters.values()}


def register(app: typer.Typer) -> None:
    """Add ``worker``, ``run``, ``cancel`` and ``retry`` to ``app``."""
    app.command("worker")(worker)
    app.command("run")(run)
    app.command("cancel")(cancel)
    app.command("retry")(retry)
