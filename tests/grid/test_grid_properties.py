"""Property-based tests of the grid parser and expander (Hypothesis)."""

from __future__ import annotations

import math
import random
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine import TrainConfig
from service.exceptions import GridError
from service.grids import TIME_LIMIT_KEY, config_hash, expand_grid, parse_grid

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

RATES = [0.3, 0.1, 0.05, 0.03, 0.01, 0.003, 0.001]
STEPS = [0.2, 0.1, 0.05, 0.02, 0.01]
NETWORKS = [(4,), (8,), (16,), (8, 4), (16, 8), (32, 16, 8)]


def unique(values: list, lo: int = 1, hi: int = 3) -> st.SearchStrategy[list]:
    return st.lists(st.sampled_from(values), min_size=lo, max_size=hi, unique=True)


@st.composite
def grids(draw: st.DrawFn) -> dict[str, Any]:
    """A valid grid mapping (at most one block per optimizer, so no duplicate runs)."""
    data: dict[str, Any] = {
        "datasets": draw(unique(["moons", "xor", "circles", "blobs"])),
        "model": {
            "hidden": [list(h) for h in draw(unique(NETWORKS))],
            "activation": draw(unique(["relu", "tanh", "sigmoid"])),
        },
        "seeds": draw(st.one_of(st.integers(1, 3), unique(list(range(10))))),
    }
    optimizers = draw(unique(["backprop", "random_walk"], 1, 2))
    blocks = []
    for name in optimizers:
        if name == "backprop":
            rates = draw(unique(RATES))
            block: dict[str, Any] = {"optimizer": name, "learning_rate": rates}
            sizes = draw(unique([8, 16, 32, 64], len(rates), len(rates)))
            if draw(st.booleans()):
                block["batch_size"] = sizes
                if len(rates) > 1 and draw(st.booleans()):
                    block["zip"] = [["learning_rate", "batch_size"]]
        else:
            block = {
                "optimizer": name,
                "step_size": draw(unique(STEPS)),
                "candidates": draw(unique([1, 2, 4], 1, 2)),
            }
        blocks.append(block)
    data["optimizers"] = blocks
    # One (hidden, activation) pair excluded at most, and never the only one.
    if len(data["model"]["hidden"]) * len(data["model"]["activation"]) > 1 and draw(st.booleans()):
        data["exclude"] = [
            {
                "activation": draw(st.sampled_from(["relu", "tanh", "sigmoid"])),
                "hidden": list(draw(st.sampled_from(NETWORKS))),
            }
        ]
    return data


def expected_count(data: dict[str, Any]) -> int:
    """Σ over blocks of Π axis sizes (a zip counts once), minus the excluded combinations."""
    seeds = data["seeds"] if isinstance(data["seeds"], int) else len(data["seeds"])
    n_hidden, n_act = len(data["model"]["hidden"]), len(data["model"]["activation"])
    common = len(data["datasets"]) * n_hidden * n_act * seeds
    total = 0
    for block in data["optimizers"]:
        axes = [len(v) for k, v in block.items() if isinstance(v, list) and k != "zip"]
        if block.get("zip"):
            axes.remove(len(block["batch_size"]))
        size = common * math.prod(axes)
        for rule in data.get("exclude", []):
            if (
                rule["activation"] in data["model"]["activation"]
                and rule["hidden"] in (data["model"]["hidden"])
            ):
                size -= size // (n_hidden * n_act)
        total += size
    return total


def expand(data: dict[str, Any]):
    return expand_grid(parse_grid(data, source="grid.yaml"))


def shuffled(value: Any, rng: random.Random) -> Any:
    """``value`` with the keys of every mapping in another order."""
    if isinstance(value, dict):
        items = list(value.items())
        rng.shuffle(items)
        return {k: shuffled(v, rng) for k, v in items}
    if isinstance(value, list):
        return [shuffled(v, rng) for v in value]
    return value


@SETTINGS
@given(grids())
def test_run_count_is_the_product_of_the_axes_summed_over_blocks_minus_exclusions(data) -> None:
    grid = expand(data)
    assert len(grid) == expected_count(data)
    assert len({r.config_hash for r in grid.runs}) == len(grid)
    for block_index, block in enumerate(data["optimizers"]):
        assert {r.config["optimizer"] for r in grid.runs if r.block == block_index} <= {
            block["optimizer"]
        }


