"""Resolving a parsed grid into checked dimensions, the factors of each block's product.

``Resolver`` reads a ``ParsedGrid`` block by block: which axis applies where
(a block's own values override the common ones), every value checked alone
against ``engine.TrainConfig`` (and turned into its canonical form), datasets
(CSV files read and parsed now, so a bad file fails the submit and not a
worker), zip groups, random draws and exclusion rules. ``block_configs`` then
yields the canonical configs of one block in product order.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine import DATASETS, ConfigError, TrainConfig, load_dataset
from service.exceptions import GridError
from service.grids.spec import (
    BUDGET_KEY,
    KEY_KINDS,
    MODEL_KEYS,
    OPTIMIZER_KEYS,
    TRAINING_KEYS,
    Axis,
    CsvDataset,
    GridSpec,
    PathError,
    format_path,
    hidden_label,
    parse_axis,
)

#: Significant digits kept of a randomly drawn number, so it prints and hashes stably.
SAMPLE_DIGITS = 6

Path_ = tuple[str | int, ...]


@dataclass(frozen=True)
class CsvFile:
    """A user CSV named by the grid, read at parse time, stored by content hash at submit."""

    name: str  # file name, for the record
    sha256: str
    data: bytes


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


@dataclass
class Dim:
    """One factor of the product: one axis, or several zipped axes, or the sample index."""

    keys: tuple[str, ...]
    rows: list[tuple[Any, ...]]  # each row gives a value to every key
    paths: list[tuple[Path_, ...]]  # where each row's values were written


@dataclass
class AxisAt:
    key: str
    axis: Axis
    path: Path_


@dataclass
class Block:
    index: int
    optimizer: str
    path: Path_
    axes: dict[str, AxisAt]  # config key -> axis
    zips: list[tuple[Path_, tuple[str, ...]]]
    excludes: list[tuple[Path_, dict[str, Any]]]
    samples: int | None
    time_limit: float | None


def _grid_key(name: str, optimizer: str | None = None) -> str | None:
    """A key as the grid writes it -> the run-config key (``epochs`` -> ``max_steps``)."""
    if name in ("epochs", "iterations"):
        if optimizer is not None and BUDGET_KEY[optimizer] != name:
            return None
        return "max_steps"
    return {"seeds": "seed", "datasets": "dataset"}.get(name, name)


class Resolver:
    """Turns a ParsedGrid into checked blocks; caches per-value checks and CSV reads."""

    def __init__(self, parsed: ParsedGrid) -> None:
        self.parsed = parsed
        self.spec = parsed.spec
        # (optimizer, key, value) -> the value as TrainConfig.to_dict() gives it.
        self._normal: dict[tuple[str, str, Any], Any] = {}
        self.csv_files: dict[str, CsvFile] = {}
        self.csv_labels: dict[str, str] = {}  # label or path as written -> dataset name

    def error(self, path: Path_, message: str) -> GridError:
        return grid_error(self.parsed.source, self.parsed.aliases, path, message)

    # values -----------------------------------------------------------------------------

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
            bounds = _bounds(axis)
            if bounds[0] > bounds[1]:
                raise self.error(
                    (*at.path, axis.dist), f"no integer between {axis.low:g} and {axis.high:g}"
                )
            for i, value in enumerate(bounds):
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

    # datasets ---------------------------------------------------------------------------

    def dataset_rows(self, entries: tuple[str | CsvDataset, ...], path: Path_) -> Dim:
        rows, paths = [], []
        for i, entry in enumerate(entries):
            where = (*path, i) if len(entries) > 1 or isinstance(self._raw(path), list) else path
            if isinstance(entry, str):
                if entry not in DATASETS:
                    raise self.error(
                        where,
                        f"unknown dataset {entry!r}; expected one of {', '.join(DATASETS)} "
                        "or {csv: path, target: column}",
                    )
                rows.append((entry, None, None))
            else:
                rows.append(self.csv_row(entry, where))
            paths.append((where, where, where))
        seen = set()
        for row, where in zip(rows, paths, strict=True):
            if row in seen:
                raise self.error(where[0], f"dataset {row[0]!r} is listed twice")
            seen.add(row)
        return Dim(("dataset", "target", "task"), rows, paths)

    def _raw(self, path: Path_) -> Any:
        node: Any = self.parsed.raw
        for part in path:
            try:
                node = node[part]
            except (KeyError, IndexError, TypeError):
                return None
        return node

    def csv_row(self, entry: CsvDataset, where: Path_) -> tuple[str, str, str | None]:
        file = (self.parsed.base_dir / entry.csv).resolve()
        key = str(file)
        if key not in self.csv_files:
            try:
                data = file.read_bytes()
            except FileNotFoundError:
                raise self.error((*where, "csv"), f"no such file: {file}") from None
            except OSError as exc:
                raise self.error((*where, "csv"), f"cannot read {file}: {exc}") from None
            self.csv_files[key] = CsvFile(
                name=file.name, sha256=hashlib.sha256(data).hexdigest(), data=data
            )
        csv = self.csv_files[key]
        name = f"csv:{csv.sha256}"
        try:
            # The whole file is parsed now, so a bad CSV fails the submit, not a worker.
            load_dataset(name, seed=0, csv=csv.data, target=entry.target, task=entry.task)
        except ConfigError as exc:
            sub = "target" if exc.key == "target" else "task" if exc.key == "task" else "csv"
            raise self.error((*where, sub), f"{file.name}: {exc.problem}") from None
        for label in (entry.name, entry.csv, file.name):
            if label:
                self.csv_labels[label] = name
        return (name, entry.target, entry.task)

    # blocks -----------------------------------------------------------------------------

    def blocks(self) -> list[Block]:
        spec = self.spec
        out = []
        for i, block in enumerate(spec.optimizers):
            optimizer = block.optimizer
            bpath: Path_ = ("optimizers", i)
            axes: dict[str, AxisAt] = {}
            sections = (
                ("model", spec.model, MODEL_KEYS),
                ("training", spec.training, TRAINING_KEYS),
            )
            for section, values, keys in sections:
                for key in keys:
                    own = getattr(block, key)
                    if own is not None:
                        axes[key] = AxisAt(key, own, (*bpath, key))
                    elif getattr(values, key) is not None:
                        axes[key] = AxisAt(key, getattr(values, key), (section, key))
            for key in OPTIMIZER_KEYS[optimizer]:
                if getattr(block, key) is not None:
                    axes[key] = AxisAt(key, getattr(block, key), (*bpath, key))
            budget_key = BUDGET_KEY[optimizer]
            if getattr(block, budget_key) is not None:
                axes["max_steps"] = AxisAt(
                    "max_steps", getattr(block, budget_key), (*bpath, budget_key)
                )
            elif getattr(spec.budget, budget_key) is not None:
                axes["max_steps"] = AxisAt(
                    "max_steps", getattr(spec.budget, budget_key), ("budget", budget_key)
                )
            seeds, seeds_path = (
                (block.seeds, (*bpath, "seeds"))
                if block.seeds is not None
                else (spec.seeds, ("seeds",))
            )
            listed = isinstance(self._raw(seeds_path), list)
            axes["seed"] = AxisAt("seed", Axis("int", values=seeds, listed=listed), seeds_path)
            for at in axes.values():
                self.check_axis(optimizer, at)
            zips = [((*bpath, "zip", j), tuple(g)) for j, g in enumerate(block.zip)]
            excludes = [((*bpath, "exclude", j), r) for j, r in enumerate(block.exclude)]
            samples = block.samples if block.samples is not None else spec.samples
            time_limit = (
                block.time_limit if block.time_limit is not None else spec.budget.time_limit
            )
            out.append(Block(i, optimizer, bpath, axes, zips, excludes, samples, time_limit))
        self._apply_top_zips(out)
        self._check_samples(out)
        return out

    def _apply_top_zips(self, blocks: list[Block]) -> None:
        for j, group in enumerate(self.spec.zip):
            path: Path_ = ("zip", j)
            applied = False
            for block in blocks:
                keys = [_grid_key(k, block.optimizer) for k in group]
                settable = [
                    k is not None
                    and (k in block.axes or k in KEY_KINDS)
                    and _settable(block.optimizer, k)
                    for k in keys
                ]
                if all(settable):
                    block.zips.append((path, tuple(group)))
                    applied = True
            if not applied:
                raise self.error(
                    path, f"no optimizer block has all of {', '.join(group)}; nothing to zip"
                )

    def _check_samples(self, blocks: list[Block]) -> None:
        any_random = False
        for block in blocks:
            randoms = [at for at in block.axes.values() if at.axis.random]
            any_random = any_random or bool(randoms)
            if randoms and block.samples is None:
                at = randoms[0]
                raise self.error(
                    at.path,
                    f"a {at.axis.dist} axis needs samples: N (at the top level or in the "
                    "optimizer block): how many draws to make",
                )
        if self.spec.samples is not None and not any_random:
            raise self.error(
                ("samples",),
                "no axis is random; samples draws from {uniform|loguniform|choice: ...} axes",
            )

    # dimensions -------------------------------------------------------------------------

    def dims(self, block: Block) -> list[Dim]:
        """The factors of the block's product, in a fixed order; zipped axes are one factor."""
        entries = self.spec.datasets
        dpath: Path_ = ("datasets",)
        own = self.spec.optimizers[block.index].datasets
        if own is not None:
            entries, dpath = own, (*block.path, "datasets")
        dims = [self.dataset_rows(entries, dpath)]
        zipped: dict[str, tuple[Path_, tuple[str, ...]]] = {}
        for zpath, group in block.zips:
            keys = self._zip_keys(block, zpath, group)
            for k in keys:
                if k in zipped:
                    raise self.error(zpath, f"{k} is already zipped by {format_path(zipped[k][0])}")
                zipped[k] = (zpath, keys)
        if block.samples is not None and any(at.axis.random for at in block.axes.values()):
            dims.append(self.sample_dim(block))
        order = [*MODEL_KEYS, *TRAINING_KEYS, *OPTIMIZER_KEYS[block.optimizer], "max_steps", "seed"]
        done: set[str] = set()
        for key in order:
            if key in done or key not in block.axes or block.axes[key].axis.random:
                continue
            if key in zipped:
                zpath, keys = zipped[key]
                dims.append(self._zip_dim(block, zpath, keys))
                done.update(keys)
            else:
                at = block.axes[key]
                rows = [(v,) for v in at.axis.values]
                paths = [((*at.path, i) if at.axis.listed else at.path,) for i in range(len(rows))]
                dims.append(Dim((key,), rows, paths))
                done.add(key)
        return dims

    def _zip_keys(self, block: Block, zpath: Path_, group: tuple[str, ...]) -> tuple[str, ...]:
        keys = []
        for n, name in enumerate(group):
            key = _grid_key(name, block.optimizer)
            if key is None or not (key in KEY_KINDS and _settable(block.optimizer, key)):
                raise self.error(
                    (*zpath, n),
                    f"{name!r} is not a key of a {block.optimizer} block; expected one of "
                    f"{', '.join(_zip_names(block.optimizer))}",
                )
            if key == "dataset":
                raise self.error((*zpath, n), "datasets cannot be zipped; list them as an axis")
            at = block.axes.get(key)
            if at is None or at.axis.random or not at.axis.listed:
                raise self.error(
                    (*zpath, n),
                    f"{name} is not a list in optimizers[{block.index}]; zipped keys must be "
                    "lists of equal length",
                )
            keys.append(key)
        if len(set(keys)) != len(keys):
            raise self.error(zpath, f"names a key twice: {', '.join(group)}")
        lengths = {k: len(block.axes[k].axis.values) for k in keys}
        if len(set(lengths.values())) > 1:
            sizes = ", ".join(f"{k} has {n}" for k, n in lengths.items())
            raise self.error(
                zpath, f"zipped lists differ in length ({sizes}); expected equal lengths"
            )
        return tuple(keys)

    def _zip_dim(self, block: Block, zpath: Path_, keys: tuple[str, ...]) -> Dim:
        ats = [block.axes[k] for k in keys]
        n = len(ats[0].axis.values)
        rows = [tuple(at.axis.values[i] for at in ats) for i in range(n)]
        paths = [tuple((*at.path, i) for at in ats) for i in range(n)]
        return Dim(keys, rows, paths)

    def sample_dim(self, block: Block) -> Dim:
        # One draw per sample of every random axis, shared by the grid axes it is crossed with
        # (so each drawn configuration runs on every seed and dataset of the grid).
        randoms = [at for at in block.axes.values() if at.axis.random]
        rng = random.Random(f"mlpq-sampler:{self.spec.sampler_seed}:{block.index}")
        rows, paths = [], []
        for _ in range(block.samples or 0):
            rows.append(tuple(_draw(rng, at.axis) for at in randoms))
            paths.append(tuple(at.path for at in randoms))
        return Dim(tuple(at.key for at in randoms), rows, paths)

    # exclusions -------------------------------------------------------------------------

    def exclusion_rules(self, block: Block) -> list[dict[str, frozenset[Any]]]:
        rules = []
        top = [(("exclude", j), r) for j, r in enumerate(self.spec.exclude)]
        for path, rule in [*top, *block.excludes]:
            parsed = self._parse_rule(block, path, rule)
            if parsed is not None:
                rules.append(parsed)
        return rules

    def _parse_rule(
        self, block: Block, path: Path_, rule: Mapping[str, Any]
    ) -> dict[str, frozenset[Any]] | None:
        out: dict[str, frozenset[Any]] = {}
        applies = True
        for name, raw in rule.items():
            where = (*path, name)
            if name == "optimizer":
                names = raw if isinstance(raw, list) else [raw]
                for n in names:
                    if n not in OPTIMIZER_KEYS:
                        raise self.error(where, f"expected backprop or random_walk, got {n!r}")
                applies = applies and block.optimizer in names
                continue
            if name in ("epochs", "iterations"):
                applies = applies and BUDGET_KEY[block.optimizer] == name
            key = _grid_key(name)
            if key not in KEY_KINDS:
                raise self.error(where, f"unknown key; expected one of {', '.join(_RULE_KEYS)}")
            owner = _owner(key)
            if owner is not None and owner != block.optimizer:
                applies = False
            if key == "dataset":
                out[key] = frozenset(self._dataset_names(raw, where))
                continue
            kind, optional = KEY_KINDS[key]
            try:
                axis = parse_axis(kind, raw, optional=optional)
            except PathError as exc:
                raise self.error((*where, *exc.path), exc.message) from None
            except ValueError as exc:
                raise self.error(where, str(exc)) from None
            if axis.random:
                raise self.error(where, "expected a value or a list of values to exclude")
            checker = owner or block.optimizer
            for i, value in enumerate(axis.values):
                self.check_value(checker, key, value, (*where, i) if axis.listed else where)
            out[key] = frozenset(axis.values)
        return out if applies else None

    def _dataset_names(self, raw: Any, where: Path_) -> list[str]:
        names = raw if isinstance(raw, list) else [raw]
        out = []
        for n in names:
            if isinstance(n, str) and n in DATASETS:
                out.append(n)
            elif isinstance(n, str) and n in self.csv_labels:
                out.append(self.csv_labels[n])
            elif isinstance(n, str) and n.startswith("csv:"):
                out.append(n)
            else:
                raise self.error(where, f"{n!r} is not a dataset of this grid")
        return out


