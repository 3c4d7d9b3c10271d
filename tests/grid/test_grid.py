"""Grid files: formats, axes, blocks, zip, exclude, random search, CSV datasets."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from engine import TrainConfig
from service.exceptions import GridError
from service.grids import TIME_LIMIT_KEY, config_hash, inline_grid, load_grid

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

BASIC = """\
name: basic
datasets: [moons, xor]
model:
  hidden: [[16], "32x16"]
  activation: [tanh, relu]
seeds: 3
budget: {epochs: 30, iterations: 200}
optimizers:
  - optimizer: backprop
    learning_rate: [0.1, 0.01]
    batch_size: 32
  - optimizer: random_walk
    step_size: 0.05
"""


def write(tmp_path: Path, text: str, name: str = "grid.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def grid_of(tmp_path: Path, text: str, **kw):
    return load_grid(write(tmp_path, text), **kw)


def test_axes_cross_and_optimizer_blocks_add_up(tmp_path: Path) -> None:
    grid = grid_of(tmp_path, BASIC)
    # 2 datasets x 2 networks x 2 activations x 3 seeds, times 2 rates + 1 step size.
    assert len(grid) == 2 * 2 * 2 * 3 * (2 + 1)
    backprop = [r.config for r in grid.runs if r.config["optimizer"] == "backprop"]
    walk = [r.config for r in grid.runs if r.config["optimizer"] == "random_walk"]
    assert len(backprop) == 48 and len(walk) == 24
    assert {c["max_steps"] for c in backprop} == {30} and {c["max_steps"] for c in walk} == {200}
    assert {tuple(c["hidden"]) for c in backprop} == {(16,), (32, 16)}
    assert {c["learning_rate"] for c in backprop} == {0.1, 0.01}
    assert all("learning_rate" not in c for c in walk)
    # Seeds vary fastest, blocks come in file order.
    assert [r.config["seed"] for r in grid.runs[:4]] == [0, 1, 2, 0]
    assert grid.runs[0].config["optimizer"] == "backprop"
    assert grid.name == "basic" and grid.spec["grid"]["name"] == "basic"


def test_every_run_is_the_canonical_train_config_and_hashes_as_such(tmp_path: Path) -> None:
    grid = grid_of(tmp_path, BASIC)
    hashes = set()
    for run in grid.runs:
        canonical = TrainConfig.from_dict(run.config).to_dict()
        assert run.config == canonical and list(run.config) == list(canonical)
        text = json.dumps(canonical, sort_keys=True, separators=(",", ":"))
        assert run.config_hash == hashlib.sha256(text.encode()).hexdigest()
        hashes.add(run.config_hash)
    assert len(hashes) == len(grid)


def test_yaml_json_and_toml_give_the_same_runs(tmp_path: Path) -> None:
    import yaml

    data = yaml.safe_load(BASIC)
    from_yaml = load_grid(write(tmp_path, BASIC))
    from_json = load_grid(write(tmp_path, json.dumps(data), "grid.json"))
    toml = """\
name = "basic"
datasets = ["moons", "xor"]
seeds = 3
[model]
hidden = [[16], "32x16"]
activation = ["tanh", "relu"]
[budget]
epochs = 30
iterations = 200
[[optimizers]]
optimizer = "backprop"
learning_rate = [0.1, 0.01]
batch_size = 32
[[optimizers]]
optimizer = "random_walk"
step_size = 0.05
"""
    from_toml = load_grid(write(tmp_path, toml, "grid.toml"))
    expected = [r.config_hash for r in from_yaml.runs]
    assert [r.config_hash for r in from_json.runs] == expected
    assert [r.config_hash for r in from_toml.runs] == expected


@pytest.mark.parametrize(
    ("hidden", "expected"),
    [
        ("16", [(16,)]),
        ("[32, 16]", [(32, 16)]),
        ("'32x16'", [(32, 16)]),
        ("[[16], [32, 16]]", [(16,), (32, 16)]),
        ("['16', '64x32x8']", [(16,), (64, 32, 8)]),
        ("[]", [()]),
    ],
)
def test_hidden_layers_are_lists_or_x_strings(
    tmp_path: Path, hidden: str, expected: list[tuple[int, ...]]
) -> None:
    grid = grid_of(
        tmp_path,
        f"datasets: moons\nmodel: {{hidden: {hidden}}}\noptimizers: [{{optimizer: backprop}}]\n",
    )
    assert [tuple(r.config["hidden"]) for r in grid.runs] == expected


def test_seeds_as_a_count_or_a_list(tmp_path: Path) -> None:
    base = "datasets: moons\noptimizers: [{optimizer: backprop}]\n"
    assert [r.config["seed"] for r in grid_of(tmp_path, base + "seeds: 3\n").runs] == [0, 1, 2]
    assert [r.config["seed"] for r in grid_of(tmp_path, base + "seeds: [7, 42]\n").runs] == [7, 42]
    assert [r.config["seed"] for r in grid_of(tmp_path, base).runs] == [0]


def test_zip_ties_axes_instead_of_crossing_them(tmp_path: Path) -> None:
    grid = grid_of(
        tmp_path,
        """\
