"""What every stage of resolving a grid shares: the parsed grid, its paths, its errors."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from service.exceptions import GridError
from service.grids.spec import GridSpec, format_path

#: Where a value was written in the grid: keys and list indices from the top.
Path_ = tuple[str | int, ...]


@dataclass(frozen=True)
class ParsedGrid:
    """A structurally valid grid and where it came from (for error messages and CSV paths)."""

    spec: GridSpec
    raw: Mapping[str, Any]
    source: str
    base_dir: Path
    default_name: str
    aliases: Mapping[str, str] = field(default_factory=dict)


def grid_error(source: str, aliases: Mapping[str, str], path: Path_, message: str) -> GridError:
    where = format_path(path)
    # Inline grids name the command-line option instead of the key path.
    for key in sorted(aliases, key=len, reverse=True):
        if where == key or where.startswith((key + ".", key + "[")):
            return GridError(f"{aliases[key]}: {message}")
    if where:
        return GridError(f"{source}: {where}: {message}")
    return GridError(f"{source}: {message}")


class GridPart:
    """Base of the resolving stages: the parsed grid, its raw values and its one-line errors."""

    def __init__(self, parsed: ParsedGrid) -> None:
        self.parsed = parsed

    def error(self, path: Path_, message: str) -> GridError:
        return grid_error(self.parsed.source, self.parsed.aliases, path, message)

    def _raw(self, path: Path_) -> Any:
        node: Any = self.parsed.raw
        for part in path:
            try:
                node = node[part]
            except (KeyError, IndexError, TypeError):
                return None
        return node
