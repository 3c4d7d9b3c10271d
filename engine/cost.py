"""What a run will cost, estimated from its config alone (no data, no NumPy).

``estimate_seconds(config)`` is the training time of a run on one core of a
machine like ours: multiply-adds per training-set pass (the network's
``sum(fan_in * fan_out)`` times the training samples; a backprop pass is a forward
and a backward pass, about three times the forward's) times the passes its budget
allows, plus a fixed cost per NumPy call (per mini-batch, per random-walk
iteration) and per run. Only its scale matters: the queue packs runs whose
estimates add up to a target duration into one message, so a run estimated ten
times too long travels alone and one estimated ten times too short shares a
message with a few more. A CSV dataset's size is not known from the config:
its runs are estimated as long (they travel alone).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from typing import Any

from engine.names import DATASET_SHAPES

#: Seconds per multiply-add in the small GEMMs of a training step (measured on ours, AVX-512).
SECONDS_PER_MAC = 0.08e-9
#: Seconds of NumPy call overhead per mini-batch step (forward, backward, update).
SECONDS_PER_BATCH = 40e-6
#: Seconds per random-walk iteration besides its arithmetic (proposal, acceptance).
SECONDS_PER_ITERATION = 30e-6
#: Seconds per run besides its steps: dataset, network, claim, final write.
SECONDS_PER_RUN = 2e-3
#: The estimate of a run whose size cannot be known from its config (a CSV dataset).
UNKNOWN = math.inf


def estimate_seconds(config: Mapping[str, Any]) -> float:
    """Estimated training seconds of the run ``config`` (a canonical config dict)."""
    shape = DATASET_SHAPES.get(config["dataset"])
    if shape is None:
        return UNKNOWN
    samples, inputs, outputs = shape
    train = max(1, round(samples * (1 - float(config.get("val_fraction", 0.2)))))
    units = [inputs, *config.get("hidden", [32]), outputs]
    macs = sum(a * b for a, b in itertools.pairwise(units))
    steps = int(config.get("max_steps", 100))
    budget = config.get("max_evaluations")
    if config["optimizer"] == "random_walk":
        candidates = int(config.get("candidates", 1))
        if budget is not None:
            steps = min(steps, max(1, (int(budget) - 1) // candidates))
        per_step = candidates * macs * train * SECONDS_PER_MAC + SECONDS_PER_ITERATION
    else:
        if budget is not None:
            steps = min(steps, int(budget) - 1)
        batch = config.get("batch_size") or train
        batches = math.ceil(train / batch)
        per_step = 3 * macs * train * SECONDS_PER_MAC + batches * SECONDS_PER_BATCH
    # a validation pass per logged step
    per_step += macs * (samples - train) * SECONDS_PER_MAC / int(config.get("log_every", 1))
    return SECONDS_PER_RUN + steps * per_step
