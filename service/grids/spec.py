"""The grid file's structure as pydantic models, and the parsing of its axes.

A value written as a list is an axis of the Cartesian product; a mapping with one
of ``uniform``, ``loguniform`` or ``choice`` is a random axis sampled ``samples``
times; anything else is a fixed value. Axis parsers only check shapes and types
here; ranges and names are checked value by value against ``engine.TrainConfig``
in ``service.grids.loader`` so the rules live in one place.
"""

from __future__ import annotations

import contextlib
import math
import re
import reprlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    ValidationError,
    model_validator,
)

from engine import OPTIMIZER_PARAMS

# Keys common to both optimizers, grouped as the file groups them.
MODEL_KEYS: tuple[str, ...] = ("hidden", "activation", "init")
TRAINING_KEYS: tuple[str, ...] = ("dtype", "val_fraction", "log_every", "target_loss", "patience")
OPTIMIZER_KEYS: dict[str, tuple[str, ...]] = OPTIMIZER_PARAMS
BACKPROP_KEYS: tuple[str, ...] = OPTIMIZER_PARAMS["backprop"]
RANDOM_WALK_KEYS: tuple[str, ...] = OPTIMIZER_PARAMS["random_walk"]
#: The budget key of each optimizer; both become the engine's ``max_steps``.
BUDGET_KEY: dict[str, str] = {"backprop": "epochs", "random_walk": "iterations"}
DISTRIBUTIONS: tuple[str, ...] = ("uniform", "loguniform", "choice")
#: Bounds that keep a typo (seeds: 1e9) from filling memory before the run count is checked.
MAX_SEEDS = 100_000
#: Integers a grid may hold: the store's integer columns (seed, batch_size, max_steps,
#: candidates, ...) are 32-bit on PostgreSQL, and both stores must accept the same grids.
INT_MIN, INT_MAX = -(2**31), 2**31 - 1
#: Largest magnitude of a number in a grid (finite, with room for arithmetic on it).
MAX_FLOAT = 1e300
MAX_SAMPLES = 1_000_000


class PathError(ValueError):
    """A ValueError that knows where below the validated field it happened.

    Pydantic keeps the exception in the error's context, so the one-line message
    can name the full key path, e.g. ``optimizers[1].step_size[2]``.
    """

    def __init__(self, path: tuple[str | int, ...], message: str) -> None:
        self.path = path
        self.message = message
        super().__init__(message)


# -- axes ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Axis:
    """A parsed grid value: ``values`` (a fixed value or a list axis) or a distribution.

    ``listed`` tells a one-element list from a fixed value, so error paths can name
    the element (``learning_rate[2]``) only where the file has one.
    """

    kind: str  # float | int | str | bool | hidden
    values: tuple[Any, ...] = ()
    listed: bool = False
    dist: str | None = None  # uniform | loguniform | choice
    low: float | None = None
    high: float | None = None

    @property
    def random(self) -> bool:
        return self.dist is not None


# Reprs in error messages are built bounded: a value can be a huge or self-repeating
# structure (YAML aliases), and repr() of all of it could take minutes and gigabytes.
_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxtuple, _REPR.maxlist, _REPR.maxdict = 3, 6, 6, 6
_REPR.maxstring = _REPR.maxlong = _REPR.maxother = 40


def _describe(value: Any) -> str:
    return _short(value)


def _short(value: Any) -> str:
    text = _REPR.repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


#: A repr of any value for an error message, built bounded (at most 60 characters).
short_repr = _short


def _float(value: Any, *, optional: bool = False) -> float | None:
    if value is None and optional:
        return None
    # YAML 1.1 reads 1e-3 (no dot) as a string; accept it as the number it means.
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            value = float(value.strip())
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"expected a number, got {_describe(value)}")
    try:
        number = float(value)
    except OverflowError:  # an int beyond any float
        number = math.inf
    if not math.isfinite(number) or abs(number) > MAX_FLOAT:
        raise ValueError(
            f"expected a finite number of magnitude at most 1e300, got {_short(value)}"
        )
    return number