_RULE_KEYS = (
    "optimizer",
    "datasets",
    "seeds",
    "epochs",
    "iterations",
    *(k for k in KEY_KINDS if k not in ("dataset", "seed", "max_steps")),
)


def _owner(key: str) -> str | None:
    for name, keys in OPTIMIZER_KEYS.items():
        if key in keys:
            return name
    return None


def _settable(optimizer: str, key: str) -> bool:
    owner = _owner(key)
    return owner is None or owner == optimizer


def _zip_names(optimizer: str) -> list[str]:
    return [*MODEL_KEYS, *TRAINING_KEYS, *OPTIMIZER_KEYS[optimizer], BUDGET_KEY[optimizer], "seeds"]


def _bounds(axis: Axis) -> tuple[Any, Any]:
    low, high = float(axis.low or 0.0), float(axis.high or 0.0)
    if axis.kind == "int":
        return math.ceil(low), math.floor(high)
    return low, high


def _round(value: float) -> float:
    return float(f"{value:.{SAMPLE_DIGITS}g}")


def _draw(rng: random.Random, axis: Axis) -> Any:
    if axis.dist == "choice":
        return rng.choice(axis.values)
    low, high = float(axis.low or 0.0), float(axis.high or 0.0)
    if axis.dist == "loguniform":
        value = math.exp(rng.uniform(math.log(low), math.log(high)))
    else:
        value = rng.uniform(low, high)
    if axis.kind == "int":
        lo, hi = _bounds(axis)
        return min(max(round(value), lo), hi)
    # Rounded, then kept inside the bounds the range check saw.
    return min(max(_round(value), low), high)


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        return hidden_label(value) or "[]"
    return repr(value)


