"""Grids: read a grid file (YAML, JSON or TOML), validate it whole, expand it into runs.

``load_grid(path)`` and ``inline_grid(...)`` (``service.grids.inline``) both go
through ``parse_grid`` (structure, pydantic) and ``expand_grid`` (every value
checked against ``engine.TrainConfig``, then the product, the samples, the
exclusions), so a grid is valid as a whole before anything is written. Errors
are ``GridError`` with one line: ``grid.yaml: optimizers[1].step_size: must be >
0, got -0.1``.

Each run is the canonical ``TrainConfig.to_dict()`` and its ``config_hash``: the
sha256 of that dict as canonical JSON (``service.grids.canonical``: sorted keys, no
spaces), so key order and number spelling (0.1, 1e-1) do not change it.
"""

from __future__ import annotations

import gc
import hashlib
import json
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from service.exceptions import GridError
from service.grids.canonical import canonical_json
from service.grids.datasets import CsvFile
from service.grids.files import GRID_SUFFIXES, read_grid_file
from service.grids.keys import TIME_LIMIT_KEY
from service.grids.parsed import ParsedGrid, grid_error
from service.grids.resolve import Resolver, block_configs, block_size
from service.grids.spec import GridSpec, error_line, hidden_label

#: No submit expands more runs than this, --yes or not (memory and time stay bounded).
HARD_MAX_RUNS = 1_000_000

Progress = Callable[[str, int, int], None]

__all__ = [
    "GRID_SUFFIXES",
    "HARD_MAX_RUNS",
    "TIME_LIMIT_KEY",
    "CsvFile",
    "Grid",
    "ParsedGrid",
    "RunSpec",
    "config_hash",
    "expand_grid",
    "hidden_label",
    "load_grid",
    "no_gc",
    "parse_grid",
    "read_grid_file",
]


@dataclass(frozen=True)
class RunSpec:
    """One run of a grid: its canonical config, that config's hash, and its block.

    ``config`` is ``TrainConfig.to_dict()`` plus ``time_limit`` (seconds) when the
    grid sets one; the worker pops it before building the TrainConfig. The hash
    covers the TrainConfig alone: a time limit is a budget, not a different run.
    """

    config: dict[str, Any]
    config_hash: str
    block: int  # index of the optimizer block it came from


@dataclass
class Grid:
    """An expanded, validated grid, ready to submit."""

    name: str
    source: str
    spec: dict[str, Any]  # the grid as submitted (JSON-able), kept with the experiment
    runs: list[RunSpec]
    datasets: list[CsvFile] = field(default_factory=list)
    excluded: int = 0  # combinations dropped by exclude rules
    duplicates: int = 0  # combinations equal to an earlier one (overlapping blocks)

    def __len__(self) -> int:
        return len(self.runs)


def config_hash(config: Mapping[str, Any]) -> str:
    """sha256 of ``config`` as canonical JSON (sorted keys, no spaces)."""
    return hashlib.sha256(canonical_json(config).encode()).hexdigest()


@contextmanager
def no_gc() -> Iterator[None]:
    """The cyclic garbage collector off while a million acyclic objects are made.

    Each collection walks every object alive, so building a big grid's configs
    with it on costs a fifth more for nothing to collect.
    """
    was_on = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_on:
            gc.enable()


# -- reading --------------------------------------------------------------------------------


def parse_grid(
    data: Mapping[str, Any],
    *,
    source: str = "grid",
    base_dir: Path | None = None,
    default_name: str = "grid",
    aliases: Mapping[str, str] | None = None,
) -> ParsedGrid:
    """Check the structure of a grid mapping (keys, types, shapes); GridError on the first fault."""
    aliases = aliases or {}
    try:
        spec = GridSpec.model_validate(data)
    except ValidationError as exc:
        path, message = error_line(exc.errors()[0])
        raise grid_error(source, aliases, path, message) from None
    return ParsedGrid(
        spec=spec,
        raw=data,
        source=source,
        base_dir=base_dir or Path.cwd(),
        default_name=default_name,
        aliases=aliases,
    )


