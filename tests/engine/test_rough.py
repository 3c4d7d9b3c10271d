"""Rough landscapes: with step units backprop can only train its output layer, random walk
moves every layer and wins at the same evaluation budget (moons, 3 seeds)."""

from __future__ import annotations

import numpy as np

from engine import TrainConfig, Trainer, load_dataset, load_weights

SEEDS = (0, 1, 2)
#: Forward evaluations over the training set each method gets: backprop 1 + 299 epochs,
#: random walk 1 + 37 iterations x 8 candidates.
BUDGET = 300
CANDIDATES = 8


def _train(config: TrainConfig) -> tuple[Trainer, float]:
    trainer = Trainer(config, load_dataset(config.dataset, seed=config.seed))
    for _ in trainer.steps():
        pass
    return trainer, trainer.result().summary["best_val_accuracy"]


def _configs(seed: int) -> tuple[TrainConfig, TrainConfig]:
    common = {"dataset": "moons", "hidden": (16,), "activation": "step", "seed": seed}
    backprop = TrainConfig(optimizer="backprop", learning_rate=0.3, max_steps=BUDGET - 1, **common)
    walk = TrainConfig(
        optimizer="random_walk",
        step_size=0.1,
        candidates=CANDIDATES,
        max_steps=(BUDGET - 1) // CANDIDATES,
        **common,
    )
    return backprop, walk


def test_with_step_units_random_walk_beats_backprop_at_the_same_evaluation_budget() -> None:
    bp_acc, rw_acc = [], []
    for seed in SEEDS:
        bp_config, rw_config = _configs(seed)
        bp, acc = _train(bp_config)
        bp_acc.append(acc)
        rw, acc = _train(rw_config)
        rw_acc.append(acc)
        bp_evals = bp.result().summary["evaluations"]
        rw_evals = rw.result().summary["evaluations"]
        assert bp_evals == BUDGET and BUDGET - CANDIDATES < rw_evals <= BUDGET

        # Backprop's hidden layer never moved (its gradient is zero); random walk's did.
        start = _initial_hidden(bp_config)
        assert np.array_equal(load_weights(bp.result().weights)[0][0], start)
        assert not np.array_equal(load_weights(rw.result().weights)[0][0], start)
    assert np.mean(rw_acc) >= 0.85, rw_acc
    assert np.mean(rw_acc) >= np.mean(bp_acc) + 0.05, (rw_acc, bp_acc)


def _initial_hidden(config: TrainConfig) -> np.ndarray:
    """The first layer's weights a run of ``config`` starts from (before any step)."""
    trainer = Trainer(
        TrainConfig(**{**config.to_dict(), "hidden": config.hidden, "max_steps": 1}),
        load_dataset(config.dataset, seed=config.seed),
    )
    return load_weights(trainer.result().weights)[0][0]
