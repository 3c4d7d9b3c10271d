"""Invalid grids: one line naming the file, the key path, what was found and what is expected."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.exceptions import GridError
from service.grids import inline_grid, load_grid

OK_BLOCKS = "optimizers: [{optimizer: backprop}]\n"

CASES = [
    # (grid text, the whole message after "grid.yaml: ")
    (
        "datasets: moons\noptimizers:\n  - {optimizer: backprop}\n"
        "  - {optimizer: random_walk, step_size: -0.1}\n",
        "optimizers[1].step_size: must be > 0, got -0.1",
    ),
    (
        "datasets: moons\noptimizers:\n  - {optimizer: random_walk, step_size: [0.1, 0.0]}\n",
        "optimizers[0].step_size[1]: must be > 0, got 0.0",
    ),
    (
        "datasets: [moons, moon]\n" + OK_BLOCKS,
        "datasets[1]: unknown dataset 'moon'; expected one of xor, moons, circles, spirals, "
        "blobs, sine, iris, wine, breast_cancer, digits or {csv: path, target: column}",
    ),
    (
        "datasets: moons\nmodel: {activation: [relu, sigmod]}\n" + OK_BLOCKS,
        "model.activation[1]: must be one of relu, leaky_relu, tanh, sigmoid, identity, step, "
        "sign; "
        "got 'sigmod'",
    ),
    (
        "datasets: moons\nmodel: {hidden: [[16], 32x0]}\n" + OK_BLOCKS,
        "model.hidden[1]: layer sizes must be integers >= 1, got [32, 0]",
    ),
    (
        "datasets: moons\nmodel: {hidden: [[16], '3 2']}\n" + OK_BLOCKS,
        "model.hidden[1]: expected layer sizes like 32x16, got '3 2'",
    ),
    (
        "datasets: moons\nactivation: relu\n" + OK_BLOCKS,
        "activation: unknown key (put it under model:); expected one of name, description, "
        "datasets, model, training, optimizers, seeds, budget, zip, exclude, samples, "
        "sampler_seed",
    ),
    (
        "datasets: moons\noptimizers: [{optimizer: backprop, step_size: 0.1}]\n",
        "optimizers[0].step_size: unknown key (a random_walk parameter); expected one of "
        "datasets, seeds, hidden, activation, init, dtype, val_fraction, log_every, "
        "target_loss, patience, time_limit, zip, exclude, samples, optimizer, learning_rate, "
        "batch_size, momentum, weight_decay, lr_decay, epochs",
    ),
    (
        "datasets: moons\noptimizers: [{optimizer: backprop, learnig_rate: 0.1}]\n",
        "optimizers[0].learnig_rate: unknown key (did you mean learning_rate?); expected one of "
        "datasets, seeds, hidden, activation, init, dtype, val_fraction, log_every, "
        "target_loss, patience, time_limit, zip, exclude, samples, optimizer, learning_rate, "
        "batch_size, momentum, weight_decay, lr_decay, epochs",
    ),
    (
        "datasets: moons\noptimizers: [{optimizer: sgd}]\n",
        "optimizers[0].optimizer: expected backprop or random_walk, got 'sgd'",
    ),
    ("datasets: moons\noptimizers: []\n", "optimizers: expected at least 1 item(s), got []"),
    (OK_BLOCKS, "datasets: required"),
    (
        "datasets: moons\noptimizers: [{optimizer: backprop, learning_rate: fast}]\n",
        "optimizers[0].learning_rate: expected a number, got 'fast'",
    ),
    (
        "datasets: moons\noptimizers: [{optimizer: backprop, learning_rate: []}]\n",
        "optimizers[0].learning_rate: empty list; an axis needs at least one value",
    ),
    (
        "datasets: moons\nseeds: 0\n" + OK_BLOCKS,
        "seeds: expected a count >= 1 (seeds 0..count-1) or a list, got 0",
    ),
    (
        "datasets: moons\nbudget: {epochs: 0}\n" + OK_BLOCKS,
        "budget.epochs: must be >= 1, got 0",
    ),
    (
        "datasets: moons\nbudget: {time_limit: -5}\n" + OK_BLOCKS,
        "budget.time_limit: must be > 0, got -5",
    ),
    (
        "datasets: moons\noptimizers: [{optimizer: random_walk, epochs: 10}]\n",
        "optimizers[0].epochs: unknown key (a backprop parameter); expected one of datasets, "
        "seeds, hidden, activation, init, dtype, val_fraction, log_every, target_loss, patience, "
        "time_limit, zip, exclude, samples, optimizer, step_size, temperature, cooling, "
        "adapt_step, target_acceptance, candidates, quantize, iterations",
    ),
    (
        "datasets: moons\noptimizers:\n  - optimizer: backprop\n    learning_rate: [0.1, 0.01]\n"
        "    batch_size: [16, 32, 64]\n    zip: [[learning_rate, batch_size]]\n",
        "optimizers[0].zip[0]: zipped lists differ in length (learning_rate has 2, batch_size "
        "has 3); expected equal lengths",
    ),
    (
        "datasets: moons\noptimizers:\n  - optimizer: backprop\n    learning_rate: [0.1, 0.01]\n"
        "    zip: [[learning_rate, lr]]\n",
        "optimizers[0].zip[0][1]: 'lr' is not a key of a backprop block; expected one of hidden, "
        "activation, init, dtype, val_fraction, log_every, target_loss, patience, learning_rate, "
        "batch_size, momentum, weight_decay, lr_decay, epochs, seeds",
    ),
    (
        "datasets: moons\noptimizers:\n  - optimizer: backprop\n    learning_rate: [0.1, 0.01]\n"
        "    momentum: 0.9\n    zip: [[learning_rate, momentum]]\n",
        "optimizers[0].zip[0][1]: momentum is not a list in optimizers[0]; zipped keys must be "
        "lists of equal length",
    ),
    (
        "datasets: moons\nexclude: [{actvation: relu}]\n" + OK_BLOCKS,
        "exclude[0].actvation: unknown key; expected one of optimizer, datasets, seeds, epochs, "
        "iterations, hidden, activation, init, dtype, val_fraction, log_every, target_loss, "
        "patience, learning_rate, batch_size, momentum, weight_decay, lr_decay, step_size, "
        "temperature, cooling, adapt_step, target_acceptance, candidates, quantize",
    ),
    (
        "datasets: moons\nexclude: [{activation: rleu}]\n" + OK_BLOCKS,
        "exclude[0].activation: must be one of relu, leaky_relu, tanh, sigmoid, identity, step, "
        "sign; "
        "got 'rleu'",
    ),
    (
        "datasets: moons\nexclude: [{optimizer: backprop}]\n" + OK_BLOCKS,
        "every run is excluded; nothing to submit",
    ),
    (
        "datasets: moons\n"
        "optimizers: [{optimizer: backprop, learning_rate: {uniform: [0.1, 1]}}]\n",
        "optimizers[0].learning_rate: a uniform axis needs samples: N (at the top level or in "
        "the optimizer block): how many draws to make",
    ),
    (
        "datasets: moons\nsamples: 3\n" + OK_BLOCKS,
        "samples: no axis is random; samples draws from {uniform|loguniform|choice: ...} axes",
    ),
    (
        "datasets: moons\nsamples: 2\n"
        "optimizers: [{optimizer: backprop, learning_rate: {uniform: [0.0, 1]}}]\n",
        "optimizers[0].learning_rate.uniform[0]: must be > 0, got 0.0",
    ),
    (
        "datasets: moons\nsamples: 2\n"
        "optimizers: [{optimizer: backprop, learning_rate: {loguniform: [0.1, 0.01]}}]\n",
        "optimizers[0].learning_rate: loguniform: expected low < high, got [0.1, 0.01]",
    ),
    (
        "datasets: moons\noptimizers: [{optimizer: backprop, learning_rate: [0.1, 1e-1]}]\n",
        "optimizers[0].learning_rate[1]: repeats learning_rate[0] (0.1); each value of an axis "
        "must be different",
    ),
    (
        "datasets: [{csv: missing.csv, target: y}]\n" + OK_BLOCKS,
        "datasets[0].csv: no such file: {tmp}/missing.csv",
    ),
    (
        "datasets: {csv: data.csv}\n" + OK_BLOCKS,
        "datasets.target: required",
    ),
    (
        "datasets: [{csv: data.csv, target: label}]\n" + OK_BLOCKS,
        "datasets[0].target: data.csv: no column 'label' in the CSV (columns: x, y)",
    ),
    (
        "datasets: moons\nname: ''\n" + OK_BLOCKS,
        "name: must not be empty",
    ),
    ("datasets: moons\noptimizers: backprop\n", "optimizers: expected a list, got 'backprop'"),
    (
        "datasets: moons\nseeds: 8589934592\n" + OK_BLOCKS,
        "seeds: at most 100,000 seeds, got 8,589,934,592",
    ),
    (
        "datasets: moons\nseeds: 100000\nmodel: {hidden: [[1], [2], [3], [4], [5]], "
        "activation: [relu, tanh, sigmoid]}\n" + OK_BLOCKS,
        "1,500,000 runs; at most 1,000,000 can be submitted at once",
    ),
    ("datasets: moons\noptimizers: [{optimizer: backprop}\n", None),  # YAML syntax: see below
    ("- a list\n", "expected a mapping at the top level, got list"),
    ("", "the file is empty; expected a grid (datasets, optimizers, ...)"),
]


@pytest.mark.parametrize(("text", "message"), CASES)
def test_an_invalid_grid_is_one_line_naming_the_key(
    tmp_path: Path, text: str, message: str | None
) -> None:
    (tmp_path / "data.csv").write_text("x,y\n1,2\n3,4\n5,6\n")
    path = tmp_path / "grid.yaml"
    path.write_text(text)
    with pytest.raises(GridError) as info:
        load_grid(path)
    line = str(info.value)
    assert "\n" not in line
    assert info.value.exit_code == 2
    assert line.startswith(f"{path}: ")
    if message is None:
        assert "invalid YAML" in line and "line " in line
    else:
        assert line == f"{path}: {message.replace('{tmp}', str(tmp_path))}"


def test_a_missing_file_or_unknown_format_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(GridError, match=r"nope\.yaml: no such file$"):
        load_grid(tmp_path / "nope.yaml")
    (tmp_path / "grid.txt").write_text("datasets: moons")
    with pytest.raises(GridError, match=r"expected a \.yaml, \.yml, \.json or \.toml grid file"):
        load_grid(tmp_path / "grid.txt")


def test_json_and_toml_syntax_errors_name_the_file(tmp_path: Path) -> None:
    (tmp_path / "g.json").write_text('{"datasets": "moons",}')
    with pytest.raises(GridError, match=r"g\.json: line 1: invalid JSON"):
        load_grid(tmp_path / "g.json")
    (tmp_path / "g.toml").write_text("datasets = [moons")
    with pytest.raises(GridError, match=r"g\.toml: invalid TOML"):
        load_grid(tmp_path / "g.toml")


@pytest.mark.parametrize(
    ("options", "extra", "message"),
    [
        ({"dataset": "moons", "learning_rate": "0.1,-0.01"}, {}, "--lr: must be > 0, got -0.01"),
        ({"dataset": "moons", "hidden": "16,abc"}, {}, "--hidden: expected layer sizes like 32x16"),
        ({"dataset": "moonz"}, {}, "--dataset: unknown dataset 'moonz'"),
        ({"dataset": "moons", "epochs": "0"}, {}, "--epochs: must be >= 1, got 0"),
        ({"dataset": "moons"}, {"seeds": "0"}, "--seeds: expected a count >= 1"),
        (
            {"dataset": "moons", "step_size": "0.1"},
            {"optimizers": "backprop"},
            "--step-size: a random_walk option, but --optimizer is backprop",
        ),
        ({"dataset": "moons"}, {"optimizers": "adam"}, "--optimizer: expected backprop or"),
        ({"dataset": "data.csv"}, {}, "--target: required with the CSV dataset data.csv"),
        ({"dataset": "moons"}, {"seeds": "2", "seed": "1,2"}, "--seeds, --seed: give a count"),
        ({}, {}, "--dataset: required"),
        ({"dataset": "moons"}, {"task": "binary"}, "--task: only for a CSV --dataset"),
    ],
)
def test_inline_errors_name_the_option(options: dict, extra: dict, message: str) -> None:
    with pytest.raises(GridError) as info:
        inline_grid(options, **extra)
    assert str(info.value).startswith(message)
    assert "\n" not in str(info.value)