def load_grid(
    path: str | Path,
    *,
    name: str | None = None,
    max_runs: int | None = None,
    yes: bool = False,
    progress: Progress | None = None,
) -> Grid:
    """Read, validate and expand the grid file at ``path`` (see ``expand_grid``)."""
    path = Path(path)
    parsed = parse_grid(
        read_grid_file(path),
        source=str(path),
        base_dir=path.resolve().parent,
        default_name=path.stem,
    )
    return expand_grid(parsed, name=name, max_runs=max_runs, yes=yes, progress=progress)


def expand_grid(
    parsed: ParsedGrid,
    *,
    name: str | None = None,
    max_runs: int | None = None,
    yes: bool = False,
    progress: Progress | None = None,
) -> Grid:
    """Check every value of ``parsed`` and expand it into canonical runs, in a fixed order.

    Order: optimizer blocks as written; inside a block the product of datasets,
    samples, model, training and optimizer axes, budget and seeds (seeds vary
    fastest). Runs equal to an earlier one are dropped (``Grid.duplicates``).
    More than ``max_runs`` runs needs ``yes``.
    """
    resolver = Resolver(parsed)
    blocks = resolver.blocks()
    plan = []
    for block in blocks:
        dims = resolver.dims(block)
        plan.append((block, dims, resolver.exclusion_rules(block)))
    upper = sum(block_size(dims) for _, dims, _ in plan)
    if upper > HARD_MAX_RUNS:
        raise resolver.error(
            (), f"{upper:,} runs; at most {HARD_MAX_RUNS:,} can be submitted at once"
        )
    has_rules = any(rules for _, _, rules in plan)
    if max_runs is not None and upper > max_runs and not yes and not has_rules:
        raise _too_big(resolver, upper, max_runs)

    if progress is not None:
        progress("expand", 0, upper)
    runs: list[RunSpec] = []
    seen: set[str] = set()
    excluded = duplicates = done = 0
    every = max(1, upper // 100)
    sha256 = hashlib.sha256  # config_hash of the JSON text block_configs made
    with no_gc():
        for block, dims, rules in plan:
            for config, text in block_configs(resolver, block, dims):
                done += 1
                if progress is not None and done % every == 0:
                    progress("expand", done, upper)
                if rules and _excluded(config, rules):
                    excluded += 1
                    continue
                digest = sha256(text.encode()).hexdigest()
                if digest in seen:
                    duplicates += 1
                    continue
                seen.add(digest)
                if block.time_limit is not None:
                    config[TIME_LIMIT_KEY] = block.time_limit
                runs.append(RunSpec(config, digest, block.index))
    if progress is not None:
        progress("expand", upper, upper)
    if not runs:
        what = "every run is excluded" if excluded else "the grid has no runs"
        raise resolver.error((), f"{what}; nothing to submit")
    if max_runs is not None and len(runs) > max_runs and not yes:
        raise _too_big(resolver, len(runs), max_runs)
    return Grid(
        name=name or parsed.spec.name or parsed.default_name,
        source=parsed.source,
        spec=_record(parsed),
        runs=runs,
        datasets=list(resolver.datasets.csv_files.values()),
        excluded=excluded,
        duplicates=duplicates,
    )


def _too_big(resolver: Resolver, count: int, max_runs: int) -> GridError:
    return resolver.error(
        (),
        f"{count:,} runs is more than MLPQ_MAX_GRID_RUNS={max_runs:,}; pass --yes to submit them",
    )


def _excluded(config: Mapping[str, Any], rules: list[dict[str, frozenset[Any]]]) -> bool:
    for rule in rules:
        for key, values in rule.items():
            value = config.get(key)
            if isinstance(value, list):
                value = tuple(value)
            if value not in values:
                break
        else:
            return True
    return False


def _record(parsed: ParsedGrid) -> dict[str, Any]:
    grid = json.loads(json.dumps(parsed.raw, default=str))
    return {"source": parsed.source, "grid": grid}