def _int(value: Any, *, optional: bool = False, bounded: bool = True) -> int | None:
    if value is None and optional:
        return None
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            value = float(value.strip()) if re.search(r"[.eE]", value) else int(value.strip())
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"expected an integer, got {_describe(value)}")
    if bounded and not INT_MIN <= value <= INT_MAX:
        raise ValueError(
            f"expected an integer from {INT_MIN:,} to {INT_MAX:,} (what both stores hold), "
            f"got {_short(value)}"
        )
    return value


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {_describe(value)}")
    return value.strip()


def _bool(value: Any) -> bool:
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {_describe(value)}")
    return value


_HIDDEN_STR = re.compile(r"\s*\d+(\s*x\s*\d+)*\s*")


def parse_hidden(value: Any) -> tuple[int, ...]:
    """One architecture: ``16``, ``"32x16"``, ``[32, 16]``, ``[]`` or ``""`` (no hidden layer)."""
    if isinstance(value, str):
        if value.strip() in ("", "none", "[]"):
            return ()
        if not _HIDDEN_STR.fullmatch(value):
            raise ValueError(f"expected layer sizes like 32x16, got {value!r}")
        return tuple(int(v) for v in value.lower().split("x"))
    if isinstance(value, int) and not isinstance(value, bool):
        return (value,)
    if isinstance(value, list | tuple) and all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        return tuple(value)
    raise ValueError(f"expected layer sizes like [32, 16] or '32x16', got {_describe(value)}")


def hidden_label(hidden: Sequence[int]) -> str:
    """Layer sizes as the runs table stores them: ``[32, 16]`` -> ``"32x16"``."""
    return "x".join(str(h) for h in hidden)


def _is_architecture_list(value: list[Any]) -> bool:
    # [32, 16] is one network of two layers; [[16], [32, 16]] or ["16", "32x16"] is an axis.
    return all(isinstance(v, int) and not isinstance(v, bool) for v in value)


_SCALAR: dict[str, Callable[..., Any]] = {
    "float": _float,
    "int": _int,
    "str": _str,
    "bool": _bool,
    "hidden": parse_hidden,
}
_EXPECTED: dict[str, str] = {
    "float": "a number",
    "int": "an integer",
    "str": "a name",
    "bool": "true or false",
    "hidden": "layer sizes like [32, 16] or '32x16'",
}


def _scalar(kind: str, optional: bool, value: Any) -> Any:
    fn = _SCALAR[kind]
    if kind in ("float", "int"):
        return fn(value, optional=optional)
    return fn(value)


def _distribution(kind: str, optional: bool, raw: Mapping[str, Any]) -> Axis:
    keys = list(raw)
    if len(keys) != 1 or keys[0] not in DISTRIBUTIONS:
        raise ValueError(
            f"expected one of {{uniform: [low, high]}}, {{loguniform: [low, high]}} or "
            f"{{choice: [...]}}, got {_short(dict(raw))}"
        )
    dist = keys[0]
    arg = raw[dist]
    if dist == "choice":
        if not isinstance(arg, list) or not arg:
            raise ValueError(f"choice: expected a non-empty list, got {_describe(arg)}")
        values = tuple(_scalar(kind, optional, v) for v in arg)
        return Axis(kind, values=values, listed=True, dist="choice")
    if kind not in ("float", "int"):
        raise ValueError(f"{dist}: only for numbers; use {{choice: [...]}} for {_EXPECTED[kind]}")
    if not isinstance(arg, list) or len(arg) != 2:
        raise ValueError(f"{dist}: expected [low, high], got {_describe(arg)}")
    low, high = (_float(v) for v in arg)
    if not (math.isfinite(low) and math.isfinite(high)) or not low < high:
        raise ValueError(f"{dist}: expected low < high, got [{low:g}, {high:g}]")
    if dist == "loguniform" and low <= 0:
        raise ValueError(f"loguniform: expected low > 0, got {low:g}")
    return Axis(kind, dist=dist, low=low, high=high)


