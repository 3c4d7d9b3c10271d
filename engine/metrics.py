"""Names of the per-iteration metrics, defined once.

The engine emits records keyed by these names; the store's ``metrics`` table has
one column per name (plus ``run_id``); the CLI and the views use the same names.
Every value is a float or ``None`` except ``step`` (an int).
"""

from __future__ import annotations

#: Iteration counter: an epoch for backprop, an iteration for random walk.
STEP = "step"

#: Every metric column after ``step``, in table order.
METRICS: tuple[str, ...] = (
    "train_loss",
    "val_loss",
    "train_accuracy",  # classification tasks
    "val_accuracy",
    "train_r2",  # regression tasks
    "val_r2",
    "train_mae",
    "val_mae",
    "evaluations",  # forward evaluations so far, in training-set passes (both methods)
    "elapsed",  # seconds of training so far, resumed runs included
    "grad_norm",  # backprop: L2 norm of the full gradient at the last batch of the step
    "learning_rate",  # backprop: the learning rate in force during the step
    "step_size",  # random walk: sigma in force during the step
    "temperature",  # random walk: temperature in force during the step
    "acceptance_rate",  # random walk: accepted proposals / proposals so far
)

#: ``step`` followed by every metric: the columns of one record.
RECORD_FIELDS: tuple[str, ...] = (STEP, *METRICS)