datasets: moons
optimizers:
  - optimizer: backprop
    learning_rate: [0.1, 0.01, 0.001]
    batch_size: [16, 64, 256]
    momentum: [0.0, 0.9]
    zip: [[learning_rate, batch_size]]
""",
    )
    pairs = [(r.config["learning_rate"], r.config["batch_size"]) for r in grid.runs]
    assert len(grid) == 3 * 2
    assert set(pairs) == {(0.1, 16), (0.01, 64), (0.001, 256)}


def test_top_level_zip_applies_to_the_blocks_that_have_its_keys(tmp_path: Path) -> None:
    grid = grid_of(
        tmp_path,
        """\
datasets: moons
model: {hidden: [[8], [16]], activation: [tanh, relu]}
zip: [[hidden, activation]]
optimizers:
  - {optimizer: backprop}
  - {optimizer: random_walk}
""",
    )
    combos = {(tuple(r.config["hidden"]), r.config["activation"]) for r in grid.runs}
    assert len(grid) == 4 and combos == {((8,), "tanh"), ((16,), "relu")}


def test_exclude_drops_matching_combinations_only(tmp_path: Path) -> None:
    grid = grid_of(
        tmp_path,
        """\
datasets: [moons, xor]
model: {hidden: [[16], [64, 64]], activation: [sigmoid, tanh]}
exclude:
  - {activation: sigmoid, hidden: [64, 64]}
  - {dataset: xor, optimizer: random_walk}
optimizers:
  - {optimizer: backprop, learning_rate: [0.1, 1e-2]}
  - {optimizer: random_walk, step_size: 0.1, exclude: [{step_size: 0.1, activation: tanh}]}
""",
    )
    configs = [r.config for r in grid.runs]
    assert not any(c["activation"] == "sigmoid" and c["hidden"] == [64, 64] for c in configs)
    assert not any(c["dataset"] == "xor" and c["optimizer"] == "random_walk" for c in configs)
    walk = [c for c in configs if c["optimizer"] == "random_walk"]
    assert {c["activation"] for c in walk} == {"sigmoid"}
    # backprop: 2 x 4 x 2 = 16, minus 2 x 2 sigmoid/64x64; random walk: 1 x 3 (moons) minus tanh.
    assert len(grid) == 12 + 1
    assert grid.excluded == 4 + (8 - 1)


def test_random_search_is_reproducible_from_its_seed_and_stays_in_range(tmp_path: Path) -> None:
    text = """\
datasets: moons
seeds: 2
samples: 5
sampler_seed: {seed}
optimizers:
  - optimizer: backprop
    learning_rate: {{loguniform: [0.001, 0.1]}}
    momentum: {{uniform: [0.5, 0.9]}}
    batch_size: {{choice: [16, 32]}}
    epochs: {{uniform: [10, 20]}}
