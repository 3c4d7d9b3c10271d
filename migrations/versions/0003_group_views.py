"""View run_groups: the runs of one configuration over its seeds, mean and spread of the results.

One row per experiment and configuration (every hyperparameter but the seed),
over the runs that succeeded: n_runs, and for each main metric its mean
(``mean_<metric>``) and its sample variance (``var_<metric>``, NULL for a single
run). The variance is computed with portable SQL, ``(sum(x*x) - sum(x)^2/n) / (n-1)``,
because SQLite has no stddev() and its sqrt() depends on how it was compiled;
the standard deviation is ``sqrt(var_<metric>)`` (``mlpq top --group-by`` takes
it in Python, so the view works as it is from the sqlite3 shell).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-04
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Spelled out here (not imported) so this revision stays what it was.
_KEYS = (
    "experiment_id, experiment, dataset, optimizer, hidden, activation, max_steps, "
    "learning_rate, batch_size, momentum, step_size, temperature, candidates"
)
_METRICS = (
    "best_val_accuracy",
    "final_val_accuracy",
    "best_val_loss",
    "final_val_loss",
    "best_val_r2",
    "final_val_r2",
    "duration_seconds",
)


def _aggregates(metric: str) -> str:
    return (
        f"AVG({metric}) AS mean_{metric},\n"
        f"    CASE WHEN COUNT({metric}) > 1 THEN\n"
        f"        (SUM({metric} * {metric}) - SUM({metric}) * SUM({metric}) / COUNT({metric}))\n"
        f"        / (COUNT({metric}) - 1) END AS var_{metric}"
    )


_SEP = ",\n    "
RUN_GROUPS = f"""
CREATE VIEW run_groups AS
SELECT
    {_KEYS},
    COUNT(*) AS n_runs,
    {_SEP.join(_aggregates(m) for m in _METRICS)}
FROM run_summary
WHERE status = 'succeeded'
GROUP BY {_KEYS}
"""


def upgrade() -> None:
    op.execute(RUN_GROUPS)


def downgrade() -> None:
    op.execute("DROP VIEW IF EXISTS run_groups")
