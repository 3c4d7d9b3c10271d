"""The methods actually learn: digits by backprop, xor and moons by random walk."""

from __future__ import annotations

from engine import TrainConfig, Trainer, load_dataset


def _train(config: TrainConfig):
    data = load_dataset(config.dataset, seed=config.seed, dtype=config.dtype)
    trainer = Trainer(config, data)
    records = [r for r in trainer.steps() if r]
    return trainer.result(), records


def test_backprop_reaches_95_percent_validation_accuracy_on_digits() -> None:
    config = TrainConfig(
        dataset="digits",
        optimizer="backprop",
        hidden=(64,),
        learning_rate=0.1,
        batch_size=32,
        max_steps=20,
        momentum=0.5,
        dtype="float32",
        log_every=5,
    )
    result, _ = _train(config)
    assert result.outcome == "succeeded"
    assert result.summary["final_val_accuracy"] >= 0.95, result.summary


def test_random_walk_solves_xor() -> None:
    config = TrainConfig(
        dataset="xor",
        optimizer="random_walk",
        hidden=(8,),
        activation="tanh",
        step_size=0.1,
        candidates=8,
        max_steps=200,
        log_every=50,
        seed=0,
    )
    result, _ = _train(config)
    assert result.summary["final_train_accuracy"] == 1.0
    assert result.summary["final_val_accuracy"] == 1.0


def test_random_walk_lowers_the_loss_on_moons() -> None:
    config = TrainConfig(
        dataset="moons",
        optimizer="random_walk",
        hidden=(16,),
        step_size=0.05,
        temperature=1e-3,
        cooling=0.98,
        adapt_step=True,
        max_steps=300,
        log_every=10,
    )
    result, records = _train(config)
    assert records[-1]["train_loss"] < 0.5 * records[0]["train_loss"]
    assert result.summary["final_val_accuracy"] >= 0.85


def test_backprop_fits_the_sine_regression() -> None:
    config = TrainConfig(
        dataset="sine",
        optimizer="backprop",
        hidden=(32, 32),
        activation="tanh",
        learning_rate=0.05,
        batch_size=16,
        momentum=0.9,
        max_steps=60,
        log_every=20,
    )
    result, _ = _train(config)
    assert result.summary["final_val_r2"] > 0.95, result.summary