"""
    first = grid_of(tmp_path, text.format(seed=1))
    again = grid_of(tmp_path, text.format(seed=1))
    other = grid_of(tmp_path, text.format(seed=2))
    assert [r.config_hash for r in first.runs] == [r.config_hash for r in again.runs]
    assert [r.config_hash for r in first.runs] != [r.config_hash for r in other.runs]
    assert len(first) == 5 * 2
    for run in first.runs:
        c = run.config
        assert 0.001 <= c["learning_rate"] <= 0.1 and 0.5 <= c["momentum"] <= 0.9
        assert c["batch_size"] in (16, 32) and 10 <= c["max_steps"] <= 20
    # Each draw runs on every seed.
    draws = {}
    for run in first.runs:
        key = (run.config["learning_rate"], run.config["momentum"])
        draws.setdefault(key, set()).add(run.config["seed"])
    assert len(draws) == 5 and all(seeds == {0, 1} for seeds in draws.values())


def test_time_limit_rides_in_the_config_but_not_in_the_hash(tmp_path: Path) -> None:
    base = "datasets: moons\noptimizers: [{optimizer: backprop}]\n"
    limited = grid_of(tmp_path, base + "budget: {time_limit: 30}\n").runs[0]
    free = grid_of(tmp_path, base).runs[0]
    assert limited.config[TIME_LIMIT_KEY] == 30.0 and TIME_LIMIT_KEY not in free.config
    assert limited.config_hash == free.config_hash


def test_block_values_override_the_common_ones(tmp_path: Path) -> None:
    grid = grid_of(
        tmp_path,
        """\
datasets: moons
model: {activation: [relu, tanh]}
budget: {epochs: 10, iterations: 100}
optimizers:
  - {optimizer: backprop}
  - {optimizer: random_walk, activation: tanh, iterations: 500, seeds: [5]}
""",
    )
    walk = [r.config for r in grid.runs if r.config["optimizer"] == "random_walk"]
    assert [(c["activation"], c["max_steps"], c["seed"]) for c in walk] == [("tanh", 500, 5)]
    assert len(grid) == 3


def test_overlapping_blocks_are_deduplicated(tmp_path: Path) -> None:
    grid = grid_of(
        tmp_path,
        """\
datasets: moons
optimizers:
  - {optimizer: backprop, learning_rate: [0.1, 0.01]}
  - {optimizer: backprop, learning_rate: [0.01, 0.001]}
""",
    )
    assert [r.config["learning_rate"] for r in grid.runs] == [0.1, 0.01, 0.001]
    assert grid.duplicates == 1


def test_a_csv_dataset_is_read_relative_to_the_grid_and_named_by_its_hash(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    body = b"a,b,label\n" + b"".join(
        f"{i},{i % 3},{'yes' if i % 2 else 'no'}\n".encode() for i in range(20)
    )
    (data / "mine.csv").write_bytes(body)
    grid = grid_of(
        tmp_path,
        "datasets: [{csv: data/mine.csv, target: label}, moons]\n"
        "optimizers: [{optimizer: backprop}]\n",
    )
    digest = hashlib.sha256(body).hexdigest()
    assert [(r.config["dataset"], r.config["target"]) for r in grid.runs] == [
        (f"csv:{digest}", "label"),
        ("moons", None),
    ]
    assert [(f.name, f.sha256, f.data) for f in grid.datasets] == [("mine.csv", digest, body)]


def test_inline_options_build_the_same_runs_as_the_equivalent_file(tmp_path: Path) -> None:
    inline = inline_grid(
        {"dataset": "moons", "learning_rate": "0.1,0.01", "hidden": "16,32x16"},
        optimizers="backprop",
        seeds="3",
    )
    file = grid_of(
        tmp_path,
        """\
