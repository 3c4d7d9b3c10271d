"""The Celery tasks. Thin, like web views: take an id, re-fetch state, call the service.

Every message carries only a run id, or a pack of them (short runs share a message,
``service.queue.packing``); everything else is read from SQL, so a
message delivered twice, late, or after a cancel does no harm (the claim in
``service.store.runs.claim_run`` decides).
"""

from __future__ import annotations

import logging
import reprlib
from typing import Any

from celery import Task

from service.queue import REAP_TASK, TRAIN_TASK
from service.settings import get_settings
from worker import handback
from worker.app import app
from worker.training import HANDED_BACK, connection_lost, execute_runs

log = logging.getLogger("mlpq.worker")

#: Name of the no-op task (health checks, and the reference rate in bench/throughput.py).
PING_TASK = "mlpq.ping"
#: Seconds before a message whose run could not be claimed (store unreachable) is tried again.
STORE_RETRY_SECONDS = 5


#: Run ids a message may carry: the store's ids are 32-bit.
MAX_RUN_ID = 2**31 - 1
_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxtuple, _REPR.maxdict = 2, 4, 4, 4
_REPR.maxstring = _REPR.maxlong = _REPR.maxother = 40


#: Most run ids one message may carry as a pack.
MAX_PACK = 10_000


def parse_run_ids(args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[int] | None:
    """The run ids a train message carries: one id, or a list of them (a pack).

    None when the payload is anything else: not exactly one argument, keyword
    arguments, an empty or oversized list, or an id that is not an integer from 1
    to ``MAX_RUN_ID`` (bools, floats, strings, nested lists, 2**70 all fail).
    """
    if kwargs or len(args) != 1:
        return None
    value = args[0]
    ids = value if isinstance(value, list) else [value]
    if not 1 <= len(ids) <= MAX_PACK:
        return None
    for run_id in ids:
        if isinstance(run_id, bool) or not isinstance(run_id, int):
            return None
        if not 1 <= run_id <= MAX_RUN_ID:
            return None
    return ids


@app.task(name=TRAIN_TASK, bind=True, ignore_result=True, max_retries=None, typing=False)
def train(self: Task, *args: Any, **kwargs: Any) -> str:
    """Train the run, or each run of the pack, the message carries (claim, train, store).

    The runs of a pack are claimed together, in one statement, and each is trained
    and finished as its own: a pack delivered again does only what is left (the
    claims of finished runs are refused), and one run's failure is that run's alone.
    A malformed payload (not exactly one run id or one list of them, integers from 1
    to 2**31 - 1) is dropped with one log line, and acknowledged: no retry could make
    it valid. Returns what became of each run.
    """
    ids = parse_run_ids(args, kwargs)
    if ids is None:
        log.error(
            "train: message dropped: expected a run id or a list of run ids (integers from "
            "1 to %d), got args=%s kwargs=%s",
            MAX_RUN_ID,
            _REPR.repr(args),
            _REPR.repr(kwargs),
        )
        return "dropped"
    settings = get_settings()
    with handback.training():
        try:
            outcomes = execute_runs(run_ids=ids, settings=settings)
        except Exception as exc:
            if not connection_lost(exc):
                raise
            # The store is unreachable for the claim: nothing is claimed, and acking would
            # lose the runs' only message, so it comes back later (a run's own failures
            # never reach here).
            first = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
            log.warning(
                "run %s: store unreachable (%s); trying again in %ds",
                ids[0] if len(ids) == 1 else ids,
                first,
                STORE_RETRY_SECONDS,
            )
            raise self.retry(
                args=(ids if len(ids) > 1 else ids[0],), countdown=STORE_RETRY_SECONDS
            ) from None
        done = len(outcomes)
        if outcomes and outcomes[-1].status == HANDED_BACK:
            done -= 1  # queued again, to resume from its checkpoint
        if done < len(ids):
            # Told to stop: what this process will not train goes back in the window (the
            # broker restores the unacked message too; a second one is a no-op claim).
            _send_again(ids[done:])
        else:
            _top_up()
    statuses = [outcome.status for outcome in outcomes]
    return statuses[0] if len(ids) == 1 and statuses else ",".join(statuses)


def _top_up() -> None:
    """Top the broker's window up from the store (unless another process is at it)."""
    from service.queue import feed_quietly
    from service.store import get_engine
    from worker.training import kept_connection

    engine = get_engine()
    with kept_connection(engine) as conn:
        feed_quietly(app, engine, conn=conn)


def _send_again(run_ids: list[int]) -> None:
    """Put back in the window the runs of a pack this process will not train (told to stop)."""
    from service.queue import feed_quietly, mark_for_resend
    from service.store import get_engine
    from worker.training import kept_connection

    engine = get_engine()
    with kept_connection(engine) as conn:
        # The handed-back run is unsent already; its pack-mates are marked now.
        mark_for_resend(conn, run_ids)
        if conn.in_transaction():
            conn.commit()
        feed_quietly(app, engine, block=True, conn=conn)


@app.task(name=REAP_TASK, ignore_result=True)
def reap_stale() -> list[int]:
    """Re-enqueue runs whose worker died (the worker's reaper thread does this on its own)."""
    from worker.reaper import reap_once

    return reap_once(app)


@app.task(name=PING_TASK, ignore_result=True)
def ping() -> None:
    """Do nothing."""
