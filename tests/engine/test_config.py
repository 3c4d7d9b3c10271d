"""TrainConfig: validation with key-first messages, canonical dicts, round trips."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine import ACTIVATIONS, DATASETS, OPTIMIZERS, ConfigError, TrainConfig

CSV = "csv:" + "ab" * 32


def test_defaults_fill_in_and_to_dict_keeps_only_the_optimizers_keys() -> None:
    c = TrainConfig.from_dict({"dataset": "moons", "optimizer": "random_walk"})
    d = c.to_dict()
    assert d == {
        "dataset": "moons",
        "target": None,
        "task": None,
        "hidden": [32],
        "activation": "relu",
        "optimizer": "random_walk",
        "seed": 0,
        "max_steps": 100,
        "dtype": "float64",
        "val_fraction": 0.2,
        "log_every": 1,
        "init": "auto",
        "target_loss": None,
        "patience": None,
        "step_size": 0.05,
        "temperature": 0.0,
        "cooling": 1.0,
        "adapt_step": False,
        "target_acceptance": 0.25,
        "candidates": 1,
    }
    b = TrainConfig.from_dict({"dataset": "moons", "optimizer": "backprop"}).to_dict()
    assert {"learning_rate", "batch_size", "momentum", "weight_decay", "lr_decay"} <= set(b)
    assert "step_size" not in b and "learning_rate" not in d
    assert json.loads(json.dumps(d)) == d


def test_lists_ints_for_floats_and_numpy_ints_are_normalized() -> None:
    import numpy as np

    c = TrainConfig.from_dict(
        {
            "dataset": "iris",
            "optimizer": "backprop",
            "hidden": [8, np.int64(4)],
            "learning_rate": 1,
            "max_steps": np.int32(5),
        }
    )
    assert c.hidden == (8, 4) and type(c.hidden[1]) is int
    assert c.learning_rate == 1.0 and type(c.learning_rate) is float
    assert type(c.max_steps) is int
    assert c.to_dict()["hidden"] == [8, 4]
    no_hidden = TrainConfig.from_dict({"dataset": "iris", "optimizer": "backprop", "hidden": []})
    assert no_hidden.hidden == ()


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"step_size": 0}, "step_size: must be > 0, got 0"),
        ({"learning_rate": -1, "optimizer": "backprop"}, "learning_rate: must be > 0, got -1"),
        ({"learning_rate": 0.1}, "learning_rate: not a parameter of random_walk"),
        ({"step_size": 0.1, "optimizer": "backprop"}, "step_size: not a parameter of backprop"),
        ({"colour": "red"}, "colour: unknown parameter"),
        ({"optimizer": "adam"}, "optimizer: must be one of backprop, random_walk; got 'adam'"),
        ({"activation": "gelu"}, "activation: must be one of"),
        ({"dataset": "mnist"}, "dataset: must be one of"),
        ({"max_steps": 1.5}, "max_steps: must be an integer, got 1.5"),
        ({"max_steps": True}, "max_steps: must be an integer, got True"),
        ({"max_steps": 0}, "max_steps: must be >= 1, got 0"),
        ({"candidates": "4"}, "candidates: must be an integer, got '4'"),
        ({"temperature": -0.5}, "temperature: must be >= 0, got -0.5"),
        ({"temperature": float("nan")}, "temperature: must be finite"),
        ({"cooling": 1.5}, "cooling: must be <= 1, got 1.5"),
        ({"cooling": 0}, "cooling: must be > 0, got 0"),
        ({"adapt_step": 1}, "adapt_step: must be true or false, got 1"),
        ({"target_acceptance": 1}, "target_acceptance: must be < 1, got 1"),
        ({"val_fraction": 0}, "val_fraction: must be > 0, got 0"),
        ({"hidden": 32}, "hidden: must be a list of layer sizes, got 32"),
        ({"hidden": [8, 0]}, "hidden: layer sizes must be integers >= 1"),
        ({"dtype": "float16"}, "dtype: must be one of float32, float64"),
        ({"init": "zeros"}, "init: must be one of auto, he, xavier"),
        ({"seed": -1}, "seed: must be >= 0, got -1"),
        ({"patience": 0}, "patience: must be >= 1, got 0"),
        ({"target_loss": "low"}, "target_loss: must be a number, got 'low'"),
        ({"target": "y"}, "target: only for csv datasets"),
        ({"task": "regression"}, "task: moons is a binary dataset"),
        ({"dataset": CSV}, f"target: required for csv dataset {CSV}"),
        ({"dataset": "csv:xyz", "target": "y"}, "dataset: must be one of"),
    ],
)
def test_invalid_configs_raise_config_error_starting_with_the_key(patch, message) -> None:
    d = {"dataset": "moons", "optimizer": "random_walk", **patch}
    with pytest.raises(ConfigError) as info:
        TrainConfig.from_dict(d)
    assert str(info.value).startswith(message), str(info.value)
    assert isinstance(info.value, ValueError)
    assert info.value.key == message.split(":")[0]


@pytest.mark.parametrize("missing", ["dataset", "optimizer"])
def test_dataset_and_optimizer_are_required(missing) -> None:
    d = {"dataset": "moons", "optimizer": "backprop"}
    del d[missing]
    with pytest.raises(ConfigError, match=rf"^{missing}: required"):
        TrainConfig.from_dict(d)


def test_direct_construction_is_validated_too() -> None:
    with pytest.raises(ConfigError, match=r"^learning_rate: not a parameter of random_walk"):
        TrainConfig(dataset="xor", optimizer="random_walk", learning_rate=0.5)
    with pytest.raises(ConfigError, match=r"^batch_size: must be >= 1"):
        TrainConfig(dataset="xor", optimizer="backprop", batch_size=0)


def test_a_built_in_datasets_own_task_is_canonically_none() -> None:
    c = TrainConfig.from_dict({"dataset": "iris", "optimizer": "backprop", "task": "multiclass"})
    assert c.task is None and c == TrainConfig(dataset="iris", optimizer="backprop")


def test_csv_dataset_with_target_and_task() -> None:
    c = TrainConfig.from_dict(
        {"dataset": CSV, "target": "price", "task": "regression", "optimizer": "backprop"}
    )
    assert TrainConfig.from_dict(c.to_dict()) == c


def test_config_is_frozen_and_hashable() -> None:
    c = TrainConfig(dataset="xor", optimizer="backprop")
    with pytest.raises(AttributeError):
        c.seed = 3  # type: ignore[misc]
    assert hash(c) == hash(TrainConfig.from_dict(c.to_dict()))


_common = {
    "dataset": st.sampled_from(DATASETS),
    "hidden": st.lists(st.integers(1, 64), max_size=3),
    "activation": st.sampled_from(sorted(ACTIVATIONS)),
    "seed": st.integers(0, 2**32),
    "max_steps": st.integers(1, 10_000),
    "dtype": st.sampled_from(["float32", "float64"]),
    "val_fraction": st.floats(0.01, 0.99),
    "log_every": st.integers(1, 100),
    "init": st.sampled_from(["auto", "he", "xavier"]),
    "target_loss": st.none() | st.floats(0, 10),
    "patience": st.none() | st.integers(1, 100),
}
_backprop = {
    "learning_rate": st.floats(1e-6, 10) | st.integers(1, 3),
    "batch_size": st.none() | st.integers(1, 512),
    "momentum": st.floats(0, 0.99),
    "weight_decay": st.floats(0, 1),
    "lr_decay": st.floats(0, 1),
}
_random_walk = {
    "step_size": st.floats(1e-6, 10),
    "temperature": st.floats(0, 10),
    "cooling": st.floats(0.5, 1),
    "adapt_step": st.booleans(),
    "target_acceptance": st.floats(0.01, 0.99),
    "candidates": st.integers(1, 64),
}


@st.composite
def configs(draw) -> dict:
    optimizer = draw(st.sampled_from(OPTIMIZERS))
    own = _backprop if optimizer == "backprop" else _random_walk
    d = {"optimizer": optimizer}
    for key, strategy in {**_common, **own}.items():
        if key == "dataset" or draw(st.booleans()):
            d[key] = draw(strategy)
    return d


@settings(max_examples=200, deadline=None)
@given(d=configs())
def test_from_dict_to_dict_round_trips(d) -> None:
    c = TrainConfig.from_dict(d)
    canonical = c.to_dict()
    assert TrainConfig.from_dict(canonical) == c
    assert TrainConfig.from_dict(json.loads(json.dumps(canonical))).to_dict() == canonical
    for key, value in d.items():
        expected = list(value) if key == "hidden" else value
        assert canonical[key] == expected
