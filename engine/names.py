"""The engine's names, without NumPy: datasets, tasks and activations.

What a grid is checked against (``engine.config``) lives here, so reading and
validating a grid — the CLI's side of `mlpq submit` and `mlpq run` — does not
import NumPy; the modules that compute (``datasets``, ``functions``) take their
names from here and tests check that the two agree.
"""

from __future__ import annotations

TASKS: tuple[str, ...] = ("multiclass", "binary", "regression")

#: Built-in datasets and their task.
DATASET_TASKS: dict[str, str] = {
    "xor": "binary",
    "moons": "binary",
    "circles": "binary",
    "spirals": "multiclass",
    "blobs": "multiclass",
    "sine": "regression",
    "iris": "multiclass",
    "wine": "multiclass",
    "breast_cancer": "binary",
    "digits": "multiclass",
}
DATASETS: tuple[str, ...] = tuple(DATASET_TASKS)

#: Hidden-layer activations, in the order the docs list them (``functions.ACTIVATIONS``).
ACTIVATION_NAMES: tuple[str, ...] = (
    "relu",
    "leaky_relu",
    "tanh",
    "sigmoid",
    "identity",
    "step",
    "sign",
)

#: Hidden activations whose derivative is zero wherever it exists: backprop through
#: them trains only the output layer (the chain rule gives the hidden layers nothing).
NO_GRADIENT = frozenset({"step", "sign"})

#: Built-in datasets' shapes: (samples, input features, output units).
DATASET_SHAPES: dict[str, tuple[int, int, int]] = {
    "xor": (200, 2, 1),
    "moons": (400, 2, 1),
    "circles": (400, 2, 1),
    "spirals": (300, 2, 3),
    "blobs": (400, 2, 4),
    "sine": (400, 1, 1),
    "iris": (150, 4, 3),
    "wine": (178, 13, 3),
    "breast_cancer": (569, 30, 1),
    "digits": (1797, 64, 10),
}
