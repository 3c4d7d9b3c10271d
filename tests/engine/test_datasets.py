"""Datasets by name and seed: tasks, splits, standardization, seed streams, user CSVs."""

from __future__ import annotations

import socket

import numpy as np
import pytest

from engine import DATASETS, ConfigError, TrainConfig, Trainer, csv_name, load_dataset

EXPECTED = {
    "xor": ("binary", 2, 2),
    "moons": ("binary", 2, 2),
    "circles": ("binary", 2, 2),
    "spirals": ("multiclass", 3, 2),
    "blobs": ("multiclass", 4, 2),
    "sine": ("regression", None, 1),
    "iris": ("multiclass", 3, 4),
    "wine": ("multiclass", 3, 13),
    "breast_cancer": ("binary", 2, 30),
    "digits": ("multiclass", 10, 64),
}


def test_the_built_in_names() -> None:
    assert set(DATASETS) == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_built_in_dataset_shapes_task_and_standardization(name, dtype, monkeypatch) -> None:
    def no_network(*args, **kwargs):
        raise AssertionError("datasets must not touch the network")

    monkeypatch.setattr(socket, "socket", no_network)
    d = load_dataset(name, seed=3, dtype=dtype)
    task, n_classes, n_features = EXPECTED[name]
    assert (d.task, d.n_classes, d.n_features, d.name) == (task, n_classes, n_features, name)
    assert d.X_train.dtype == d.X_val.dtype == np.dtype(dtype)
    n = len(d.X_train) + len(d.X_val)
    assert len(d.X_val) == round(0.2 * n)
    assert len(d.y_train) == len(d.X_train) and len(d.y_val) == len(d.X_val)
    if task == "regression":
        assert d.y_train.dtype == np.dtype(dtype)
        assert abs(float(d.y_train.mean())) < 1e-5 and abs(float(d.y_train.std()) - 1) < 1e-5
    else:
        assert d.y_train.dtype == np.int64
        assert set(np.unique(d.y_train)) == set(range(n_classes))
    # fitted on the training split: zero mean, unit (or zero, for constant columns) std there
    X = d.X_train.astype(np.float64)
    np.testing.assert_allclose(X.mean(axis=0), 0, atol=1e-5)
    std = X.std(axis=0)
    assert np.all((np.abs(std - 1) < 1e-4) | (std == 0))


def test_the_split_and_data_come_from_the_seed() -> None:
    a = load_dataset("moons", seed=1)
    b = load_dataset("moons", seed=1)
    c = load_dataset("moons", seed=2)
    np.testing.assert_array_equal(a.X_train, b.X_train)
    np.testing.assert_array_equal(a.y_val, b.y_val)
    assert not np.array_equal(a.X_train, c.X_train)
    iris1, iris2 = load_dataset("iris", seed=1), load_dataset("iris", seed=2)
    assert not np.array_equal(iris1.y_val, iris2.y_val)  # different split of the same data


def test_standardization_uses_the_training_split_only() -> None:
    d = load_dataset("wine", seed=0, val_fraction=0.5)
    # the validation split was scaled with the training split's statistics, so it is
    # not standardized by itself
    assert np.abs(d.X_val.mean(axis=0)).max() > 1e-3
    X_all = np.concatenate([d.X_train, d.X_val]) * d.x_scale + d.x_mean
    from sklearn.datasets import load_wine

    raw = load_wine().data
    assert sorted(map(tuple, np.round(X_all, 6))) == sorted(map(tuple, np.round(raw, 6)))


def test_val_fraction_sets_the_split_size() -> None:
    d = load_dataset("digits", seed=0, val_fraction=0.5)
    assert len(d.X_val) == round(0.5 * 1797)


def test_backprop_and_random_walk_share_split_and_initial_weights() -> None:
    data = load_dataset("spirals", seed=11)
    bp = Trainer(TrainConfig(dataset="spirals", optimizer="backprop", seed=11), data)
    rw = Trainer(TrainConfig(dataset="spirals", optimizer="random_walk", seed=11), data)
    for a, b in zip(
        bp.parameters()[0] + bp.parameters()[1],
        rw.parameters()[0] + rw.parameters()[1],
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)
    other = Trainer(
        TrainConfig(dataset="spirals", optimizer="backprop", seed=12),
        load_dataset("spirals", seed=12),
    )
    assert not np.array_equal(bp.parameters()[0][0], other.parameters()[0][0])


# -- user CSVs ------------------------------------------------------------------------------------


def _csv(text: str) -> tuple[str, bytes]:
    data = text.encode()
    return csv_name(data), data


def _rows(n: int, target) -> str:
    rng = np.random.default_rng(0)
    lines = ["a,b,label"]
    for i in range(n):
        lines.append(f"{rng.normal():.6f},{rng.normal():.6f},{target(i)}")
    return "\n".join(lines) + "\n"


def test_csv_with_string_target_is_classification() -> None:
    name, data = _csv(_rows(30, lambda i: ["cat", "dog", "emu"][i % 3]))
    d = load_dataset(name, seed=0, csv=data, target="label")
    assert (d.task, d.n_classes, d.classes) == ("multiclass", 3, ("cat", "dog", "emu"))
    assert d.feature_names == ("a", "b")
    name, data = _csv(_rows(30, lambda i: ["no", "yes"][i % 2]))
    assert load_dataset(name, seed=0, csv=data, target="label").task == "binary"