def parse_axis(kind: str, value: Any, *, optional: bool = False) -> Axis:
    """Parse one grid value of ``kind`` into an Axis (fixed, list or distribution)."""
    if isinstance(value, Axis):
        return value
    if isinstance(value, Mapping):
        return _distribution(kind, optional, value)
    if kind == "hidden" and isinstance(value, list) and _is_architecture_list(value):
        return Axis(kind, values=(parse_hidden(value),))
    if isinstance(value, list):
        if not value:
            raise ValueError("empty list; an axis needs at least one value")
        parsed = []
        for i, item in enumerate(value):
            try:
                parsed.append(_scalar(kind, optional, item))
            except ValueError as exc:
                raise PathError((i,), str(exc)) from None
        return Axis(kind, values=tuple(parsed), listed=True)
    return Axis(kind, values=(_scalar(kind, optional, value),))


def _axis_type(kind: str, optional: bool = False) -> Any:
    return Annotated[Axis, PlainValidator(partial(parse_axis, kind, optional=optional))]


FloatAxis = _axis_type("float")
OptFloatAxis = _axis_type("float", optional=True)
IntAxis = _axis_type("int")
OptIntAxis = _axis_type("int", optional=True)
StrAxis = _axis_type("str")
BoolAxis = _axis_type("bool")
HiddenAxis = _axis_type("hidden")

#: The axis kind of every run-config key a grid may set.
KEY_KINDS: dict[str, tuple[str, bool]] = {
    "hidden": ("hidden", False),
    "activation": ("str", False),
    "init": ("str", False),
    "dtype": ("str", False),
    "val_fraction": ("float", False),
    "log_every": ("int", False),
    "target_loss": ("float", True),
    "patience": ("int", True),
    "learning_rate": ("float", False),
    "batch_size": ("int", True),
    "momentum": ("float", False),
    "weight_decay": ("float", False),
    "lr_decay": ("float", False),
    "step_size": ("float", False),
    "temperature": ("float", False),
    "cooling": ("float", False),
    "adapt_step": ("bool", False),
    "target_acceptance": ("float", False),
    "candidates": ("int", False),
    "quantize": ("float", False),
    "max_steps": ("int", False),
    "seed": ("int", False),
    "dataset": ("str", False),
}


# -- error messages ---------------------------------------------------------------------------


