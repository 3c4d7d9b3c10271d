"""Datasets by name and seed, split and standardized.

Built-in synthetic sets are generated in NumPy from the seed; iris, wine,
breast_cancer and digits are scikit-learn's bundled copies (read from the files
it ships, no network, without importing it). A user's CSV arrives as bytes and
is named ``csv:<sha256 hex of the bytes>``.

Randomness comes in separate streams derived from the run's seed
(``stream(seed, purpose)``), so that the data, the train/validation split, the
initial weights and the training noise never share draws. Backprop and random
walk runs with the same seed therefore see the same split and start from the
same weights.

Features are standardized with the mean and standard deviation of the training
split only (constant columns are left centred, scale 1). Regression targets are
standardized the same way: losses are in standardized units, ``y_mean`` and
``y_scale`` undo it (the trainer reports MAE in the target's own units).
"""

from __future__ import annotations

import csv as csvlib
import functools
import gzip
import hashlib
import importlib.util
import io
import math
import os
from dataclasses import dataclass

import numpy as np

from engine.errors import ConfigError
from engine.names import DATASET_TASKS, DATASETS, TASKS

__all__ = ["DATASETS", "DATASET_TASKS", "TASKS", "Dataset", "csv_name", "load_dataset", "stream"]


#: A CSV integer target with at most this many distinct values (and fewer
#: distinct values than half the rows) is taken as class labels.
MAX_CSV_CLASSES = 20

# Purposes of the random streams derived from a seed.
DATA_STREAM, SPLIT_STREAM, INIT_STREAM, TRAIN_STREAM = 0, 1, 2, 3


def stream(seed: int, purpose: int) -> np.random.Generator:
    """The generator for one purpose of a run with ``seed``."""
    return np.random.default_rng([seed, purpose])


@dataclass(frozen=True, eq=False)
class Dataset:
    """A split, standardized dataset.

    X_train : ndarray of shape (n_train, n_features), the run's dtype
    y_train : ndarray of shape (n_train,); int64 class indices ``0..n_classes-1``
        for classification, the run's dtype (standardized) for regression
    X_val, y_val : the same for the validation split
    task : "multiclass", "binary" or "regression"
    n_classes : number of classes; None for regression
    name : the dataset's name as in the config (``csv:<sha256>`` for a CSV)
    classes : the original label of each class index (None for regression)
    feature_names : column names (CSV and scikit-learn sets) or x0, x1, ...
    x_mean, x_scale : ndarray of shape (n_features,), float64; the inputs were
        standardized as ``(x - x_mean) / x_scale`` (None: not standardized)
    y_mean, y_scale : regression target = y_mean + y_scale * standardized value
    """

    X_train: np.ndarray
    y_train: np.ndarray
    X_val: np.ndarray
    y_val: np.ndarray
    task: str
    n_classes: int | None
    name: str
    classes: tuple | None = None
    feature_names: tuple[str, ...] = ()
    x_mean: np.ndarray | None = None
    x_scale: np.ndarray | None = None
    y_mean: float = 0.0
    y_scale: float = 1.0

    @property
    def n_features(self) -> int:
        return int(self.X_train.shape[1])


def csv_name(data: bytes) -> str:
    """The dataset name of a user CSV: ``csv:`` + the sha256 hex of its bytes."""
    return "csv:" + hashlib.sha256(data).hexdigest()


