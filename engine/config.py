"""The canonical run configuration: ``TrainConfig``.

Field names are the keys of the grid file, of ``runs.config`` in the database
and of the columns beside it. ``TrainConfig.from_dict`` validates a mapping
(unknown keys, keys of the other optimizer, types, ranges, names) and raises
``ConfigError`` whose message starts with the key; constructing a
``TrainConfig`` directly runs the same checks. ``to_dict`` gives the canonical
JSON-able form: only the keys of the run's optimizer, defaults filled, floats as
floats, ``hidden`` as a list.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from engine.errors import ConfigError
from engine.names import ACTIVATION_NAMES, DATASET_TASKS, DATASETS, TASKS

#: The optimization methods, in the order the docs list them.
OPTIMIZERS: tuple[str, ...] = ("backprop", "random_walk")
DTYPES: tuple[str, ...] = ("float32", "float64")
INITS: tuple[str, ...] = ("auto", "he", "xavier")

_CSV_NAME = re.compile(r"csv:[0-9a-f]{64}")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """One training run, fully specified. See the module docstring for the rules."""

    # -- common ----------------------------------------------------------------------------
    dataset: str  # a name in DATASETS, or "csv:<sha256 hex of the file>" for a user CSV
    target: str | None = None  # the CSV's target column (CSV datasets only)
    task: str | None = None  # multiclass|binary|regression; None = the dataset's own
    hidden: tuple[int, ...] = (32,)  # hidden layer sizes; () = no hidden layer
    activation: str = "relu"  # hidden-layer activation, a key of ACTIVATIONS
    optimizer: str  # "backprop" or "random_walk"
    seed: int = 0  # drives the data, the split, the initial weights and training
    max_steps: int = 100  # epochs for backprop, iterations for random walk
    max_evaluations: int | None = None  # stop before a step would pass this many evaluations
    dtype: str = "float64"  # float32 or float64 for data, weights and arithmetic
    val_fraction: float = 0.2  # share of the samples held out for validation
    log_every: int = 1  # emit a metrics record every this many steps (and at the last)
    init: str = "auto"  # auto (He for relu/leaky_relu, else Xavier), he or xavier
    target_loss: float | None = None  # stop once the training loss is <= this
    patience: int | None = None  # stop after this many steps without a new best training loss
    # -- backprop only ---------------------------------------------------------------------
    learning_rate: float = 0.01  # eta in dw = -eta dE/dw
    batch_size: int | None = None  # samples per mini-batch; None = full batch
    momentum: float = 0.0  # classical momentum: v = m v - eta g; w += v
    weight_decay: float = 0.0  # L2 penalty alpha, scikit-learn's convention alpha/(2n) sum w^2
    lr_decay: float = 0.0  # lr at epoch t (from 0) = learning_rate / (1 + lr_decay t)
    # -- random_walk only ------------------------------------------------------------------
    step_size: float = 0.05  # sigma of the Gaussian proposal over all weights and biases
    temperature: float = 0.0  # T0 of the acceptance test; 0 = accept improvements only
    cooling: float = 1.0  # T_t = T0 cooling^t; 1 = constant temperature
    adapt_step: bool = False  # adapt sigma toward target_acceptance
    target_acceptance: float = 0.25  # acceptance rate the adaptation aims for
    candidates: int = 1  # proposals per iteration, evaluated in one batched pass
    quantize: float | None = None  # round every proposal's weights to multiples of this

    def __post_init__(self) -> None:
        for name, value in _validated(self).items():
            object.__setattr__(self, name, value)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrainConfig:
        """Validate ``d`` and build the config; raises ConfigError naming the key."""
        if not isinstance(d, Mapping):
            raise ConfigError("config", f"must be a mapping, got {type(d).__name__}")
        for key in d:
            if key not in _FIELDS:
                raise ConfigError(str(key), "unknown parameter")
        for key in ("dataset", "optimizer"):
            if key not in d:
                raise ConfigError(key, "required")
        optimizer = _choice(OPTIMIZERS)("optimizer", d["optimizer"])
        for key in d:
            owner = _OWNER.get(key)
            if owner is not None and owner != optimizer:
                raise ConfigError(key, f"not a parameter of {optimizer}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        """The canonical JSON-able dict: common keys, then this optimizer's keys."""
        out: dict[str, Any] = {}
        for name in _FIELDS:
            owner = _OWNER.get(name)
            if owner is None or owner == self.optimizer:
                value = getattr(self, name)
                if value is None and name in ADDED_LATER:
                    continue  # unset: the canonical dict (and its hash) is what it was before
                out[name] = list(value) if name == "hidden" else value
        return out


_FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(TrainConfig)}
#: Keys added after runs were first stored: left out of ``to_dict`` while unset, so the
#: config hashes of runs that do not use them stay the same (re-submitting stays safe).
ADDED_LATER: frozenset[str] = frozenset({"quantize", "max_evaluations"})
#: The keys only one optimizer takes, in the order the grid files list them.
OPTIMIZER_PARAMS: dict[str, tuple[str, ...]] = {
    "backprop": ("learning_rate", "batch_size", "momentum", "weight_decay", "lr_decay"),
    "random_walk": (
        "step_size",
        "temperature",
        "cooling",
        "adapt_step",
        "target_acceptance",
        "candidates",
        "quantize",
    ),
}
#: The optimizer a key belongs to; common keys are absent.
_OWNER: dict[str, str] = {
    key: optimizer for optimizer, keys in OPTIMIZER_PARAMS.items() for key in keys
}