def format_path(path: tuple[str | int, ...]) -> str:
    """``("optimizers", 1, "step_size")`` -> ``optimizers[1].step_size``."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            name = str(part)
            if len(name) > 40:  # a key is a word; a huge one is shown cut, not echoed whole
                name = name[:37] + "..."
            out += f".{name}" if out else name
    return out


def error_line(err: Mapping[str, Any]) -> tuple[tuple[str | int, ...], str]:
    """One pydantic error as (key path, message); our own PathErrors extend the path."""
    loc = tuple(err.get("loc", ()))
    exc = (err.get("ctx") or {}).get("error")
    if isinstance(exc, PathError):
        return loc + exc.path, exc.message
    kind = err["type"]
    ctx = err.get("ctx") or {}
    got = _short(err.get("input"))
    if kind == "missing":
        return loc, "required"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        op = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<"}.get(kind, "<=")
        bound = next(iter(ctx.values()))
        shown = f"{bound:g}" if isinstance(bound, int | float) else str(bound)
        if isinstance(bound, int | float) and abs(bound) >= 1e6 and float(bound).is_integer():
            shown = f"{int(bound):,}"
        return loc, f"must be {op} {shown}, got {got}"
    simple = {
        "string_type": "expected a string",
        "int_type": "expected an integer",
        "int_parsing": "expected an integer",
        "int_from_float": "expected an integer",
        "float_type": "expected a number",
        "float_parsing": "expected a number",
        "list_type": "expected a list",
        "dict_type": "expected a mapping",
        "model_type": "expected a mapping",
        "bool_type": "expected true or false",
        "bool_parsing": "expected true or false",
    }
    if kind in simple:
        return loc, f"{simple[kind]}, got {got}"
    if kind == "too_short":
        return loc, f"expected at least {ctx.get('min_length')} item(s), got {got}"
    if kind == "string_too_short":
        return loc, "must not be empty"
    if kind == "string_too_long":
        return loc, f"must be at most {ctx.get('max_length')} characters"
    msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
    return loc, msg[:1].lower() + msg[1:]


def validate_nested(model: type[BaseModel], value: Any, where: tuple[str | int, ...]) -> Any:
    """Validate ``value`` as ``model`` inside another validator, keeping the full key path."""
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        path, message = error_line(exc.errors()[0])
        raise PathError(where + path, message) from None


# -- datasets and seeds ---------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        # A clearer message than pydantic's "Extra inputs are not permitted", with a hint.
        if isinstance(data, Mapping):
            for key in data:
                if key not in cls.model_fields:
                    raise PathError((str(key),), unknown_key_message(cls, str(key)))
        return data


def unknown_key_message(model: type[BaseModel], key: str) -> str:
    import difflib

    allowed = list(model.model_fields)
    hint = ""
    if model is GridSpec and key in (*MODEL_KEYS, *TRAINING_KEYS):
        section = "model" if key in MODEL_KEYS else "training"
        hint = f" (put it under {section}:)"
    elif model is GridSpec and key in ("epochs", "iterations", "time_limit"):
        hint = " (put it under budget:)"
    elif model is GridSpec and key == "dataset":
        hint = " (did you mean datasets?)"
    elif model is GridSpec and key in (*BACKPROP_KEYS, *RANDOM_WALK_KEYS):
        hint = " (optimizer settings go in an optimizers: block)"
    elif issubclass(model, _Block):
        for name, keys in OPTIMIZER_KEYS.items():
            if key in keys or key == BUDGET_KEY[name]:
                hint = f" (a {name} parameter)"
    if not hint and len(key) <= 64:  # difflib's cost grows with the key's length
        close = difflib.get_close_matches(key, allowed, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
    return f"unknown key{hint}; expected one of {', '.join(allowed)}"


class CsvDataset(_Strict):
    """A user's CSV file; ``csv`` is relative to the grid file."""

    csv: str = Field(min_length=1)
    target: str = Field(min_length=1)
    task: str | None = None
    name: str | None = None


def _parse_datasets(value: Any) -> tuple[str | CsvDataset, ...]:
    items = value if isinstance(value, list) else [value]
    if not items:
        raise ValueError("empty list; expected at least one dataset")
    out: list[str | CsvDataset] = []
    for i, item in enumerate(items):
        where: tuple[int, ...] = (i,) if isinstance(value, list) else ()
        if isinstance(item, str):
            out.append(item.strip())
        elif isinstance(item, Mapping):
            out.append(validate_nested(CsvDataset, item, where))
        else:
            raise PathError(
                where,
                f"expected a dataset name or {{csv: path, target: column}}, got {_describe(item)}",
            )
    return tuple(out)


def _parse_seeds(value: Any) -> tuple[int, ...]:
    if isinstance(value, list):
        if not value:
            raise ValueError("empty list; expected a count (seeds: 3) or a list of seeds")
        seeds = []
        for i, v in enumerate(value):
            try:
                seeds.append(_int(v))
            except ValueError as exc:
                raise PathError((i,), str(exc)) from None
        return tuple(seeds)
    count = _int(value, bounded=False)  # a count is checked against MAX_SEEDS below
    if count < 1:
        raise ValueError(f"expected a count >= 1 (seeds 0..count-1) or a list, got {count}")
    if count > MAX_SEEDS:
        raise ValueError(f"at most {MAX_SEEDS:,} seeds, got {count:,}")
    return tuple(range(count))


Datasets = Annotated[tuple[str | CsvDataset, ...], PlainValidator(_parse_datasets)]
Seeds = Annotated[tuple[int, ...], PlainValidator(_parse_seeds)]


# -- sections ---------------------------------------------------------------------------------


