"""The queue: the Celery app and its settings, and submitting runs to it.

Owns ``app`` (the Celery app object, the queue and task names the submitter and
the workers share) and ``enqueue`` (store an expanded grid's runs, dedupe by
config hash, publish their messages in batches). Uses the grids (what to run)
and the store (where runs live); neither of them knows the queue.
"""

from service.queue.app import QUEUE, REAP_TASK, TRAIN_TASK, make_app
from service.queue.enqueue import (
    SubmitReport,
    pending_ids,
    publish_pending,
    publish_runs,
    submit,
)

__all__ = [
    "QUEUE",
    "REAP_TASK",
    "TRAIN_TASK",
    "SubmitReport",
    "make_app",
    "pending_ids",
    "publish_pending",
    "publish_runs",
    "submit",
]