datasets: moons
model: {hidden: [[16], [32, 16]]}
seeds: 3
optimizers: [{optimizer: backprop, learning_rate: [0.1, 0.01]}]
""",
    )
    assert len(inline) == 12
    assert [r.config_hash for r in inline.runs] == [r.config_hash for r in file.runs]
    again = inline_grid(
        {"dataset": "moons", "learning_rate": "0.1,0.01", "hidden": "16,32x16"},
        optimizers="backprop",
        seeds="3",
    )
    assert inline.name == again.name and inline.name.startswith("inline-")


def test_inline_optimizer_follows_the_options_given() -> None:
    both = inline_grid({"dataset": "xor", "learning_rate": "0.1", "step_size": "0.05,0.1"})
    assert sorted(r.config["optimizer"] for r in both.runs) == [
        "backprop",
        "random_walk",
        "random_walk",
    ]


def test_config_hash_ignores_key_order() -> None:
    config = TrainConfig.from_dict({"dataset": "moons", "optimizer": "backprop"}).to_dict()
    reordered = dict(reversed(list(config.items())))
    assert config_hash(reordered) == config_hash(config)
    assert config_hash({**config, "learning_rate": 0.02}) != config_hash(config)


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_examples_are_valid(path: Path) -> None:
    grid = load_grid(path)
    assert len(grid) > 0
    if path.name == "quickstart.yaml":
        assert 20 <= len(grid) <= 60
        assert {r.config["dataset"] for r in grid.runs} <= {"moons", "xor"}
    if path.name == "compare.yaml":
        # Every backprop run has a random-walk twin with the same network, data and seed.
        def twin(c: dict) -> tuple:
            return (c["dataset"], tuple(c["hidden"]), c["activation"], c["seed"], c["val_fraction"])

        bp = sorted(twin(r.config) for r in grid.runs if r.config["optimizer"] == "backprop")
        rw = sorted(twin(r.config) for r in grid.runs if r.config["optimizer"] == "random_walk")
        assert bp == rw and bp
        # ... and the same budget in forward evaluations, which neither passes.
        assert {r.config["max_evaluations"] for r in grid.runs} == {300}
    if path.name == "csv.yaml":
        assert len(grid.datasets) == 1
    if path.name == "search.yaml":
        assert grid.excluded > 0


def test_examples_have_a_small_csv() -> None:
    text = (EXAMPLES / "data" / "pumps.csv").read_text()
    header = text.splitlines()[0].split(",")
    assert "status" in header and len(text) < 20_000


def test_max_runs_needs_yes(tmp_path: Path) -> None:
    path = write(tmp_path, BASIC)
    with pytest.raises(GridError, match=r"72 runs is more than MLPQ_MAX_GRID_RUNS=50; pass --yes"):
        load_grid(path, max_runs=50)
    assert len(load_grid(path, max_runs=50, yes=True)) == 72
    assert len(load_grid(path, max_runs=72)) == 72


def test_max_runs_counts_after_exclusions(tmp_path: Path) -> None:
    text = BASIC + "exclude: [{optimizer: backprop}]\n"
    assert len(load_grid(write(tmp_path, text), max_runs=24)) == 24


def test_an_evaluation_budget_buys_each_optimizer_its_steps(tmp_path: Path) -> None:
    grid = grid_of(
        tmp_path,
        """\
datasets: moons
budget: {evaluations: 400}
optimizers:
  - optimizer: backprop
  - optimizer: random_walk
    candidates: [1, 8, 16]
  - optimizer: random_walk
    iterations: 10
""",
    )
    got = [
        (r.config["optimizer"], r.config.get("candidates"), r.config["max_steps"])
        for r in grid.runs
    ]
    assert got == [
        ("backprop", None, 399),
        ("random_walk", 1, 399),
        ("random_walk", 8, 49),
        ("random_walk", 16, 24),
        ("random_walk", 1, 10),  # a step count given too: both apply
    ]
    assert {r.config["max_evaluations"] for r in grid.runs} == {400}
    for run in grid.runs:
        assert TrainConfig.from_dict(run.config).to_dict() == run.config
    free = grid_of(tmp_path, "datasets: moons\noptimizers: [{optimizer: backprop, epochs: 399}]\n")
    assert free.runs[0].config_hash != grid.runs[0].config_hash  # a budget makes another run


def test_an_evaluation_budget_too_small_for_a_block_names_the_key(tmp_path: Path) -> None:
    text = (
        "datasets: moons\nbudget: {evaluations: 10}\n"
        "optimizers: [{optimizer: random_walk, candidates: [4, 16]}]\n"
    )
    with pytest.raises(GridError, match=r"budget\.evaluations: 10 leaves no step: one costs 16"):
        grid_of(tmp_path, text)
    grid = inline_grid({"dataset": "moons", "evaluations": "50"}, optimizers="backprop,random_walk")
    assert [r.config["max_steps"] for r in grid.runs] == [49, 49]


def test_reading_and_checking_a_grid_does_not_import_numpy() -> None:
    """The CLI's side of submit stays free of NumPy (a fifth of `mlpq run`'s start-up)."""
    import subprocess
    import sys

    code = (
        "import sys; from service.grids import load_grid; "
        f"grid = load_grid({str(EXAMPLES / 'compare.yaml')!r}); "
        "assert len(grid) == 60, len(grid); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('numpy', 'sklearn')))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


# -- grids expanded as they are read (lazy) ---------------------------------------------------

LAZY_GRID = """\
datasets: [moons, xor]
model: {hidden: [[16], [8, 8]], activation: [relu, tanh]}
exclude:
  - {activation: tanh, hidden: [8, 8]}
