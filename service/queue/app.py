"""The Celery app object and its configuration, and nothing else.

Tasks live in ``worker/tasks.py``; the names of the queue and the task are
defined here once so the submitter (which never imports worker code) and the
worker agree. No result backend: every run's state lives in SQL.
"""

from __future__ import annotations

from celery import Celery

from service.queue.names import QUEUE, REAP_TASK, TRAIN_TASK
from service.settings import Settings, get_settings


def broker_url(settings: Settings) -> str:
    """The broker URL, ``filesystem://`` for the embedded queue."""
    return settings.broker_url or "filesystem://"


def celery_config(settings: Settings) -> dict[str, object]:
    """Celery settings for ``settings`` (see DESIGN.md, "Celery settings that matter")."""
    # The broker must not redeliver a message while its task may still be running:
    # its visibility timeout outlasts the hard time limit.
    visibility_timeout = settings.task_time_limit + 600
    transport_options: dict[str, object] = {"visibility_timeout": visibility_timeout}
    if settings.embedded_broker:
        queue_dir = settings.queue_dir.resolve()
        for sub in ("out", "processed", "control"):
            (queue_dir / sub).mkdir(parents=True, exist_ok=True)
        transport_options = {
            "data_folder_in": str(queue_dir / "out"),
            "data_folder_out": str(queue_dir / "out"),
            "processed_folder": str(queue_dir / "processed"),
            # Exchange bindings; kombu's default is ./control in the current directory.
            "control_folder": str(queue_dir / "control"),
            "store_processed": False,
            "polling_interval": settings.polling_interval,
        }
    extra: dict[str, object] = {}
    if settings.embedded_broker:
        # kombu's filesystem transport, with each message written whole before it is seen.
        extra["broker_transport"] = "service.queue.fs_transport:Transport"
    return {
        **extra,
        "broker_url": broker_url(settings),
        "broker_transport_options": transport_options,
        "broker_connection_retry_on_startup": True,
        "result_backend": None,
        "task_ignore_result": True,
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "task_default_queue": QUEUE,
        "task_routes": {TRAIN_TASK: {"queue": QUEUE}, REAP_TASK: {"queue": QUEUE}},
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_acks_on_failure_or_timeout": True,
        "task_time_limit": settings.task_time_limit,
        # The embedded queue is a folder its workers poll: holding one message per
        # process, a process that finished one waited for the next poll, 4-16 ms between
        # two runs, idle. One more in hand closes the gap; one machine consumes that
        # queue, and what a stopped worker held is sent again (see cli.runs). A broker
        # shared by many workers keeps one, so none hoards what another could start.
        "worker_prefetch_multiplier": 2 if settings.embedded_broker else 1,
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        "worker_max_tasks_per_child": settings.worker_max_tasks_per_child,
        "worker_hijack_root_logger": False,
        "worker_soft_shutdown_timeout": settings.worker_soft_shutdown_seconds,
        "worker_send_task_events": settings.task_events,
        "task_send_sent_event": settings.task_events,
        "broker_pool_limit": 10,
        # Ours, read by service.queue.enqueue.publish_runs: how runs are packed into messages.
        "mlpq_pack_seconds": settings.pack_seconds,
        # Ours, read by service.queue.window.feed: messages the broker holds at most.
        "mlpq_window": settings.window,
    }


def make_app(settings: Settings | None = None) -> Celery:
    """A Celery app configured from ``settings`` (default: the environment's)."""
    settings = settings or get_settings()
    app = Celery("mlpq", set_as_current=False)
    app.conf.update(celery_config(settings))
    return app
