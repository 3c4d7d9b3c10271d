"""Checking a grid's values one at a time against ``engine.TrainConfig``.

Each distinct (optimizer, key, value) is checked once and turned into its
canonical form (what ``TrainConfig.to_dict()`` gives), so expanding a big
product never validates the same value twice.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any

from engine import DATASETS, ConfigError, TrainConfig
from service.grids.parsed import GridPart, ParsedGrid, Path_
from service.grids.spec import Axis, hidden_label
from service.settings import get_settings


@dataclass
class AxisAt:
    """An axis and where the grid wrote it."""

    key: str
    axis: Axis
    path: Path_


class Values(GridPart):
    """Checks values and axes of a grid alone; caches each value's canonical form."""

    def __init__(self, parsed: ParsedGrid) -> None:
        super().__init__(parsed)
        # (optimizer, key, value) -> the value as TrainConfig.to_dict() gives it.
        self._normal: dict[tuple[str, str, Any], Any] = {}

    def check_value(self, optimizer: str, key: str, value: Any, path: Path_) -> Any:
        """Check one value of ``key`` alone against TrainConfig; its canonical form."""
        marker = (optimizer, key, value)
        if marker in self._normal:
            return self._normal[marker]
        probe: dict[str, Any] = {"dataset": DATASETS[0], "optimizer": optimizer, key: value}
        if key == "hidden":
            probe[key] = list(value)
        try:
            normal = TrainConfig.from_dict(probe).to_dict()[key]
        except ConfigError as exc:
            raise self.error(path, exc.problem) from None
        if key == "hidden":
            self._check_size(normal, path)
        self._normal[marker] = normal
        return normal

    def _check_size(self, hidden: Any, path: Path_) -> None:
        limit = get_settings().max_parameters
        params = network_parameters(hidden)
        if params > limit:
            raise self.error(
                path,
                f"{hidden_label(hidden)} has at least {params:,} parameters; at most "
                f"{limit:,} (MLPQ_MAX_PARAMETERS)",
            )

    def check_memory(self, optimizer: str, axes: dict[str, AxisAt], path: Path_) -> None:
        """A block's largest run fits a worker: its arrays at most MLPQ_MAX_RUN_MEMORY_MB."""
        hidden = axes.get("hidden")
        nets = hidden.axis.values if hidden is not None and hidden.axis.values else [(100,)]
        params = max(network_parameters(h) for h in nets)
        copies = RUN_COPIES
        candidates = axes.get("candidates")
        if optimizer == "random_walk" and candidates is not None and candidates.axis.values:
            copies += max(int(k) for k in candidates.axis.values)
        dtypes = axes.get("dtype")
        itemsize = 4 if dtypes is not None and set(dtypes.axis.values) == {"float32"} else 8
        need = params * itemsize * copies
        limit = get_settings().max_run_memory_mb * 2**20
        if need > limit:
            where = hidden.path if hidden is not None else path
            raise self.error(
                where,
                f"the largest network needs about {need / 2**20:,.0f} MB per run "
                f"({params:,} parameters x {copies} copies); at most "
                f"{limit / 2**20:,.0f} MB (MLPQ_MAX_RUN_MEMORY_MB)",
            )

    def check_axis(self, optimizer: str, at: AxisAt) -> None:
        axis = at.axis
        if axis.dist in ("uniform", "loguniform"):
            low_high = axis_bounds(axis)
            if low_high[0] > low_high[1]:
                raise self.error(
                    (*at.path, axis.dist), f"no integer between {axis.low:g} and {axis.high:g}"
                )
            for i, value in enumerate(low_high):
                self.check_value(optimizer, at.key, value, (*at.path, axis.dist, i))
            return
        for i, value in enumerate(axis.values):
            where = at.path
            if axis.dist == "choice":
                where = (*at.path, "choice", i)
            elif axis.listed:
                where = (*at.path, i)
            self.check_value(optimizer, at.key, value, where)
        if axis.dist is None and len(set(axis.values)) != len(axis.values):
            seen: dict[Any, int] = {}
            for i, value in enumerate(axis.values):
                if value in seen:
                    raise self.error(
                        (*at.path, i),
                        f"repeats {at.path[-1]}[{seen[value]}] ({_show(value)}); "
                        "each value of an axis must be different",
                    )
                seen[value] = i


#: Copies of the parameters a run holds besides the proposals (weights, gradient or step,
#: velocity or best point, checkpoint buffer); random walk adds one per candidate.
RUN_COPIES = 4


def network_parameters(hidden: Any) -> int:
    """Weights and biases of an MLP with these hidden layers, counting one input and output."""
    widths = [1, *(int(h) for h in hidden), 1]
    return sum((a + 1) * b for a, b in itertools.pairwise(widths))


def axis_bounds(axis: Axis) -> tuple[Any, Any]:
    low, high = float(axis.low or 0.0), float(axis.high or 0.0)
    if axis.kind == "int":
        return math.ceil(low), math.floor(high)
    return low, high


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        return hidden_label(value) or "[]"
    return repr(value)