seeds: 3
optimizers:
  - {optimizer: backprop, learning_rate: [0.1, 0.01], time_limit: 60}
  - {optimizer: random_walk, step_size: 0.1}
  - {optimizer: backprop, learning_rate: 0.1}
"""


def test_a_lazy_grid_streamed_in_chunks_is_the_grid_expanded_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("service.grids.loader.LAZY_MIN_RUNS", 1)
    whole = grid_of(tmp_path, LAZY_GRID)
    lazy = grid_of(tmp_path, LAZY_GRID, lazy=True)
    assert whole.expanded and not lazy.expanded and lazy.upper == 2 * 4 * 3 * 4
    chunks = list(lazy.stream(7))
    assert lazy.expanded and [len(runs) for runs, _ in chunks[:-1]] == [7] * (len(chunks) - 1)
    streamed = [run for runs, _ in chunks for run in runs]
    assert streamed == whole.runs == lazy.runs  # same configs, hashes and blocks, in order
    # tanh with [8, 8]: 2 x 3 seeds x 4 blocks' rates; the last block repeats lr 0.1 (a time
    # limit is no other run): 2 x 3 networks x 3 seeds.
    assert (lazy.excluded, lazy.duplicates) == (whole.excluded, whole.duplicates) == (24, 18)
    # Each run's JSON as the expansion made it is its config's canonical JSON; a run
    # with a time limit has none (its hash leaves the limit out, its config does not).
    for runs, texts in chunks:
        for run, text in zip(runs, texts, strict=True):
            if TIME_LIMIT_KEY in run.config:
                assert text is None
            else:
                assert text == json.dumps(run.config, sort_keys=True, separators=(",", ":"))
    assert {TIME_LIMIT_KEY in r.config for r in streamed} == {True, False}
    # Streamed again, a grid already expanded gives the same runs (and no texts).
    again = list(lazy.stream(10))
    assert [run for runs, _ in again for run in runs] == whole.runs
    assert all(texts is None for _, texts in again)


def test_a_lazy_grid_read_partly_then_whole_keeps_every_run_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("service.grids.loader.LAZY_MIN_RUNS", 1)
    lazy = grid_of(tmp_path, LAZY_GRID, lazy=True)
    stream = lazy.stream(5)
    first, _ = next(stream)
    assert len(first) == 5 and not lazy.expanded
    assert lazy.runs == grid_of(tmp_path, LAZY_GRID).runs  # the rest expanded at once
    assert len(lazy) == len(lazy.runs) and lazy.expanded


def test_a_lazy_grid_fails_at_the_end_of_its_expansion_and_stays_failed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = (
        "datasets: [moons]\nexclude: [{dataset: moons}]\n"
        "optimizers: [{optimizer: backprop, learning_rate: 0.1}]\n"
    )
    with pytest.raises(GridError, match="every run is excluded; nothing to submit"):
        grid_of(tmp_path, text, lazy=True)  # small: expanded whole at once all the same
    monkeypatch.setattr("service.grids.loader.LAZY_MIN_RUNS", 1)
    lazy = grid_of(tmp_path, text, lazy=True)  # the values are checked, the product is not
    with pytest.raises(GridError, match="every run is excluded; nothing to submit"):
        list(lazy.stream(3))
    for read in (lambda: lazy.runs, lambda: len(lazy), lambda: list(lazy.stream(3))):
        with pytest.raises(GridError, match="every run is excluded"):
            read()
