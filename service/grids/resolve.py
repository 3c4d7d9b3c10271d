"""Resolving a parsed grid into checked dimensions, the factors of each block's product.

``Resolver`` reads a ``ParsedGrid`` block by block: which axis applies where
(a block's own values override the common ones), every value checked alone
against ``engine.TrainConfig`` (and turned into its canonical form), datasets
(CSV files read and parsed now, so a bad file fails the submit and not a
worker), zip groups, random draws and exclusion rules. ``block_configs`` then
yields the canonical configs of one block in product order, with their JSON.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from engine import ConfigError, TrainConfig
from service.grids.canonical import canonical_json, fast_canonical_json
from service.grids.datasets import Datasets, Dim
from service.grids.parsed import GridPart, ParsedGrid, Path_
from service.grids.spec import (
    BUDGET_KEY,
    KEY_KINDS,
    MODEL_KEYS,
    OPTIMIZER_KEYS,
    TRAINING_KEYS,
    Axis,
    PathError,
    format_path,
    parse_axis,
)
from service.grids.values import AxisAt, Values, axis_bounds

#: Significant digits kept of a randomly drawn number, so it prints and hashes stably.
SAMPLE_DIGITS = 6


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
    evaluations: int | None = None  # budget.evaluations: every run's max_evaluations


def _grid_key(name: str, optimizer: str | None = None) -> str | None:
    """A key as the grid writes it -> the run-config key (``epochs`` -> ``max_steps``)."""
    if name in ("epochs", "iterations"):
        if optimizer is not None and BUDGET_KEY[optimizer] != name:
            return None
        return "max_steps"
    return {"seeds": "seed", "datasets": "dataset"}.get(name, name)


class Resolver(GridPart):
    """Turns a ParsedGrid into checked blocks, with its ``values`` and ``datasets`` checkers."""

    def __init__(self, parsed: ParsedGrid) -> None:
        super().__init__(parsed)
        self.spec = parsed.spec
        self.values = Values(parsed)
        self.datasets = Datasets(parsed)

    # blocks -----------------------------------------------------------------------------

    def blocks(self) -> list[Block]:
        """Every optimizer block with its axes checked, then the top-level zips and samples."""
        out = [self._block(i, block) for i, block in enumerate(self.spec.optimizers)]
        self._apply_top_zips(out)
        self._check_samples(out)
        return out

    def _block(self, i: int, block: Any) -> Block:
        spec = self.spec
        bpath: Path_ = ("optimizers", i)
        axes = self._block_axes(block, bpath)
        for at in axes.values():
            self.values.check_axis(block.optimizer, at)
        self.values.check_memory(block.optimizer, axes, bpath)
        zips = [((*bpath, "zip", j), tuple(g)) for j, g in enumerate(block.zip)]
        excludes = [((*bpath, "exclude", j), r) for j, r in enumerate(block.exclude)]
        samples = block.samples if block.samples is not None else spec.samples
        time_limit = block.time_limit if block.time_limit is not None else spec.budget.time_limit
        evaluations = spec.budget.evaluations
        return Block(
            i, block.optimizer, bpath, axes, zips, excludes, samples, time_limit, evaluations
        )

    def _block_axes(self, block: Any, bpath: Path_) -> dict[str, AxisAt]:
        """Config key -> axis for one block: its own values override the common sections."""
        spec = self.spec
        optimizer = block.optimizer
        axes: dict[str, AxisAt] = {}
        sections = (("model", spec.model, MODEL_KEYS), ("training", spec.training, TRAINING_KEYS))
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
        return axes

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
        dims = [self.datasets.rows(entries, dpath)]
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
                out[key] = frozenset(self.datasets.names(raw, where))
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
                self.values.check_value(checker, key, value, (*where, i) if axis.listed else where)
            out[key] = frozenset(axis.values)
        return out if applies else None


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
        lo, hi = axis_bounds(axis)
        return min(max(round(value), lo), hi)
    # Rounded, then kept inside the bounds the range check saw.
    return min(max(_round(value), low), high)


def block_size(dims: list[Dim]) -> int:
    return math.prod(len(d.rows) for d in dims)


def _updates(resolver: Resolver, block: Block, dim: Dim) -> list[tuple[tuple[str, Any], ...]]:
    """Each row of ``dim`` as (key, canonical value) pairs; every value checked once."""
    out = []
    for row, where in zip(dim.rows, dim.paths, strict=True):
        pairs = []
        for key, value, path in zip(dim.keys, row, where, strict=True):
            if key not in ("dataset", "target", "task"):
                value = resolver.values.check_value(block.optimizer, key, value, path)
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


def block_configs(
    resolver: Resolver, block: Block, dims: list[Dim]
) -> Iterator[tuple[dict[str, Any], str]]:
    """The canonical configs of a block, in product order, each with its canonical JSON.

    Every value was checked alone (``check_value``) and the rules across keys
    (dataset, target, task, optimizer) are checked by one full ``from_dict`` per
    dataset; a config is then its template with the canonical values put in,
    which equals ``TrainConfig.from_dict(config).to_dict()`` (a test checks it)
    at a fraction of the cost of validating every combination again.

    The JSON text (``service.grids.canonical.canonical_json``, which the config's
    hash is taken of) is put together the same way, from the template's and each
    row's ``"key":value`` pieces in sorted key order, each encoded once; where that
    cannot be done (a key the template lacks, an evaluation budget that changes
    the config afterwards) each config is encoded whole. A test checks both agree.
    """
    updates = [_updates(resolver, block, dim) for dim in dims]
    first = [0] * len(dims)
    template = _full_config(resolver, block, dims, first)
    for d in range(1, len(dims[0].rows)):
        _full_config(resolver, block, dims, [d, *first[1:]])
    budget = block.evaluations
    pieces = _json_pieces(template, updates) if budget is None else None
    if pieces is None:
        for rows in itertools.product(*updates):
            config = template.copy()
            for pairs in rows:
                config.update(pairs)
            if budget is not None:
                _spend(resolver, block, config, budget)
            yield config, fast_canonical_json(config)
        return
    base, row_pieces = pieces
    both = [list(zip(u, p, strict=True)) for u, p in zip(updates, row_pieces, strict=True)]
    fastest = _one_key(both[-1]) if both else None
    if fastest is None:
        for combo in itertools.product(*both):
            config = template.copy()
            text = base.copy()
            for pairs, json_pairs in combo:
                config.update(pairs)
                text.update(json_pairs)
            yield config, "{" + ",".join(text.values()) + "}"
        return
    # The fastest axis (the seeds) sets one key: the rest of the config and of its text
    # are made once per combination of the other axes, and each of its rows adds its
    # key's value and piece between the text's head and tail (keys stay sorted).
    position = list(base).index(fastest)
    last = [(pairs[0][1], json_pairs[0][1]) for pairs, json_pairs in both[-1]]
    for combo in itertools.product(*both[:-1]):
        outer = template.copy()
        text = base.copy()
        for pairs, json_pairs in combo:
            outer.update(pairs)
            text.update(json_pairs)
        values = list(text.values())
        head = "{" + "".join(piece + "," for piece in values[:position])
        tail = "".join("," + piece for piece in values[position + 1 :]) + "}"
        for value, piece in last:
            config = outer.copy()
            config[fastest] = value
            yield config, head + piece + tail


_AxisRows = list[tuple[tuple[tuple[str, Any], ...], tuple[tuple[str, str], ...]]]


def _one_key(rows: _AxisRows) -> str | None:
    """The key every row of an axis sets, when each sets exactly that one; else None."""
    keys = {pairs[0][0] for pairs, _ in rows if len(pairs) == 1}
    if len(keys) != 1 or any(len(pairs) != 1 for pairs, _ in rows):
        return None
    return keys.pop()


def _json_pieces(
    template: dict[str, Any], updates: list[list[tuple[tuple[str, Any], ...]]]
) -> tuple[dict[str, str], list[list[tuple[tuple[str, str], ...]]]] | None:
    """The template's ``"key":value`` JSON pieces by key, sorted, and each row's; or None.

    None when a row sets a key the template lacks (the config's keys would differ
    from the template's) or a key is not a string.
    """
    keys = set(template)
    if not all(isinstance(k, str) for k in keys) or any(
        key not in keys for rows in updates for pairs in rows for key, _ in pairs
    ):
        return None
    try:
        base = {key: _json_piece(key, template[key]) for key in sorted(keys)}
        rows = [
            [tuple((key, _json_piece(key, value)) for key, value in pairs) for pairs in dim_rows]
            for dim_rows in updates
        ]
    except (TypeError, ValueError):  # NaN, or not JSON: encoded whole, where it fails alike
        return None
    return base, rows


def _json_piece(key: str, value: Any) -> str:
    return canonical_json({key: value})[1:-1]


def _spend(resolver: Resolver, block: Block, config: dict[str, Any], budget: int) -> None:
    """Give ``config`` the grid's evaluation budget, and the steps it buys if none are set."""
    from engine.config import steps_within

    try:
        steps = steps_within(budget, config)
    except ConfigError as exc:
        raise resolver.error(("budget", "evaluations"), exc.problem) from None
    config["max_evaluations"] = budget
    if "max_steps" not in block.axes:
        config["max_steps"] = steps