@SETTINGS
@given(grids(), st.integers(0, 2**32 - 1))
def test_order_is_deterministic_and_ignores_key_order(data, seed: int) -> None:
    first = [r.config_hash for r in expand(data).runs]
    assert [r.config_hash for r in expand(data).runs] == first
    assert [r.config_hash for r in expand(shuffled(data, random.Random(seed))).runs] == first


@SETTINGS
@given(grids())
def test_every_config_equals_train_configs_own_canonical_form(data) -> None:
    for run in expand(data).runs:
        config = {k: v for k, v in run.config.items() if k != TIME_LIMIT_KEY}
        canonical = TrainConfig.from_dict(config).to_dict()
        assert config == canonical and list(config) == list(canonical)
        assert run.config_hash == config_hash(canonical)


def _spellings(value: float) -> list[str]:
    mantissa, exponent = f"{value:e}".split("e")
    return [
        repr(value),
        f"{value:.10f}",
        f"{float(mantissa):g}e{int(exponent)}",  # YAML 1.1 reads this as a string
        f"{float(mantissa):.3f}E{int(exponent):+03d}",
    ]


@SETTINGS
@given(unique(RATES, 1, 3), unique(STEPS, 1, 2), st.integers(0, 3), st.integers(0, 3))
def test_the_hash_ignores_how_a_number_is_written(rates, steps, a: int, b: int) -> None:
    def text(pick: int) -> str:
        lr = ", ".join(_spellings(r)[pick] for r in rates)
        ss = ", ".join(_spellings(s)[pick] for s in steps)
        return (
            "datasets: moons\noptimizers:\n"
            f"  - {{optimizer: backprop, learning_rate: [{lr}]}}\n"
            f"  - {{optimizer: random_walk, step_size: [{ss}]}}\n"
        )

    one = expand(yaml.safe_load(text(a)))
    other = expand(yaml.safe_load(text(b)))
    assert [r.config_hash for r in one.runs] == [r.config_hash for r in other.runs]
    assert len(one) == len(rates) + len(steps)


@SETTINGS
@given(
    st.integers(1, 6),
    st.integers(0, 1000),
    st.floats(1e-4, 1e-2),
    st.floats(2e-2, 1.0),
)
def test_random_search_draws_samples_within_bounds_reproducibly(
    samples: int, sampler_seed: int, low: float, high: float
) -> None:
    data = {
        "datasets": "moons",
        "seeds": 2,
        "samples": samples,
        "sampler_seed": sampler_seed,
        "optimizers": [
            {
                "optimizer": "backprop",
                "learning_rate": {"loguniform": [low, high]},
                "momentum": {"uniform": [0.0, 0.9]},
                "batch_size": [16, 32],
            }
        ],
    }
    grid = expand(data)
    assert [r.config_hash for r in expand(data).runs] == [r.config_hash for r in grid.runs]
    draws = {(r.config["learning_rate"], r.config["momentum"]) for r in grid.runs}
    assert len(grid) + grid.duplicates == samples * 2 * 2
    assert len(draws) <= samples
    for lr, momentum in draws:
        assert low <= lr <= high and 0.0 <= momentum <= 0.9


# -- the parser never fails with anything but a one-line GridError ---------------------------

KEYS = [
    "name", "datasets", "model", "training", "optimizers", "seeds", "budget", "zip", "exclude",
    "samples", "sampler_seed", "optimizer", "hidden", "activation", "learning_rate",
    "step_size", "batch_size", "epochs", "iterations", "time_limit", "uniform", "choice",
    "csv", "target", "candidates", "momentum", "val_fraction",
]  # fmt: skip
LEAVES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 100),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["moons", "xor", "relu", "tanh", "backprop", "random_walk", "16x8", "", "x"]),
    st.text(max_size=5),
)
JUNK = st.recursive(
    LEAVES,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.sampled_from(KEYS), inner, max_size=5),
    ),
    max_leaves=25,
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(KEYS), JUNK, max_size=8))
def test_any_input_gives_a_grid_or_one_line_grid_error(data) -> None:
    try:
        grid = expand_grid(parse_grid(data, source="grid.yaml"), max_runs=10_000)
    except GridError as exc:
        message = str(exc)
        assert message.startswith("grid.yaml: ") and "\n" not in message
    else:
        assert len(grid) >= 1
        for run in grid.runs[:50]:
            config = {k: v for k, v in run.config.items() if k != TIME_LIMIT_KEY}
            assert TrainConfig.from_dict(config).to_dict() == config