def load_dataset(
    name: str,
    *,
    seed: int,
    val_fraction: float = 0.2,
    dtype: str = "float64",
    csv: bytes | None = None,
    target: str | None = None,
    task: str | None = None,
) -> Dataset:
    """Load, split and standardize a dataset.

    ``name`` is a built-in name (``DATASETS``) or ``csv:<sha256 hex>``, in which
    case ``csv`` holds the file's bytes (their hash must match the name) and
    ``target`` names the target column. ``task`` overrides the detected task
    (a built-in set only accepts its own). Raises ConfigError on bad input.
    """
    if dtype not in ("float32", "float64"):
        raise ConfigError("dtype", f"must be float32 or float64, got {dtype!r}")
    if not 0 < val_fraction < 1:
        raise ConfigError("val_fraction", f"must be > 0 and < 1, got {val_fraction!r}")
    if task is not None and task not in TASKS:
        raise ConfigError("task", f"must be one of {', '.join(TASKS)}; got {task!r}")
    classes = None
    y_raw: np.ndarray
    if name in DATASET_TASKS:
        if csv is not None or target is not None:
            raise ConfigError("dataset", f"{name} is built in; csv and target are for csv datasets")
        native = DATASET_TASKS[name]
        if task not in (None, native):
            raise ConfigError("task", f"{name} is a {native} dataset, got {task!r}")
        task = native
        if name in _SKLEARN:
            X, y_raw, feature_names = _sklearn(name)
        else:
            X, y_raw = _GENERATORS[name](stream(seed, DATA_STREAM))
            feature_names = tuple(f"x{i}" for i in range(X.shape[1]))
    elif name.startswith("csv:"):
        if csv is None:
            raise ConfigError("dataset", f"{name} needs the CSV's bytes")
        if csv_name(csv) != name:
            raise ConfigError("dataset", f"the CSV's sha256 does not match {name}")
        if not target:
            raise ConfigError("target", f"required for csv dataset {name}")
        X, y_raw, feature_names, task, classes = _parse_csv(csv, target, task)
    else:
        raise ConfigError(
            "dataset", f"must be one of {', '.join(DATASETS)} or csv:<sha256 hex>; got {name!r}"
        )

    n = X.shape[0]
    n_val = min(max(1, round(val_fraction * n)), n - 1)
    if n - n_val < 1:
        raise ConfigError("dataset", f"{name} has {n} samples; at least 2 are needed")
    order = stream(seed, SPLIT_STREAM).permutation(n)
    train, val = order[n_val:], order[:n_val]

    X = X.astype(np.float64, copy=False)
    # X[train].mean(axis=0) and .std(axis=0) as NumPy computes them (the same sums and
    # divisions, so the same bits), sharing the sum and skipping the wrappers.
    X_fit = X[train]
    n_fit = X_fit.shape[0]
    mean = np.add.reduce(X_fit, axis=0, keepdims=True)
    np.true_divide(mean, n_fit, out=mean)
    dev = np.subtract(X_fit, mean)
    np.square(dev, out=dev)
    scale = np.add.reduce(dev, axis=0) / n_fit
    np.sqrt(scale, out=scale)
    mean = mean[0]
    scale[scale == 0] = 1.0
    X = (X - mean) / scale
    X_train = np.ascontiguousarray(X[train], dtype=dtype)
    X_val = np.ascontiguousarray(X[val], dtype=dtype)

    y_mean, y_scale = 0.0, 1.0
    if task == "regression":
        y = y_raw.astype(np.float64)
        y_mean = float(y[train].mean())
        y_scale = float(y[train].std()) or 1.0
        y = (y - y_mean) / y_scale
        y_train = np.ascontiguousarray(y[train], dtype=dtype)
        y_val = np.ascontiguousarray(y[val], dtype=dtype)
        n_classes = None
    else:
        # y_raw holds class indices 0..k-1 here (built-ins are coded so, CSVs by _parse_csv).
        if classes is None:
            classes = tuple(range(int(y_raw.max()) + 1))
        codes = np.asarray(y_raw, dtype=np.int64)
        n_classes = len(classes)
        if task == "binary" and n_classes != 2:
            raise ConfigError("task", f"binary needs 2 classes, the target has {n_classes}")
        if n_classes < 2:
            raise ConfigError("target", f"needs at least 2 classes, found {n_classes}")
        y_train = np.ascontiguousarray(codes[train])
        y_val = np.ascontiguousarray(codes[val])
    return Dataset(
        X_train=X_train,
        y_train=y_train,
        X_val=X_val,
        y_val=y_val,
        task=task,
        n_classes=n_classes,
        name=name,
        classes=classes,
        feature_names=tuple(feature_names),
        x_mean=mean,
        x_scale=scale,
        y_mean=y_mean,
        y_scale=y_scale,
    )


# -- synthetic sets: rng -> (X float64 (n, d), y (n,) int classes or float) -----------------


