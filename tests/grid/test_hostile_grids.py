"""Hostile grids: every malformed grid is refused with one line, exit 2, nothing written.

The cases found by hand (integers past what the stores hold, /dev/zero as a CSV,
nesting tens of thousands deep, a YAML alias bomb, duplicate keys, a network of
10^12 weights) through the real `mlpq submit`; then Hypothesis generates more of
each class and checks the same contract on the parser itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.exceptions import GridError
from service.grids import load_grid

MLPQ = str(Path(sys.executable).with_name("mlpq"))
BASE: dict[str, Any] = {
    "name": "hostile",
    "datasets": ["moons"],
    "model": {"hidden": [[8]]},
    "seeds": 1,
    "budget": {"epochs": 5, "iterations": 5},
    "optimizers": [{"optimizer": "backprop", "learning_rate": 0.1}],
}

ALIAS_BOMB = """\
a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]
name: bomb
datasets: [moons]
seeds: *i
optimizers: [{optimizer: backprop}]
"""


def _with(path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    grid = json.loads(json.dumps(BASE))
    node = grid
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return grid


LR = ("optimizers", 0, "learning_rate")
HIDDEN = ("model", "hidden")
ZERO = {"csv": "/dev/zero", "target": "y"}

# (file name, content, words the one line must hold)
CASES: list[tuple[str, str, tuple[str, ...]]] = [
    ("seed.json", json.dumps(_with(("seeds",), [2**70])), ("seeds[0]", "2,147,483,647")),
    ("seed3e9.json", json.dumps(_with(("seeds",), [3_000_000_000])), ("seeds[0]", "2,147,483,647")),
    ("batch.yaml", "batch_size: 1e30\n" + yaml.safe_dump(BASE), ("batch_size",)),
    (
        "batch.json",
        json.dumps(_with(("optimizers", 0, "batch_size"), 3_000_000_000)),
        ("batch_size", "2,147,483,647"),
    ),
    (
        "epochs.json",
        json.dumps(_with(("budget", "epochs"), 3_000_000_000)),
        ("epochs", "2,147,483,647"),
    ),
    (
        "candidates.json",
        json.dumps(
            _with(("optimizers",), [{"optimizer": "random_walk", "candidates": 3_000_000_000}])
        ),
        ("candidates", "2,147,483,647"),
    ),
    (
        "lr.yaml",
        yaml.safe_dump(_with(("optimizers", 0, "learning_rate"), 1e308 * 10)),
        ("learning_rate", "finite"),
    ),
    (
        "zero.json",
        json.dumps(_with(("datasets",), [{"csv": "/dev/zero", "target": "y"}])),
        ("datasets[0].csv", "not a regular file"),
    ),
    ("deep.json", "[" * 50_000 + "]" * 50_000, ("nested deeper than",)),
    ("deep.yaml", "a: " + "[" * 50_000 + "]" * 50_000 + "\n", ("nested deeper than",)),
    ("deep.toml", "a = " + "[" * 50_000 + "]" * 50_000 + "\n", ("nested deeper than",)),
    ("bomb.yaml", ALIAS_BOMB, ("aliases",)),
    (
        "dup.yaml",
        "name: a\n" + yaml.safe_dump(BASE),
        ("duplicate key 'name'",),
    ),
    ("dup.json", '{"seeds": 1, "seeds": 2}', ("duplicate key 'seeds'",)),
    # Integer literals past Python's own digit bound fail inside the parsers themselves.
    ("digits.yaml", "seeds: [" + "9" * 5000 + "]\n", ("4,300 digits",)),
    ("digits.json", '{"seeds": [' + "9" * 5000 + "]}", ("4,300 digits",)),
    ("digits.toml", "seeds = [" + "9" * 5000 + "]\n", ("4,300 digits",)),
    ("date.yaml", "name: x\nwhen: 2020-13-45\n", ("invalid value", "month")),
    (
        "time_limit.yaml",
        yaml.safe_dump(_with(("budget", "time_limit"), float("inf"))),
        ("budget.time_limit", "finite"),
    ),
    (
        "time_limit.json",
        json.dumps(_with(("budget", "time_limit"), 1e300)),
        ("budget.time_limit", "2,147,483,647"),
    ),
    # A huge unknown key is shown cut, and not compared with every known key at length.
    ("key.json", json.dumps(BASE | {"k" * 500_000: 1}), ("kkk...: unknown key",)),
    (
        "huge.json",
        json.dumps(_with(("model", "hidden"), [[1_000_000, 1_000_000]])),
        ("model.hidden", "MLPQ_MAX_PARAMETERS"),
    ),
    (
        "memory.json",
        json.dumps(
            _with(
                ("optimizers",),
                [{"optimizer": "random_walk", "candidates": 200}],
            )
            | {"model": {"hidden": [[2000, 2000]]}}
        ),
        ("model.hidden", "MLPQ_MAX_RUN_MEMORY_MB"),
    ),
]


@pytest.mark.parametrize(("name", "content", "words"), CASES, ids=[c[0] for c in CASES])
def test_a_hostile_grid_file_is_refused_in_one_line_and_nothing_is_written(
    name: str, content: str, words: tuple[str, ...], tmp_path: Path
) -> None:
    (tmp_path / name).write_text(content)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLPQ_")}
    result = subprocess.run(
        [MLPQ, "submit", name], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"mlpq: {name}: "), result.stderr[-2000:]
    assert len(lines[0]) < 400
    for word in words:
        assert word in lines[0], lines[0]
    assert result.stdout == ""
    assert not (tmp_path / ".mlpq" / "mlpq.db").exists()  # no store, so no run and no message


def test_a_csv_larger_than_the_cap_is_refused_naming_the_setting(tmp_path: Path) -> None:
    (tmp_path / "big.csv").write_text("a,y\n" + "0.5,1\n" * 2000)
    (tmp_path / "g.json").write_text(
        json.dumps(_with(("datasets",), [{"csv": "big.csv", "target": "y"}]))
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLPQ_")}
    env["MLPQ_MAX_CSV_BYTES"] = "1000"
    result = subprocess.run(
        [MLPQ, "submit", "g.json"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "mlpq: g.json: datasets[0].csv: big.csv is larger than 1,000 bytes (MLPQ_MAX_CSV_BYTES)"
    )


# -- generated ----------------------------------------------------------------------------

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
INT_KEYS = [
    ("seeds",),
    ("optimizers", 0, "batch_size"),
    ("budget", "epochs"),
    ("optimizers", 0, "log_every"),
    ("optimizers", 0, "patience"),
]
out_of_range = st.one_of(st.integers(min_value=2**31), st.integers(max_value=-(2**31) - 1))
non_finite = st.sampled_from([float("inf"), float("-inf"), float("nan"), 1e301, -1e305])


def _refused(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(GridError) as info:
        load_grid(path)
    message = str(info.value)
    assert "\n" not in message and len(message) < 400 and message.startswith(str(path))
    return message


@SETTINGS
@given(path=st.sampled_from(INT_KEYS), value=out_of_range, as_list=st.booleans())
def test_integers_beyond_the_stores_are_refused(
    tmp_path_factory: pytest.TempPathFactory, path: tuple[Any, ...], value: int, as_list: bool
) -> None:
    grid = _with(path, [value] if as_list else value)
    message = _refused(tmp_path_factory.mktemp("g"), "g.json", json.dumps(grid))
    assert str(path[-1]) in message


@SETTINGS
@given(value=non_finite, key=st.sampled_from(["learning_rate", "momentum", "weight_decay"]))
def test_non_finite_and_huge_numbers_are_refused(
    tmp_path_factory: pytest.TempPathFactory, value: float, key: str
) -> None:
    grid = _with(("optimizers", 0, key), value)
    message = _refused(tmp_path_factory.mktemp("g"), "g.yaml", yaml.safe_dump(grid))
    assert key in message


@SETTINGS
@given(
    depth=st.integers(33, 3000),
    fmt=st.sampled_from(["json", "yaml", "toml"]),
    opener=st.sampled_from(["[", "{"]),
)
def test_deep_nesting_is_refused_before_python_recurses(
    tmp_path_factory: pytest.TempPathFactory, depth: int, fmt: str, opener: str
) -> None:
    closer = {"[": "]", "{": "}"}[opener]
    inner = "1" if opener == "[" else ""
    if opener == "{":  # nested inline tables/objects: {a: {a: ...}}
        body = ("{a: " if fmt == "yaml" else '{"a": ' if fmt == "json" else "{a = ") * depth
        body = body + "1" + closer * depth
    else:
        body = opener * depth + inner + closer * depth
    text = {"json": '{"x": ' + body + "}", "yaml": "x: " + body + "\n", "toml": "x = " + body}[fmt]
    message = _refused(tmp_path_factory.mktemp("g"), f"g.{fmt}", text)
    assert "nested deeper than" in message


@SETTINGS
@given(key=st.sampled_from(list(BASE)), fmt=st.sampled_from(["json", "yaml"]))
def test_duplicate_keys_are_refused_in_every_format(
    tmp_path_factory: pytest.TempPathFactory, key: str, fmt: str
) -> None:
    if fmt == "json":
        text = json.dumps(BASE)[:-1] + f', "{key}": {json.dumps(BASE[key])}}}'
    else:
        text = yaml.safe_dump(BASE) + yaml.safe_dump({key: BASE[key]})
    message = _refused(tmp_path_factory.mktemp("g"), f"g.{fmt}", text)
    assert f"duplicate key '{key}'" in message


@SETTINGS
@given(width=st.integers(3200, 10**7), layers=st.integers(2, 4))
def test_networks_past_the_parameter_cap_are_refused(
    tmp_path_factory: pytest.TempPathFactory, width: int, layers: int
) -> None:
    grid = _with(("model", "hidden"), [[width] * layers])
    message = _refused(tmp_path_factory.mktemp("g"), "g.json", json.dumps(grid))
    assert "MLPQ_MAX_PARAMETERS" in message