def test_csv_integer_target_with_few_values_is_classification_else_regression() -> None:
    name, data = _csv(_rows(40, lambda i: i % 4))
    d = load_dataset(name, seed=0, csv=data, target="label")
    assert (d.task, d.n_classes) == ("multiclass", 4)
    name, data = _csv(_rows(40, lambda i: i * 10))  # 40 distinct integers
    assert load_dataset(name, seed=0, csv=data, target="label").task == "regression"
    name, data = _csv(_rows(40, lambda i: f"{i % 4 + 0.5}"))  # non-integer values
    d = load_dataset(name, seed=0, csv=data, target="label")
    assert d.task == "regression" and d.n_classes is None
    # the standardization of the target is recorded and undoable
    y = np.concatenate([d.y_train, d.y_val]) * d.y_scale + d.y_mean
    assert sorted(np.round(y, 6)) == sorted([i % 4 + 0.5 for i in range(40)])


def test_csv_task_override() -> None:
    name, data = _csv(_rows(40, lambda i: i % 4))
    d = load_dataset(name, seed=0, csv=data, target="label", task="regression")
    assert d.task == "regression"
    with pytest.raises(ConfigError, match=r"^task: binary needs 2 classes"):
        load_dataset(name, seed=0, csv=data, target="label", task="binary")
    name, data = _csv(_rows(40, lambda i: "xy"[i % 2]))
    with pytest.raises(ConfigError, match=r"^task: regression needs a numeric target"):
        load_dataset(name, seed=0, csv=data, target="label", task="regression")


def test_csv_trains_end_to_end_through_a_config() -> None:
    name, data = _csv(_rows(60, lambda i: ["lo", "hi"][i % 2]))
    config = TrainConfig(dataset=name, target="label", optimizer="backprop", max_steps=3)
    d = load_dataset(name, seed=config.seed, csv=data, target=config.target)
    records = [r for r in Trainer(config, d).steps() if r]
    assert len(records) == 3


@pytest.mark.parametrize(
    ("text", "target", "message"),
    [
        ("a,b\n1,2\n3,4\n", "y", "target: no column 'y'"),
        ("a,y\n1,p\nx,q\n3,p\n", "y", "dataset: CSV line 3, column 'a': not a number: 'x'"),
        ("a,y\n1,p\n2\n", "y", "dataset: CSV line 3 has 1 fields"),
        ("a,y\n1,p\n", "y", "dataset: the CSV has 1 data rows"),
        ("a,y\n1,p\n2,p\n3,p\n", "y", "target: needs at least 2 classes"),
        ("a,a,y\n1,2,3\n", "y", "dataset: the CSV header repeats"),
        ("", "y", "dataset: the CSV is empty"),
        ("a,y\n1,\n2,p\n", "y", "target: CSV line 2: the target is empty"),
        ("a,y\nnan,p\n2,q\n", "y", "dataset: CSV line 2, column 'a': not finite"),
    ],
)
def test_bad_csvs_raise_config_errors(text, target, message) -> None:
    name, data = _csv(text)
    with pytest.raises(ConfigError) as info:
        load_dataset(name, seed=0, csv=data, target=target)
    assert str(info.value).startswith(message), str(info.value)


def test_csv_bytes_must_match_the_name() -> None:
    name, data = _csv(_rows(10, lambda i: i % 2))
    with pytest.raises(ConfigError, match=r"^dataset: the CSV's sha256 does not match"):
        load_dataset(name, seed=0, csv=data + b"1,2,0\n", target="label")
    with pytest.raises(ConfigError, match=r"^dataset: .* needs the CSV's bytes"):
        load_dataset(name, seed=0, target="label")


def test_unknown_dataset_and_bad_arguments() -> None:
    with pytest.raises(ConfigError, match=r"^dataset: must be one of"):
        load_dataset("mnist", seed=0)
    with pytest.raises(ConfigError, match=r"^val_fraction:"):
        load_dataset("xor", seed=0, val_fraction=1.0)
    with pytest.raises(ConfigError, match=r"^task: iris is a multiclass dataset"):
        load_dataset("iris", seed=0, task="binary")


def test_the_shapes_the_cost_estimate_uses_are_the_datasets_own() -> None:
    from engine.names import DATASET_SHAPES, DATASETS

    assert set(DATASET_SHAPES) == set(DATASETS)
    for name, (samples, features, outputs) in DATASET_SHAPES.items():
        data = load_dataset(name, seed=0)
        assert len(data.X_train) + len(data.X_val) == samples, name
        assert data.n_features == features, name
        assert (data.n_classes if data.task == "multiclass" else 1) == outputs, name


@pytest.mark.parametrize("name", ["iris", "wine", "breast_cancer", "digits"])
def test_bundled_sets_read_from_the_files_equal_scikit_learns_loaders(name) -> None:
    from engine.datasets import _sklearn, _sklearn_file, _sklearn_loaded

    assert _sklearn_file(name) is not None  # read from the file, not through the fallback
    X, y, names = _sklearn(name)
    X_ref, y_ref, names_ref = _sklearn_loaded(name)
    assert X.dtype == X_ref.dtype == np.float64 and y.dtype == y_ref.dtype == np.int64
    assert X.shape == X_ref.shape and y.shape == y_ref.shape
    assert X.tobytes() == np.ascontiguousarray(X_ref).tobytes()  # bit for bit
    np.testing.assert_array_equal(y, y_ref)
    assert names == names_ref


def test_a_bundled_set_is_read_once_per_process_and_kept_read_only(monkeypatch) -> None:
    from engine import datasets

    reads = []
    read = datasets._sklearn_read
    monkeypatch.setattr(datasets, "_sklearn_read", lambda *a: reads.append(a) or read(*a))
    datasets._sklearn.cache_clear()
    first = load_dataset("wine", seed=1)
    second = load_dataset("wine", seed=2)  # another split of the same file
    assert len(reads) == 1
    assert not np.array_equal(first.y_val, second.y_val)
    X, y, _ = datasets._sklearn("wine")
    assert not X.flags.writeable and not y.flags.writeable