def _xor(rng: np.random.Generator, n: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """Four tight clusters at (+-1, +-1); class 1 where the signs differ."""
    corner = rng.integers(0, 4, n)
    signs = np.array([[1, 1], [1, -1], [-1, 1], [-1, -1]], dtype=np.float64)
    X = signs[corner] + rng.normal(0.0, 0.2, (n, 2))
    y = (corner == 1) | (corner == 2)
    return X, y.astype(np.int64)


def _moons(rng: np.random.Generator, n: int = 400) -> tuple[np.ndarray, np.ndarray]:
    """Two interleaving half circles (as scikit-learn's make_moons), noise 0.1."""
    y = np.arange(n) % 2
    t = rng.uniform(0.0, np.pi, n)
    cos, sin = np.cos(t), np.sin(t)
    first = y == 0
    X = np.empty((n, 2))
    X[:, 0] = np.where(first, cos, 1 - cos)
    X[:, 1] = np.where(first, sin, 0.5 - sin)
    X += rng.normal(0.0, 0.1, X.shape)
    return X, y.astype(np.int64)


def _circles(rng: np.random.Generator, n: int = 400) -> tuple[np.ndarray, np.ndarray]:
    """A circle inside another (radius 0.5 and 1), noise 0.05; class 1 inside."""
    y = np.arange(n) % 2
    t = rng.uniform(0.0, 2 * np.pi, n)
    r = np.where(y == 1, 0.5, 1.0)
    X = np.column_stack([r * np.cos(t), r * np.sin(t)]) + rng.normal(0.0, 0.05, (n, 2))
    return X, y.astype(np.int64)


def _spirals(rng: np.random.Generator, n: int = 300, k: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """``k`` interleaved spiral arms, one class each."""
    y = np.arange(n) % k
    r = rng.uniform(0.05, 1.0, n)
    t = y * (2 * np.pi / k) + 4.0 * r + rng.normal(0.0, 0.2, n)
    X = np.column_stack([r * np.sin(t), r * np.cos(t)])
    return X, y.astype(np.int64)


def _blobs(rng: np.random.Generator, n: int = 400, k: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """``k`` isotropic Gaussian blobs (std 1) around centres drawn in [-6, 6]^2."""
    centres = rng.uniform(-6.0, 6.0, (k, 2))
    y = np.arange(n) % k
    X = centres[y] + rng.normal(0.0, 1.0, (n, 2))
    return X, y.astype(np.int64)


def _sine(rng: np.random.Generator, n: int = 400) -> tuple[np.ndarray, np.ndarray]:
    """Regression: y = sin(x) + N(0, 0.1^2), x uniform on [-pi, pi]."""
    x = rng.uniform(-np.pi, np.pi, n)
    return x[:, None], np.sin(x) + rng.normal(0.0, 0.1, n)


_GENERATORS = {
    "xor": _xor,
    "moons": _moons,
    "circles": _circles,
    "spirals": _spirals,
    "blobs": _blobs,
    "sine": _sine,
}
_SKLEARN = ("iris", "wine", "breast_cancer", "digits")

#: scikit-learn's data file of each bundled set (in ``sklearn/datasets/data``).
_SKLEARN_FILES = {
    "iris": "iris.csv",
    "wine": "wine_data.csv",
    "breast_cancer": "breast_cancer.csv",
    "digits": "digits.csv.gz",
}
_CELL_MEASURES = (
    "radius",
    "texture",
    "perimeter",
    "area",
    "smoothness",
    "compactness",
    "concavity",
    "concave points",
    "symmetry",
    "fractal dimension",
)
#: Column names as scikit-learn's loaders give them (written in its code, not its files).
_SKLEARN_FEATURES: dict[str, tuple[str, ...]] = {
    "iris": ("sepal length (cm)", "sepal width (cm)", "petal length (cm)", "petal width (cm)"),
    "wine": (
        "alcohol",
        "malic_acid",
        "ash",
        "alcalinity_of_ash",
        "magnesium",
        "total_phenols",
        "flavanoids",
        "nonflavanoid_phenols",
        "proanthocyanins",
        "color_intensity",
        "hue",
        "od280/od315_of_diluted_wines",
        "proline",
    ),
    "breast_cancer": (
        *(f"mean {m}" for m in _CELL_MEASURES),
        *(f"{m} error" for m in _CELL_MEASURES),
        *(f"worst {m}" for m in _CELL_MEASURES),
    ),
    "digits": tuple(f"pixel_{row}_{col}" for row in range(8) for col in range(8)),
}


@functools.cache
def _sklearn(name: str) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """One of scikit-learn's bundled datasets (shipped with the package, no network).

    Read from the files scikit-learn ships, parsed as its loaders parse them, without
    importing scikit-learn: that import (SciPy and the rest) costs a worker process
    most of a second on its first run. ``_sklearn_loaded`` is the loaders' own answer.
    Read once per process (parsing digits takes about 20 ms; a worker loads one split
    per seed): the arrays are read-only.
    """
    path = _sklearn_file(name)
    X, y, names = _sklearn_loaded(name) if path is None else _sklearn_read(name, path)
    X.setflags(write=False)
    y.setflags(write=False)
    return X, y, names


def _sklearn_read(name: str, path: str) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    if name == "digits":
        # load_digits: np.loadtxt of the gzipped CSV, the label in the last column
        with gzip.open(path, mode="rt", encoding="utf-8") as f:
            table = np.loadtxt(f, delimiter=",")
        X, y = table[:, :-1], table[:, -1].astype(np.int64)
    else:
        # load_csv_data: a header row "n_samples,n_features,class names..." then the rows
        with open(path, encoding="utf-8", newline="") as f:
            rows = csvlib.reader(f)
            header = next(rows)
            X = np.empty((int(header[0]), int(header[1])))
            y = np.empty(int(header[0]), dtype=np.int64)
            for i, row in enumerate(rows):
                X[i] = np.asarray(row[:-1], dtype=np.float64)
                y[i] = int(row[-1])
    return X, y, _SKLEARN_FEATURES[name]


def _sklearn_file(name: str) -> str | None:
    """The path of ``name``'s data file in the installed scikit-learn (not imported), or None."""
    try:
        spec = importlib.util.find_spec("sklearn")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, "datasets", "data", _SKLEARN_FILES[name])
        if os.path.isfile(path):
            return path
    return None


def _sklearn_loaded(name: str) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """``_sklearn`` through scikit-learn's own loader (imports scikit-learn)."""
    from sklearn import datasets  # the only place the engine imports scikit-learn

    bunch = getattr(datasets, f"load_{name}")()
    names = getattr(bunch, "feature_names", None)
    if names is None or len(names) == 0:
        names = [f"x{i}" for i in range(bunch.data.shape[1])]
    return (
        np.asarray(bunch.data, dtype=np.float64),
        np.asarray(bunch.target, dtype=np.int64),
        tuple(str(c) for c in names),
    )


# -- user CSV -------------------------------------------------------------------------------


def _parse_csv(
    data: bytes, target: str, task: str | None
) -> tuple[np.ndarray, np.ndarray, tuple[str, ...], str, tuple | None]:
    """Parse a CSV with a header row; every column but ``target`` must be numeric.

    Returns X, y (float64 values or original labels), feature names, task and
    the class labels (None for regression).
    """
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError("dataset", f"the CSV is not UTF-8 text ({exc.reason})") from None
    rows = [row for row in csvlib.reader(io.StringIO(text)) if any(c.strip() for c in row)]
    if not rows:
        raise ConfigError("dataset", "the CSV is empty")
    header = [c.strip() for c in rows[0]]
    if len(set(header)) != len(header):
        raise ConfigError("dataset", f"the CSV header repeats a column name: {header}")
    if target not in header:
        columns = ", ".join(header)
        raise ConfigError("target", f"no column {target!r} in the CSV (columns: {columns})")
    if len(header) < 2:
        raise ConfigError("dataset", "the CSV needs a feature column besides the target")
    body = rows[1:]
    if len(body) < 2:
        raise ConfigError("dataset", f"the CSV has {len(body)} data rows; at least 2 are needed")
    t = header.index(target)
    features = [i for i in range(len(header)) if i != t]
    X = np.empty((len(body), len(features)))
    labels: list[str] = []
    for r, row in enumerate(body):
        line = r + 2  # 1-based, after the header
        if len(row) != len(header):
            raise ConfigError(
                "dataset", f"CSV line {line} has {len(row)} fields, the header has {len(header)}"
            )
        for j, i in enumerate(features):
            cell = row[i].strip()
            try:
                value = float(cell)
            except ValueError:
                raise ConfigError(
                    "dataset", f"CSV line {line}, column {header[i]!r}: not a number: {cell!r}"
                ) from None
            if not math.isfinite(value):
                raise ConfigError(
                    "dataset", f"CSV line {line}, column {header[i]!r}: not finite: {cell!r}"
                )
            X[r, j] = value
        label = row[t].strip()
        if not label:
            raise ConfigError("target", f"CSV line {line}: the target is empty")
        labels.append(label)

    numeric = _floats(labels)
    if task is None:
        if numeric is None:
            n_distinct = len(set(labels))
            task = "binary" if n_distinct == 2 else "multiclass"
        else:
            distinct = np.unique(numeric)
            integral = bool(np.all(distinct == np.round(distinct)))
            few = len(distinct) <= MAX_CSV_CLASSES and len(distinct) < len(labels) / 2
            if integral and few:
                task = "binary" if len(distinct) == 2 else "multiclass"
            else:
                task = "regression"
    if task == "regression":
        if numeric is None:
            raise ConfigError("task", f"regression needs a numeric target; {target!r} is not")
        return X, numeric, tuple(header[i] for i in features), task, None
    if numeric is not None:
        classes = tuple(np.unique(numeric).tolist())
        y = numeric
    else:
        classes = tuple(sorted(set(labels)))
        y = np.asarray(labels, dtype=object)
    index = {c: i for i, c in enumerate(classes)}
    codes = np.asarray([index[v] for v in y.tolist()], dtype=np.int64)
    return X, codes, tuple(header[i] for i in features), task, classes


def _floats(labels: list[str]) -> np.ndarray | None:
    """The labels as finite floats, or None if any is not a number."""
    try:
        values = np.array([float(v) for v in labels])
    except ValueError:
        return None
    return values if np.all(np.isfinite(values)) else None
