"""Checking a grid's values one at a time against ``engine.TrainConfig``.

Each distinct (optimizer, key, value) is checked once and turned into its
canonical form (what ``TrainConfig.to_dict()`` gives), so expanding a big
product never validates the same value twice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from engine import DATASETS, ConfigError, TrainConfig
from service.grids.parsed import GridPart, ParsedGrid, Path_
from service.grids.spec import Axis, hidden_label


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
        self._normal[marker] = normal
        return normal

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


def axis_bounds(axis: Axis) -> tuple[Any, Any]:
    low, high = float(axis.low or 0.0), float(axis.high or 0.0)
    if axis.kind == "int":
        return math.ceil(low), math.floor(high)
    return low, high


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        return hidden_label(value) or "[]"
    return repr(value)
