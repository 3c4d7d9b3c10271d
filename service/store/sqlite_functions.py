"""SQL functions PostgreSQL has and SQLite lacks, registered on every SQLite connection.

``stddev``/``variance`` (sample, as PostgreSQL's), ``stddev_samp``, ``var_samp``,
``stddev_pop``, ``var_pop``: so "mean ± std over seeds" is the same plain SQL on
both stores. Welford's update keeps them accurate for values far from zero.
"""

from __future__ import annotations

import math
import sqlite3


class _Moments:
    """Running count, mean and sum of squared deviations (Welford); NULLs are skipped."""

    population = False
    root = False

    def __init__(self) -> None:
        self.n = 0
        self.mean = 0.0
        self.m2 = 0.0

    def step(self, value: object) -> None:
        if value is None:
            return
        x = float(value)  # type: ignore[arg-type]
        self.n += 1
        delta = x - self.mean
        self.mean += delta / self.n
        self.m2 += delta * (x - self.mean)

    def finalize(self) -> float | None:
        dof = self.n if self.population else self.n - 1
        if dof <= 0:
            return None  # PostgreSQL: NULL for no rows, and for one row in the sample forms
        variance = self.m2 / dof
        return math.sqrt(variance) if self.root else variance


def _kind(name: str, *, population: bool, root: bool) -> type[_Moments]:
    return type(name, (_Moments,), {"population": population, "root": root})


AGGREGATES: dict[str, type[_Moments]] = {
    "stddev": _kind("StdDev", population=False, root=True),
    "stddev_samp": _kind("StdDevSamp", population=False, root=True),
    "stddev_pop": _kind("StdDevPop", population=True, root=True),
    "variance": _kind("Variance", population=False, root=False),
    "var_samp": _kind("VarSamp", population=False, root=False),
    "var_pop": _kind("VarPop", population=True, root=False),
}


def register(conn: sqlite3.Connection) -> None:
    """Add the aggregates to ``conn`` (deterministic: usable in views and indexes)."""
    for name, aggregate in AGGREGATES.items():
        conn.create_aggregate(name, 1, aggregate)
