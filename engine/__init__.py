"""mlpq's training engine: NumPy multilayer perceptrons trained by backprop or random walk.

Imports NumPy only (scikit-learn lazily, inside the loader of its bundled
datasets). Nothing here knows about Celery, SQL or the CLI.
"""

from engine.config import OPTIMIZER_PARAMS, OPTIMIZERS, TrainConfig
from engine.datasets import DATASETS, Dataset, csv_name, load_dataset
from engine.errors import ConfigError
from engine.functions import ACTIVATIONS, DERIVATIVES, LOSS_FUNCTIONS, NO_GRADIENT
from engine.trainer import Trainer, TrainResult, load_weights

__all__ = [
    "ACTIVATIONS",
    "DATASETS",
    "DERIVATIVES",
    "LOSS_FUNCTIONS",
    "NO_GRADIENT",
    "OPTIMIZERS",
    "OPTIMIZER_PARAMS",
    "ConfigError",
    "Dataset",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "csv_name",
    "load_dataset",
    "load_weights",
]
