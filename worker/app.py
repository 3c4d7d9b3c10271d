"""The worker's Celery app: ``celery -A worker.app worker`` (or ``mlpq worker``).

This module holds the app and the worker process hooks; the tasks live in
``worker.tasks``. One BLAS thread per worker process: a run is a small GEMM
loop, and N prefork children each spawning a thread per core would oversubscribe
the machine. The variables must be set before NumPy is first imported, which
importing this module (celery's ``-A``) does before any task module.
"""

from __future__ import annotations

import os
from pathlib import Path

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

from celery.signals import worker_init, worker_process_init  # noqa: E402

from service.queue import make_app  # noqa: E402
from worker.reaper import Reaper  # noqa: E402

app = make_app()
app.conf.include = ["worker.tasks"]
app.steps["worker"].add(Reaper)
# An undecodable message is dropped with one log line, not a CRITICAL traceback.
app.conf.worker_consumer = "worker.consumer:QuietConsumer"


@worker_init.connect
def _preload(**_: object) -> None:
    # Import in the main process what every child needs but imports lazily (the
    # store's database driver and SQLAlchemy dialect, the ingest module, NumPy's
    # random module, the window every child tops up after its first message), so
    # no child, the first ones or one forked to replace one that reached
    # worker_max_tasks_per_child, imports them on its way to finishing a message.
    import numpy.random  # noqa: F401
    from sqlalchemy.engine import make_url

    import service.queue.window
    import service.store.ingest  # noqa: F401
    from service.settings import get_settings
    from service.store import get_engine

    url = make_url(get_settings().database_url)
    url.get_dialect().import_dbapi()
    # An embedded SQLite store is checked (and migrated) once here, not in every child;
    # one that does not exist yet is left to whoever stores the first runs.
    if url.get_backend_name() != "sqlite" or Path(url.database or "").exists():
        get_engine(url.render_as_string(hide_password=False))


@worker_process_init.connect
def _fresh_connections_in_child(**_: object) -> None:
    # A forked child must not use the pooled connections it inherited from the
    # parent (the reaper's): drop them without closing the parent's sockets.
    from service.store import dispose_engines

    dispose_engines()
