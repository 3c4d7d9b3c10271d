"""mlpq's training engine: NumPy multilayer perceptrons trained by backprop or random walk.

Imports NumPy only (scikit-learn lazily, inside the loader of its bundled
datasets). Nothing here knows about Celery, SQL or the CLI.

The names below are loaded on first use (PEP 562): ``from engine import
TrainConfig`` validates a config without importing NumPy (``engine.names``,
``engine.config``), which keeps the CLI's start-up short; ``Trainer`` and the
datasets bring NumPy with them.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE: dict[str, str] = {
    "OPTIMIZERS": "engine.config",
    "OPTIMIZER_PARAMS": "engine.config",
    "TrainConfig": "engine.config",
    "ConfigError": "engine.errors",
    "DATASETS": "engine.names",
    "NO_GRADIENT": "engine.names",
    "Dataset": "engine.datasets",
    "csv_name": "engine.datasets",
    "load_dataset": "engine.datasets",
    "ACTIVATIONS": "engine.functions",
    "DERIVATIVES": "engine.functions",
    "LOSS_FUNCTIONS": "engine.functions",
    "Trainer": "engine.trainer",
    "TrainResult": "engine.trainer",
    "load_weights": "engine.trainer",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'engine' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_WHERE})
