"""The SQL store: engines, models, migrations, metric and artifact ingest, the run lifecycle.

Owns everything that reads or writes the tables on SQLite and PostgreSQL alike:
``db`` (engines and sessions), ``models`` (the SQLAlchemy tables), ``migrate``
(Alembic in code), ``ingest`` (batched metric rows, npz artifacts, stored
datasets) and ``runs`` (claim, heartbeat, checkpoint, finish, cancel, reset,
reap). Knows nothing of grids or the queue: callers hand it rows and ids.
"""

from service._exports import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(
    __name__,
    globals(),
    {
        "db": (
            "dispose_engines",
            "get_engine",
            "make_engine",
            "session_scope",
        ),
        "ingest": (
            "METRIC_COLUMNS",
            "load_artifact",
            "load_dataset_bytes",
            "save_artifact",
            "store_dataset",
            "write_metric_rows",
            "write_metrics",
        ),
        "migrate": (
            "VIEWS",
            "current_revision",
            "downgrade",
            "head_revision",
            "upgrade",
        ),
        "models": (
            "FINISHED",
            "Artifact",
            "ArtifactKind",
            "Base",
            "Dataset",
            "Experiment",
            "Run",
            "RunStatus",
            "metrics",
            "utcnow",
        ),
        "runs": (
            "Beat",
            "Claim",
            "Refusal",
            "cancel_experiment",
            "claim_run",
            "claim_runs",
            "finish_run",
            "finish_runs",
            "get_experiment",
            "heartbeat",
            "mark_unsent",
            "prepare_resume",
            "queued_published",
            "reap_stale",
            "record_resume",
            "refresh_claims",
            "release_claims",
            "release_run",
            "requeue_dead_owners",
            "reset_finished",
            "reset_runs",
            "save_progress",
            "status_counts",
            "worker_identity",
        ),
    },
)
