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
from collections.abc import Callable, Generator, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
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


class Grid:
    """A validated grid, ready to submit: its runs expanded, or expanded as they are read.

    ``expand_grid(..., lazy=True)`` checks every value and the grid's size up front and
    leaves the product for later: ``runs`` expands what is left at once, ``stream``
    expands it a chunk at a time (``service.queue.enqueue`` stores each chunk while the
    next is made). The checks only a whole expansion can make (every run excluded, more
    runs than ``max_runs`` after the exclusions) raise ``GridError`` at its end.
    """

    def __init__(
        self,
        *,
        name: str,
        source: str,
        spec: dict[str, Any],
        runs: list[RunSpec],
        datasets: list[CsvFile] | None = None,
        excluded: int = 0,
        duplicates: int = 0,
        pending: Iterator[tuple[RunSpec, str | None]] | None = None,
        upper: int | None = None,
    ) -> None:
        self.name = name
        self.source = source
        self.spec = spec  # the grid as submitted (JSON-able), kept with the experiment
        self.datasets = datasets if datasets is not None else []
        self._runs = runs
        self._excluded = excluded  # combinations dropped by exclude rules
        self._duplicates = duplicates  # combinations equal to an earlier one
        self._pending = pending  # the rest of the expansion, if any
        self._error: BaseException | None = None  # what ended the expansion, if it failed
        #: At most this many runs (the product before exclusions and duplicates).
        self.upper = len(runs) if upper is None else upper

    @property
    def expanded(self) -> bool:
        return self._pending is None

    @property
    def runs(self) -> list[RunSpec]:
        """Every run, in grid order (what is not expanded yet is expanded now)."""
        if self._error is not None:
            raise self._error
        if self._pending is not None:
            with no_gc():
                for _ in self._more(None):
                    pass
        return self._runs

    @property
    def excluded(self) -> int:
        self.runs  # noqa: B018 - known once the grid is expanded
        return self._excluded

    @property
    def duplicates(self) -> int:
        self.runs  # noqa: B018 - known once the grid is expanded
        return self._duplicates

    def __len__(self) -> int:
        return len(self.runs)

    def stream(self, chunk: int) -> Iterator[tuple[list[RunSpec], list[str | None] | None]]:
        """Every run in grid order, ``chunk`` at a time, expanding the rest as it goes.

        Each chunk comes with the canonical JSON of each run's config where the
        expansion made it (None: not made, or the chunk was expanded before). The runs
        are kept: ``runs`` afterwards is the whole list, expanded once.
        """
        if self._error is not None:
            raise self._error
        for start in range(0, len(self._runs), chunk):
            yield self._runs[start : start + chunk], None
        while self._pending is not None:
            more = list(self._more(chunk))
            if more:
                runs, texts = zip(*more, strict=True)
                yield list(runs), list(texts)

    def _more(self, limit: int | None) -> Iterator[tuple[RunSpec, str | None]]:
        pending = self._pending
        assert pending is not None
        taken = 0
        while limit is None or taken < limit:
            try:
                item = next(pending)
            except StopIteration as stop:
                self._pending = None
                self._excluded, self._duplicates = stop.value
                return
            except BaseException as exc:
                self._pending, self._error = None, exc
                raise
            self._runs.append(item[0])
            taken += 1
            yield item


def config_hash(config: Mapping[str, Any]) -> str:
    """sha256 of ``config`` as canonical JSON (sorted keys, no spaces)."""
    return hashlib.sha256(canonical_json(config).encode()).hexdigest()


@contextmanager
def no_gc() -> Iterator[None]:
    """The cyclic garbage collector off while a million acyclic objects are made.

    Each collection walks every object alive, so building a big grid's configs
    with it on costs a fifth more for nothing to collect. On the way out the
    objects made meanwhile join the oldest generation unwalked (``gc.freeze`` then
    ``gc.unfreeze``): left in the youngest, the first collection after would walk
    them all, 0.4-0.7 s for a million configs, and then again as they aged. A cycle
    among them is still collected, by the next full collection.
    """
    was_on = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_on:
            gc.freeze()
            gc.unfreeze()
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
    lazy: bool = False,
) -> Grid:
    """Read, validate and expand the grid file at ``path`` (see ``expand_grid``)."""
    path = Path(path)
    parsed = parse_grid(
        read_grid_file(path),
        source=str(path),
        base_dir=path.resolve().parent,
        default_name=path.stem,
    )
    return expand_grid(parsed, name=name, max_runs=max_runs, yes=yes, progress=progress, lazy=lazy)


def expand_grid(
    parsed: ParsedGrid,
    *,
    name: str | None = None,
    max_runs: int | None = None,
    yes: bool = False,
    progress: Progress | None = None,
    lazy: bool = False,
) -> Grid:
    """Check every value of ``parsed`` and expand it into canonical runs, in a fixed order.

    Order: optimizer blocks as written; inside a block the product of datasets,
    samples, model, training and optimizer axes, budget and seeds (seeds vary
    fastest). Runs equal to an earlier one are dropped (``Grid.duplicates``).
    More than ``max_runs`` runs needs ``yes``. With ``lazy``, a grid of at least
    ``LAZY_MIN_RUNS`` is expanded as it is read (``Grid.stream``).
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
    grid = Grid(
        name=name or parsed.spec.name or parsed.default_name,
        source=parsed.source,
        spec=_record(parsed),
        runs=[],
        datasets=list(resolver.datasets.csv_files.values()),
        pending=_expansion(resolver, plan, upper, max_runs, yes, progress),
        upper=upper,
    )
    if not lazy or upper < LAZY_MIN_RUNS:
        grid.runs  # noqa: B018 - expanded now
    return grid


#: Grids from this size on are expanded as they are stored when asked to (``lazy``).
LAZY_MIN_RUNS = 50_000


def _expansion(
    resolver: Resolver,
    plan: list[tuple[Any, Any, Any]],
    upper: int,
    max_runs: int | None,
    yes: bool,
    progress: Progress | None,
) -> Generator[tuple[RunSpec, str | None], None, tuple[int, int]]:
    """The runs of ``plan``, each with its config's canonical JSON (None with a time limit,
    which the JSON hashed leaves out); returns (excluded, duplicates); GridError if none
    is left."""
    if progress is not None:
        progress("expand", 0, upper)
    seen: set[str] = set()
    excluded = duplicates = done = 0
    every = max(1, upper // 100)
    sha256 = hashlib.sha256  # config_hash of the JSON text block_configs made
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
                yield RunSpec(config, digest, block.index), None
            else:
                yield RunSpec(config, digest, block.index), text
    if progress is not None:
        progress("expand", upper, upper)
    if not seen:
        what = "every run is excluded" if excluded else "the grid has no runs"
        raise resolver.error((), f"{what}; nothing to submit")
    if max_runs is not None and len(seen) > max_runs and not yes:
        raise _too_big(resolver, len(seen), max_runs)
    return excluded, duplicates


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
