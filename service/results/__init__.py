"""Results: the read side, the questions researchers ask of a finished (or running) grid.

Owns the queries behind ``mlpq ls``, ``mlpq show`` and the leaderboards
(``queries``), each one plain SQL over the store's tables and views that works
as it is in ``mlpq sql`` on SQLite and PostgreSQL; learning curves over seeds
as data (``curve_groups``), their figures for ``mlpq plot`` (``plots``, matplotlib
imported only when drawing), the HTML page of ``mlpq report`` (``report``) and the
streamed file exports of ``mlpq export`` (``export``). Reads the store; never writes
it, and knows nothing of grids or the queue.
"""

from service._exports import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(
    __name__,
    globals(),
    {
        "export": ("ExportError", "ExportResult", "export_experiment"),
        "plots": ("PlotError", "learning_curves"),
        "report": ("build_report",),
        "reader": ("QueryError", "read_engine", "read_query", "reader_url"),
        "queries": (
            "GROUPABLE",
            "RANKABLE",
            "curves",
            "dataset_labels",
            "experiment_datasets",
            "experiment_progress",
            "group_leaderboard",
            "group_leaderboard_sql",
            "leaderboard",
            "leaderboard_sql",
            "loss_curve",
        ),
    },
)