# -- value checkers: (key, value) -> normalized value, or ConfigError ---------------------

Check = Callable[[str, Any], Any]


def _number(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(key, f"must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ConfigError(key, f"must be finite, got {value!r}")
    return value


def _integer(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConfigError(key, f"must be an integer, got {value!r}")
    return int(value)


def _ranged(
    kind: Check,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
    hi_open: bool = False,
) -> Check:
    def check(key: str, given: Any) -> Any:
        value = kind(key, given)
        if lo is not None and (value <= lo if lo_open else value < lo):
            raise ConfigError(key, f"must be {'>' if lo_open else '>='} {lo:g}, got {given!r}")
        if hi is not None and (value >= hi if hi_open else value > hi):
            raise ConfigError(key, f"must be {'<' if hi_open else '<='} {hi:g}, got {given!r}")
        return value

    return check


def _optional(check: Check) -> Check:
    def inner(key: str, value: Any) -> Any:
        return None if value is None else check(key, value)

    return inner


def _string(key: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ConfigError(key, f"must be a string, got {value!r}")
    return value


def _choice(options: tuple[str, ...]) -> Check:
    def check(key: str, value: Any) -> str:
        value = _string(key, value)
        if value not in options:
            raise ConfigError(key, f"must be one of {', '.join(options)}; got {value!r}")
        return value

    return check


def _boolean(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(key, f"must be true or false, got {value!r}")
    return value


def _hidden(key: str, value: Any) -> tuple[int, ...]:
    if isinstance(value, str) or not isinstance(value, list | tuple):
        raise ConfigError(key, f"must be a list of layer sizes, got {value!r}")
    sizes = []
    for size in value:
        if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 1:
            raise ConfigError(key, f"layer sizes must be integers >= 1, got {value!r}")
        sizes.append(int(size))
    return tuple(sizes)


def _dataset(key: str, value: Any) -> str:
    value = _string(key, value)
    if value not in DATASETS and not _CSV_NAME.fullmatch(value):
        raise ConfigError(
            key,
            f"must be one of {', '.join(DATASETS)} or csv:<sha256 hex>; got {value!r}",
        )
    return value


_positive = _ranged(_number, 0, lo_open=True)
_non_negative = _ranged(_number, 0)

_CHECKS: dict[str, Check] = {
    "dataset": _dataset,
    "target": _optional(_string),
    "task": _optional(_choice(TASKS)),
    "hidden": _hidden,
    "activation": _choice(ACTIVATION_NAMES),
    "optimizer": _choice(OPTIMIZERS),
    "seed": _ranged(_integer, 0),
    "max_steps": _ranged(_integer, 1),
    "max_evaluations": _optional(_ranged(_integer, 2)),
    "dtype": _choice(DTYPES),
    "val_fraction": _ranged(_number, 0, 1, lo_open=True, hi_open=True),
    "log_every": _ranged(_integer, 1),
    "init": _choice(INITS),
    "target_loss": _optional(_non_negative),
    "patience": _optional(_ranged(_integer, 1)),
    "learning_rate": _positive,
    "batch_size": _optional(_ranged(_integer, 1)),
    "momentum": _ranged(_number, 0, 1, hi_open=True),
    "weight_decay": _non_negative,
    "lr_decay": _non_negative,
    "step_size": _positive,
    "temperature": _non_negative,
    "cooling": _ranged(_number, 0, 1, lo_open=True),
    "adapt_step": _boolean,
    "target_acceptance": _ranged(_number, 0, 1, lo_open=True, hi_open=True),
    "candidates": _ranged(_integer, 1),
    "quantize": _optional(_positive),
}


def passes_per_step(config: Mapping[str, Any]) -> int:
    """Training-set passes one step of ``config`` costs: 1 an epoch, ``candidates`` an iteration."""
    if config["optimizer"] == "random_walk":
        return int(config.get("candidates", 1))
    return 1


def steps_within(max_evaluations: int, config: Mapping[str, Any]) -> int:
    """The steps ``config`` can take within ``max_evaluations`` (after the initial evaluation).

    Raises ConfigError when not even one step fits.
    """
    steps = (max_evaluations - 1) // passes_per_step(config)
    if steps < 1:
        raise ConfigError(
            "max_evaluations",
            f"{max_evaluations} leaves no step: one costs {passes_per_step(config)} "
            "evaluation(s) after the initial one",
        )
    return steps


def _validated(config: TrainConfig) -> dict[str, Any]:
    """Check every field of ``config``; return the normalized values."""
    values: dict[str, Any] = {}
    for name in _FIELDS:
        values[name] = _CHECKS[name](name, getattr(config, name))
    optimizer = values["optimizer"]
    for name, owner in _OWNER.items():
        if owner != optimizer and values[name] != _FIELDS[name].default:
            raise ConfigError(name, f"not a parameter of {optimizer}")
    dataset = values["dataset"]
    if dataset in DATASETS:
        if values["target"] is not None:
            raise ConfigError("target", f"only for csv datasets, not {dataset}")
        native = DATASET_TASKS[dataset]
        if values["task"] not in (None, native):
            raise ConfigError("task", f"{dataset} is a {native} dataset, got {values['task']!r}")
        values["task"] = None  # canonical: a built-in's own task is implied
    elif not values["target"]:
        raise ConfigError("target", f"required for csv dataset {dataset}")
    if values["max_evaluations"] is not None:
        steps_within(values["max_evaluations"], values)
    return values
