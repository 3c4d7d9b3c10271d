"""The queue: the Celery app and its settings, and submitting runs to it.

Owns ``app`` (the Celery app object, the queue and task names the submitter and
the workers share) and ``enqueue`` (store an expanded grid's runs, dedupe by
config hash, publish their messages in batches). Uses the grids (what to run)
and the store (where runs live); neither of them knows the queue.
"""

from service._exports import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(
    __name__,
    globals(),
    {
        "names": ("QUEUE", "REAP_TASK", "TRAIN_TASK"),
        "app": ("make_app",),
        "enqueue": (
            "SubmitReport",
            "pending_ids",
            "publish_pending",
            "publish_runs",
            "submit",
        ),
    },
)
