"""A trained network as stored: its final weights file, read back to predict new rows.

The weights artifact of a run (``Trainer._weights``) is an npz file holding the
layers ``W0, b0, W1, b1, ...``, the input scaling ``x_mean`` and ``x_scale``, the
run's canonical ``config`` and ``meta`` (task, layer sizes, activation, class
labels, feature names and the regression target's scaling), all as plain arrays:
``np.load(path)`` reads it without pickle and without mlpq.

``Model.predict`` applies the same preprocessing as training (standardize with the
training split's mean and scale) and gives class labels for classification and
values in the target's units for regression.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from engine.errors import ConfigError
from engine.network import Network


@dataclass(frozen=True)
class Model:
    """The layers, the preprocessing and the labels of one trained run."""

    Ws: list[np.ndarray]
    bs: list[np.ndarray]
    x_mean: np.ndarray
    x_scale: np.ndarray
    config: dict[str, Any]
    meta: dict[str, Any]

    @classmethod
    def from_npz(cls, data: bytes) -> Model:
        """Read a run's weights artifact (the bytes of ``mlpq weights``' file)."""
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            files = {name: z[name] for name in z.files}
        n = sum(1 for name in files if name.startswith("W") and name[1:].isdigit())
        return cls(
            Ws=[files[f"W{i}"] for i in range(n)],
            bs=[files[f"b{i}"] for i in range(n)],
            x_mean=files["x_mean"],
            x_scale=files["x_scale"],
            config=json.loads(str(files["config"])),
            meta=json.loads(str(files["meta"])),
        )

    @property
    def task(self) -> str:
        return self.meta["task"]

    @property
    def feature_names(self) -> list[str]:
        return list(self.meta["feature_names"])

    @property
    def classes(self) -> list[Any] | None:
        return self.meta["classes"]

    def outputs(self, X: np.ndarray) -> np.ndarray:
        """Output layer for raw (unscaled) inputs ``X``: probabilities, or standardized values."""
        X = np.asarray(X, dtype=np.float64)
        if X.ndim != 2 or X.shape[1] != len(self.x_mean):
            raise ValueError(f"X: expected shape (n, {len(self.x_mean)}), got {X.shape}")
        dtype = self.Ws[0].dtype
        net = Network(self.meta["units"], self.meta["activation"], self.task, dtype)
        Xs = np.ascontiguousarray((X - self.x_mean) / self.x_scale, dtype=dtype)
        acts = [np.empty((X.shape[0], u), dtype=dtype) for u in net.units[1:]]
        out = net.forward(self.Ws, self.bs, Xs, acts)
        net.output_activation(out)
        return out

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Class labels (classification) or target values (regression) for raw inputs ``X``."""
        out = self.outputs(X)
        if self.task == "regression":
            return self.meta["y_mean"] + self.meta["y_scale"] * out[:, 0].astype(np.float64)
        index = out.argmax(axis=1) if self.task == "multiclass" else (out[:, 0] > 0.5)
        labels = np.asarray(self.classes, dtype=object)
        return labels[index.astype(np.int64)]

    def probabilities(self, X: np.ndarray) -> np.ndarray | None:
        """Per-class probabilities, one column per entry of ``classes`` (None for regression)."""
        if self.task == "regression":
            return None
        out = self.outputs(X).astype(np.float64)
        if self.task == "binary":
            return np.column_stack([1.0 - out[:, 0], out[:, 0]])
        return out


def read_features(data: bytes, feature_names: list[str]) -> tuple[np.ndarray, list[str]]:
    """The columns ``feature_names`` of a CSV with a header row, as floats, and its header.

    Other columns (the target, an id) are ignored. Raises ConfigError naming the
    line and column of the first bad cell, or the columns missing.
    """
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError("data", f"the CSV is not UTF-8 text ({exc.reason})") from None
    rows = csv.reader(io.StringIO(text))
    header = next(rows, None)
    if header is None:
        raise ConfigError("data", "the CSV is empty")
    header = [c.strip() for c in header]
    missing = [name for name in feature_names if name not in header]
    if missing:
        raise ConfigError(
            "data",
            f"the CSV lacks the model's feature column(s) {', '.join(missing)} "
            f"(expected a header with {', '.join(feature_names)})",
        )
    where = [header.index(name) for name in feature_names]
    values: list[list[float]] = []
    for line, row in enumerate(rows, start=2):
        if not any(c.strip() for c in row):
            continue
        if len(row) != len(header):
            raise ConfigError(
                "data", f"CSV line {line} has {len(row)} fields, the header has {len(header)}"
            )
        out = []
        for i in where:
            cell = row[i].strip()
            try:
                value = float(cell)
            except ValueError:
                value = math.nan
            if not math.isfinite(value):
                raise ConfigError(
                    "data", f"CSV line {line}, column {header[i]!r}: not a finite number: {cell!r}"
                )
            out.append(value)
        values.append(out)
    if not values:
        raise ConfigError("data", "the CSV has a header but no rows")
    return np.asarray(values, dtype=np.float64), header
