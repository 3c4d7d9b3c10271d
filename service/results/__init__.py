"""Results: the read side, the questions researchers ask of a finished (or running) grid.

Owns the queries behind ``mlpq ls``, ``mlpq show`` and the leaderboards
(``queries``), each one plain SQL over the store's tables and views that works
as it is in ``mlpq sql`` on SQLite and PostgreSQL. Reads the store; never
writes it, and knows nothing of grids or the queue.
"""

from service.results.queries import (
    GROUPABLE,
    RANKABLE,
    dataset_labels,
    experiment_datasets,
    experiment_progress,
    group_leaderboard,
    group_leaderboard_sql,
    leaderboard,
    leaderboard_sql,
    loss_curve,
)

__all__ = [
    "GROUPABLE",
    "RANKABLE",
    "dataset_labels",
    "experiment_datasets",
    "experiment_progress",
    "group_leaderboard",
    "group_leaderboard_sql",
    "leaderboard",
    "leaderboard_sql",
    "loss_curve",
]