class ModelSection(_Strict):
    hidden: HiddenAxis | None = None
    activation: StrAxis | None = None
    init: StrAxis | None = None


class TrainingSection(_Strict):
    dtype: StrAxis | None = None
    val_fraction: FloatAxis | None = None
    log_every: IntAxis | None = None
    target_loss: OptFloatAxis | None = None
    patience: OptIntAxis | None = None


class BudgetSection(_Strict):
    epochs: IntAxis | None = None  # backprop: passes over the training set
    iterations: IntAxis | None = None  # random walk: proposal rounds
    # Forward evaluations (training-set passes) per run, the same for every optimizer.
    evaluations: int | None = Field(None, ge=2, le=INT_MAX)
    # Seconds per run: finite, at most what an int4 holds (the same bound as every integer).
    time_limit: float | None = Field(None, gt=0, le=INT_MAX, allow_inf_nan=False)


ZipGroups = list[Annotated[list[str], Field(min_length=2)]]
ExcludeRules = list[Annotated[dict[str, Any], Field(min_length=1)]]


class _Block(_Strict):
    """Keys every optimizer block may set: overrides of the common axes, and its own rules."""

    datasets: Datasets | None = None
    seeds: Seeds | None = None
    hidden: HiddenAxis | None = None
    activation: StrAxis | None = None
    init: StrAxis | None = None
    dtype: StrAxis | None = None
    val_fraction: FloatAxis | None = None
    log_every: IntAxis | None = None
    target_loss: OptFloatAxis | None = None
    patience: OptIntAxis | None = None
    time_limit: float | None = Field(None, gt=0, le=INT_MAX, allow_inf_nan=False)
    zip: ZipGroups = []
    exclude: ExcludeRules = []
    samples: int | None = Field(None, ge=1, le=MAX_SAMPLES)


class BackpropBlock(_Block):
    optimizer: Literal["backprop"]
    learning_rate: FloatAxis | None = None
    batch_size: OptIntAxis | None = None
    momentum: FloatAxis | None = None
    weight_decay: FloatAxis | None = None
    lr_decay: FloatAxis | None = None
    epochs: IntAxis | None = None


class RandomWalkBlock(_Block):
    optimizer: Literal["random_walk"]
    step_size: FloatAxis | None = None
    temperature: FloatAxis | None = None
    cooling: FloatAxis | None = None
    adapt_step: BoolAxis | None = None
    target_acceptance: FloatAxis | None = None
    candidates: IntAxis | None = None
    quantize: FloatAxis | None = None
    iterations: IntAxis | None = None


BLOCKS: dict[str, type[_Block]] = {"backprop": BackpropBlock, "random_walk": RandomWalkBlock}


def _parse_block(value: Any) -> _Block:
    if not isinstance(value, Mapping):
        raise ValueError(f"expected a mapping with optimizer: backprop|random_walk, got {value!r}")
    name = value.get("optimizer")
    if name is None:
        raise PathError(("optimizer",), "required; expected backprop or random_walk")
    if name not in BLOCKS:
        raise PathError(("optimizer",), f"expected backprop or random_walk, got {name!r}")
    return validate_nested(BLOCKS[name], value, ())


Block = Annotated[BackpropBlock | RandomWalkBlock, PlainValidator(_parse_block)]


class GridSpec(_Strict):
    """A whole grid file (or an inline grid built from command-line options)."""

    name: str | None = Field(None, min_length=1, max_length=200)
    description: str | None = None
    datasets: Datasets
    model: ModelSection = ModelSection()
    training: TrainingSection = TrainingSection()
    optimizers: list[Block] = Field(min_length=1)
    seeds: Seeds = (0,)
    budget: BudgetSection = BudgetSection()
    zip: ZipGroups = []
    exclude: ExcludeRules = []
    # Draws of the random axes, each crossed with the grid's lists.
    samples: int | None = Field(None, ge=1, le=MAX_SAMPLES)
    sampler_seed: int = 0  # seeds the draws, so a random search is reproducible
