"""The queue: the Celery app and its settings, and submitting runs to it.

Owns ``app`` (the Celery app object, the queue and task names the submitter and
the workers share) and ``enqueue`` (store an expanded grid's runs, dedupe by
config hash, publish messages in batches) and ``window`` (the broker holds the next
few messages, topped up from the store as runs finish). Uses the grids (what to run)
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
            "publish_packs",
            "publish_runs",
            "submit",
        ),
        "window": ("feed", "feed_quietly", "lost_runs", "mark_for_resend", "queue_size"),
    },
)