def block_size(dims: list[Dim]) -> int:
    return math.prod(len(d.rows) for d in dims)


def _updates(resolver: Resolver, block: Block, dim: Dim) -> list[tuple[tuple[str, Any], ...]]:
    """Each row of ``dim`` as (key, canonical value) pairs; every value checked once."""
    out = []
    for row, where in zip(dim.rows, dim.paths, strict=True):
        pairs = []
        for key, value, path in zip(dim.keys, row, where, strict=True):
            if key not in ("dataset", "target", "task"):
                value = resolver.check_value(block.optimizer, key, value, path)
            pairs.append((key, value))
        out.append(tuple(pairs))
    return out


def _full_config(
    resolver: Resolver, block: Block, dims: list[Dim], pick: Sequence[int]
) -> dict[str, Any]:
    """TrainConfig.from_dict(...).to_dict() of the combination taking row ``pick[i]`` of dim i."""
    combo: dict[str, Any] = {"optimizer": block.optimizer}
    for dim, i in zip(dims, pick, strict=True):
        combo.update(zip(dim.keys, dim.rows[i], strict=True))
    try:
        return TrainConfig.from_dict(combo).to_dict()
    except ConfigError as exc:
        path = block.path
        for dim, i in zip(dims, pick, strict=True):
            if exc.key in dim.keys:
                path = dim.paths[i][dim.keys.index(exc.key)]
        raise resolver.error(path, exc.problem) from None


def block_configs(resolver: Resolver, block: Block, dims: list[Dim]) -> Iterator[dict[str, Any]]:
    """The canonical configs of a block, in product order.

    Every value was checked alone (``check_value``) and the rules across keys
    (dataset, target, task, optimizer) are checked by one full ``from_dict`` per
    dataset; a config is then its template with the canonical values put in,
    which equals ``TrainConfig.from_dict(config).to_dict()`` (a test checks it)
    at a fraction of the cost of validating every combination again.
    """
    updates = [_updates(resolver, block, dim) for dim in dims]
    first = [0] * len(dims)
    template = _full_config(resolver, block, dims, first)
    for d in range(1, len(dims[0].rows)):
        _full_config(resolver, block, dims, [d, *first[1:]])
    for rows in itertools.product(*updates):
        config = template.copy()
        for pairs in rows:
            config.update(pairs)
        yield config
