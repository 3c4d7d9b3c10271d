"""The training loop: records, counters, stopping rules, divergence, checkpoints, weights."""

from __future__ import annotations

import io
import itertools
import json
import math
from functools import cache

import numpy as np
import pytest

from engine import ConfigError, TrainConfig, Trainer, load_dataset, load_weights
from engine.metrics import RECORD_FIELDS

BACKPROP_ONLY = {"grad_norm", "learning_rate"}
RANDOM_WALK_ONLY = {"step_size", "temperature", "acceptance_rate"}
CLASSIFICATION_ONLY = {"train_accuracy", "val_accuracy"}
REGRESSION_ONLY = {"train_r2", "val_r2", "train_mae", "val_mae"}


@cache
def _data(name: str, seed: int = 0, dtype: str = "float64"):
    return load_dataset(name, seed=seed, dtype=dtype)


def _run(config: TrainConfig, state: bytes | None = None):
    trainer = Trainer(config, _data(config.dataset, config.seed, config.dtype), state)
    return trainer, list(trainer.steps())


def _without_elapsed(records):
    return [None if r is None else {k: v for k, v in r.items() if k != "elapsed"} for r in records]


@pytest.mark.parametrize("optimizer", ["backprop", "random_walk"])
@pytest.mark.parametrize("dataset", ["moons", "sine", "iris"])
def test_records_have_exactly_the_metric_fields(optimizer, dataset) -> None:
    config = TrainConfig(dataset=dataset, optimizer=optimizer, max_steps=4, hidden=(8,))
    _, records = _run(config)
    assert len(records) == 4
    regression = dataset == "sine"
    never = (RANDOM_WALK_ONLY if optimizer == "backprop" else BACKPROP_ONLY) | (
        CLASSIFICATION_ONLY if regression else REGRESSION_ONLY
    )
    for step, record in enumerate(records, start=1):
        assert tuple(record) == RECORD_FIELDS
        assert record["step"] == step and type(record["step"]) is int
        for key in RECORD_FIELDS[1:]:
            value = record[key]
            if key in never:
                assert value is None, key
            elif key == "val_r2" or key == "train_r2":
                assert isinstance(value, float)
            else:
                assert isinstance(value, float) and math.isfinite(value), key
    assert [r["elapsed"] for r in records] == sorted(r["elapsed"] for r in records)


@pytest.mark.parametrize(
    ("optimizer", "extra", "per_step"),
    [
        ("backprop", {"batch_size": 16}, 1),
        ("backprop", {}, 1),
        ("random_walk", {"candidates": 5}, 5),
        ("random_walk", {}, 1),
    ],
)
def test_evaluations_count_training_set_passes_from_one(optimizer, extra, per_step) -> None:
    config = TrainConfig(dataset="xor", optimizer=optimizer, max_steps=6, **extra)
    trainer, records = _run(config)
    assert [r["evaluations"] for r in records] == [1.0 + per_step * s for s in range(1, 7)]
    assert trainer.result().summary["evaluations"] == 1.0 + 6 * per_step


def test_log_every_yields_none_between_records_and_always_logs_the_last_step() -> None:
    config = TrainConfig(dataset="xor", optimizer="backprop", max_steps=10, log_every=4)
    _, records = _run(config)
    assert len(records) == 10
    assert [r["step"] for r in records if r] == [4, 8, 10]
    assert [i for i, r in enumerate(records, 1) if r is None] == [1, 2, 3, 5, 6, 7, 9]


def test_learning_rate_decay_and_temperature_schedule_are_reported() -> None:
    config = TrainConfig(
        dataset="xor", optimizer="backprop", max_steps=3, learning_rate=0.3, lr_decay=0.5
    )
    _, records = _run(config)
    assert [r["learning_rate"] for r in records] == [0.3, 0.3 / 1.5, 0.3 / 2.0]
    config = TrainConfig(
        dataset="xor", optimizer="random_walk", max_steps=3, temperature=2.0, cooling=0.5
    )
    _, records = _run(config)
    assert [r["temperature"] for r in records] == [2.0, 1.0, 0.5]


@pytest.mark.parametrize(
    "config",
    [
        TrainConfig(
            dataset="spirals",
            optimizer="backprop",
            hidden=(16, 8),
            batch_size=32,
            momentum=0.9,
            weight_decay=1e-3,
            lr_decay=0.1,
            max_steps=12,
            learning_rate=0.05,
            seed=4,
        ),
        TrainConfig(
            dataset="sine",
            optimizer="backprop",
            hidden=(8,),
            activation="tanh",
            max_steps=12,
            seed=1,
            dtype="float32",
        ),
        TrainConfig(
            dataset="moons",
            optimizer="random_walk",
            hidden=(8,),
            candidates=4,
            temperature=0.05,
            cooling=0.9,
            adapt_step=True,
            max_steps=12,
            seed=2,
        ),
        TrainConfig(
            dataset="iris",
            optimizer="random_walk",
            hidden=(),
            step_size=0.2,
            patience=1000,
            max_steps=12,
            dtype="float32",
            log_every=5,
        ),
        TrainConfig(
            dataset="moons",
            optimizer="random_walk",
            hidden=(8, 4),
            activation="step",
            candidates=6,
            quantize=0.05,
            temperature=0.02,
            max_steps=12,
            seed=3,
        ),
        TrainConfig(
            dataset="circles",
            optimizer="backprop",
            hidden=(8,),
            activation="sign",
            batch_size=16,
            momentum=0.5,
            max_steps=12,
            seed=5,
        ),
    ],
    ids=[
        "backprop-minibatch-momentum",
        "backprop-fullbatch-f32",
        "rw-candidates-annealing",
        "rw-no-hidden-f32",
        "rw-step-quantized",
        "backprop-sign",
    ],
)
def test_resume_from_any_step_is_bitwise_the_uninterrupted_run(config) -> None:
    full_trainer, full = _run(config)
    full_result = full_trainer.result()
    for k in (1, 5, 11, 12):
        trainer = Trainer(config, _data(config.dataset, config.seed, config.dtype))
        head = []
        for record in trainer.steps():
            head.append(record)
            if trainer.step == k:
                break
        state = trainer.checkpoint()
        # no pickle anywhere in a checkpoint
        with np.load(io.BytesIO(state), allow_pickle=False) as z:
            assert all(z[name].dtype != object for name in z.files)
        resumed, tail = _run(config, state)
        assert resumed.step == config.max_steps
        assert _without_elapsed(head + tail) == _without_elapsed(full), f"k={k}"
        result = resumed.result()
        assert result.weights == full_result.weights, f"k={k}"
        summary = {k2: v for k2, v in result.summary.items() if k2 != "wall_seconds"}
        assert summary == {k2: v for k2, v in full_result.summary.items() if k2 != "wall_seconds"}
        assert result.stop_reason == "max_steps"


def test_resume_chains_and_elapsed_carries_over() -> None:
    config = TrainConfig(dataset="moons", optimizer="random_walk", max_steps=9, candidates=3)
    _, full = _run(config)
    state, records = None, []
    for _ in range(3):  # three sessions of three steps
        trainer = Trainer(config, _data("moons"), state)
        for record in trainer.steps():
            records.append(record)
            if trainer.step % 3 == 0:
                break
        state = trainer.checkpoint()
    assert _without_elapsed(records) == _without_elapsed(full)
    elapsed = [r["elapsed"] for r in records]
    assert elapsed == sorted(elapsed)
    # resuming a finished run trains no more
    done = Trainer(config, _data("moons"), state)
    assert list(done.steps()) == [] and done.result().stop_reason == "max_steps"


def test_same_config_and_seed_give_bitwise_identical_runs() -> None:
    config = TrainConfig(
        dataset="digits",
        optimizer="backprop",
        hidden=(16,),
        batch_size=50,
        max_steps=3,
        dtype="float32",
        seed=9,
    )
    a_trainer, a = _run(config)
    b_trainer, b = _run(config)
    assert _without_elapsed(a) == _without_elapsed(b)
    assert a_trainer.result().weights == b_trainer.result().weights
    c_trainer, _ = _run(TrainConfig(**{**config.to_dict(), "hidden": (16,), "seed": 10}))
    assert c_trainer.result().weights != a_trainer.result().weights


@pytest.mark.parametrize("activation", ["step", "sign"])
def test_hard_threshold_and_quantized_runs_are_bitwise_deterministic(activation: str) -> None:
    config = TrainConfig(
        dataset="moons",
        optimizer="random_walk",
        hidden=(8,),
        activation=activation,
        candidates=4,
        quantize=0.1,
        max_steps=10,
        seed=4,
    )
    a_trainer, a = _run(config)
    b_trainer, b = _run(config)
    assert _without_elapsed(a) == _without_elapsed(b)
    assert a_trainer.result().weights == b_trainer.result().weights


def test_quantized_random_walk_returns_a_point_of_the_grid() -> None:
    from engine import load_weights

    q = 0.05
    config = TrainConfig(
        dataset="moons",
        optimizer="random_walk",
        hidden=(6,),
        candidates=4,
        quantize=q,
        max_steps=25,
        seed=2,
    )
    trainer, records = _run(config)
    assert records[-1]["acceptance_rate"] > 0  # it moved off the (unrounded) start
    Ws, bs, _ = load_weights(trainer.result().weights)
    for array in Ws + bs:
        steps = np.asarray(array, dtype=np.float64) / q
        np.testing.assert_allclose(steps, np.round(steps), atol=1e-9)


def test_checkpoint_of_another_config_is_refused() -> None:
    config = TrainConfig(dataset="xor", optimizer="backprop", max_steps=2)
    trainer, _ = _run(config)
    other = TrainConfig(dataset="xor", optimizer="backprop", max_steps=2, learning_rate=0.5)
    with pytest.raises(ValueError, match=r"^state: the checkpoint was taken with a different"):
        Trainer(other, _data("xor"), trainer.checkpoint())


def test_divergence_stops_the_run_and_keeps_the_last_finite_weights() -> None:
    config = TrainConfig(
        dataset="sine",
        optimizer="backprop",
        hidden=(64, 64),
        learning_rate=1e3,
        max_steps=50,
        activation="identity",
    )
    trainer, records = _run(config)
    result = trainer.result()
    assert (result.outcome, result.stop_reason) == ("diverged", "diverged")
    assert trainer.step < 50 and len(records) == trainer.step
    last = records[-1]
    assert last["step"] == trainer.step and last["train_loss"] is None
    for record in records:  # no NaN or inf ever reaches a record
        for value in record.values():
            assert value is None or math.isfinite(value)
    Ws, bs, _ = load_weights(result.weights)
    assert all(np.isfinite(a).all() for a in Ws + bs)
    assert all(v is None or math.isfinite(v) for v in result.summary.values())
    # the returned weights are the parameters at the end of the previous step
    state_before = Trainer(config, _data("sine"))
    for _ in state_before.steps():
        if state_before.step == trainer.step - 1:
            break
    before = state_before.parameters()
    for a, b in zip(Ws + bs, before[0] + before[1], strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_non_finite_loss_at_the_last_step_is_divergence_too() -> None:
    base = dict(
        dataset="sine",
        optimizer="backprop",
        hidden=(64, 64),
        learning_rate=1e3,
        activation="identity",
    )
    probe, records = _run(TrainConfig(**base, max_steps=50))
    k = probe.step  # the optimizer found the non-finite loss in step k ...
    assert records[k - 2]["train_loss"] is None  # ... of the parameters step k - 1 produced
    # A run that ends at step k - 1 ends on those parameters: diverged, reverted to step k - 2.
    trainer, records = _run(TrainConfig(**base, max_steps=k - 1))
    result = trainer.result()
    assert (result.outcome, result.stop_reason) == ("diverged", "diverged")
    assert records[-1]["step"] == k - 1 and records[-1]["train_loss"] is None
    Ws, bs, _ = load_weights(result.weights)
    earlier = Trainer(TrainConfig(**base, max_steps=k - 2), _data("sine"))
    list(earlier.steps())
    W_before, b_before = earlier.parameters()
    for a, b in zip(Ws + bs, W_before + b_before, strict=True):
        np.testing.assert_array_equal(a, b)


def test_target_loss_and_patience_stop_the_run() -> None:
    config = TrainConfig(
        dataset="xor",
        optimizer="backprop",
        learning_rate=0.5,
        max_steps=500,
        target_loss=0.05,
        log_every=1000,
    )
    trainer, records = _run(config)
    result = trainer.result()
    assert result.stop_reason == "target_loss" and result.outcome == "succeeded"
    assert records[-1]["train_loss"] <= 0.05
    assert trainer.step < 500
    assert all(r is None for r in records[:-1])  # stopping step is logged even off-schedule
    # random walk at T=0 with a tiny sigma: soon three proposals in a row fail to improve
    config = TrainConfig(
        dataset="circles", optimizer="random_walk", step_size=1e-6, max_steps=500, patience=3
    )
    trainer, records = _run(config)
    assert trainer.result().stop_reason == "patience"
    assert trainer.step < 500


def test_breaking_off_gives_a_stopped_result_and_steps_can_continue() -> None:
    config = TrainConfig(dataset="xor", optimizer="backprop", max_steps=5)
    trainer = Trainer(config, _data("xor"))
    assert trainer.result().stop_reason == "stopped" and trainer.result().summary["iterations"] == 0
    for _ in trainer.steps():
        break
    assert trainer.step == 1 and trainer.result().stop_reason == "stopped"
    assert len(list(trainer.steps())) == 4
    assert trainer.result().stop_reason == "max_steps"


def test_weights_npz_loads_without_pickle_and_carries_the_config() -> None:
    config = TrainConfig(
        dataset="iris", optimizer="backprop", hidden=(5, 4), max_steps=2, dtype="float32"
    )
    trainer, _ = _run(config)
    blob = trainer.result().weights
    with np.load(io.BytesIO(blob), allow_pickle=False) as z:
        assert {"W0", "b0", "W1", "b1", "W2", "b2", "config"} <= set(z.files)
        assert z["config"].shape == () and z["config"].dtype.kind == "U"
        assert json.loads(str(z["config"])) == config.to_dict()
        assert json.loads(str(z["meta"]))["task"] == "multiclass"
    Ws, bs, cfg = load_weights(blob)
    assert [W.shape for W in Ws] == [(4, 5), (5, 4), (4, 3)]
    assert [b.shape for b in bs] == [(5,), (4,), (3,)]
    assert all(a.dtype == np.float32 for a in Ws + bs)
    assert TrainConfig.from_dict(cfg) == config


def test_random_walk_returns_the_best_point_seen() -> None:
    config = TrainConfig(
        dataset="moons",
        optimizer="random_walk",
        hidden=(8,),
        max_steps=60,
        temperature=0.5,
        step_size=0.3,
        seed=3,
    )
    trainer, records = _run(config)
    result = trainer.result()
    best_train = min(r["train_loss"] for r in records)
    assert result.summary["final_train_loss"] == pytest.approx(best_train, rel=1e-12)
    accepted_worse = any(b["train_loss"] > a["train_loss"] for a, b in itertools.pairwise(records))
    assert accepted_worse  # with T > 0 the chain did go uphill, yet the best is returned
    assert 0 < records[-1]["acceptance_rate"] <= 1


def test_summary_fields() -> None:
    config = TrainConfig(dataset="sine", optimizer="backprop", max_steps=3, log_every=2)
    trainer, records = _run(config)
    summary = trainer.result().summary
    assert set(summary) == {
        "final_train_loss",
        "final_val_loss",
        "best_val_loss",
        "final_train_accuracy",
        "final_val_accuracy",
        "best_val_accuracy",
        "final_val_r2",
        "best_val_r2",
        "iterations",
        "evaluations",
        "wall_seconds",
    }
    assert summary["final_train_accuracy"] is None and summary["best_val_accuracy"] is None
    assert summary["final_val_r2"] == records[-1]["val_r2"]
    assert summary["best_val_loss"] == min(r["val_loss"] for r in records if r)
    assert summary["iterations"] == 3 and summary["wall_seconds"] > 0


def test_data_must_match_the_config() -> None:
    with pytest.raises(ConfigError, match=r"^dataset: config says 'xor'"):
        Trainer(TrainConfig(dataset="xor", optimizer="backprop"), _data("moons"))


@pytest.mark.parametrize(
    ("optimizer", "extra", "steps", "spent"),
    [
        ("backprop", {"learning_rate": 0.1}, 99, 100),  # 1 + 99 epochs
        ("random_walk", {"candidates": 8}, 12, 97),  # 1 + 12 x 8; a 13th would make 105
        ("random_walk", {"candidates": 1}, 99, 100),
    ],
)
def test_an_evaluation_budget_is_never_exceeded(optimizer, extra, steps, spent) -> None:
    config = TrainConfig(
        dataset="moons", optimizer=optimizer, hidden=(8,), max_steps=10_000,
        max_evaluations=100, log_every=7, **extra,
    )  # fmt: skip
    trainer, records = _run(config)
    logged = [r for r in records if r is not None]
    assert trainer.step == steps and len(records) == steps
    assert logged[-1]["step"] == steps and logged[-1]["evaluations"] == spent  # last is logged
    assert trainer.result().stop_reason == "max_evaluations"
    assert trainer.result().summary["evaluations"] == spent
    # max_steps still applies when it comes first
    short = TrainConfig(**{**config.__dict__, "max_steps": 5})
    trainer, _ = _run(short)
    assert trainer.step == 5 and trainer.result().stop_reason == "max_steps"


def test_an_evaluation_budget_must_buy_a_step() -> None:
    with pytest.raises(ConfigError, match="max_evaluations: 8 leaves no step"):
        TrainConfig(dataset="moons", optimizer="random_walk", candidates=8, max_evaluations=8)
    assert TrainConfig(
        dataset="moons", optimizer="random_walk", candidates=8, max_evaluations=9
    ).max_evaluations == 9  # fmt: skip
    unset = TrainConfig(dataset="moons", optimizer="backprop")
    assert "max_evaluations" not in unset.to_dict()  # the hashes of older runs stay the same


def _epoch_checking_every_batch_loss(opt, t: int) -> bool:
    """A mini-batch epoch as it reads: each batch's loss computed, the epoch stopped at the
    first non-finite one. Returns whether the epoch diverged (parameters then restored)."""
    lr = opt.config.learning_rate
    start = opt.theta.copy()
    order = opt.rng.permutation(opt.X.shape[0])
    X1 = np.hstack([opt.X, np.ones((len(opt.X), 1), dtype=opt.X.dtype)])[order]
    Y = opt.Y[order]
    diverged = False
    for s in range(0, len(order), opt.batch):
        loss = opt._bp.backprop(X1[s : s + opt.batch], Y[s : s + opt.batch], None, lr)[0]
        if not math.isfinite(loss):
            diverged = True
            break
        opt.theta -= opt.grad
    if diverged or not np.isfinite(opt.theta).all():
        opt.theta[...] = start
        return True
    return False


@pytest.mark.parametrize(
    ("dataset", "hidden", "activation"),
    [
        ("digits", (16,), "relu"),
        ("iris", (8, 3), "tanh"),
        ("wine", (8,), "leaky_relu"),
        ("breast_cancer", (8,), "relu"),
        ("sine", (8, 8), "identity"),
    ],
)
@pytest.mark.parametrize("learning_rate", [0.1, 50.0, 1e4])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_mini_batch_epochs_end_as_if_every_batch_loss_were_checked(
    dataset, hidden, activation, learning_rate, dtype
) -> None:
    # The optimizer spares the batch losses (gradient()): its epochs must end where
    # checking each batch's loss ends them, diverging runs included, bit for bit.
    config = TrainConfig(
        dataset=dataset,
        optimizer="backprop",
        hidden=hidden,
        activation=activation,
        learning_rate=learning_rate,
        batch_size=16,
        max_steps=12,
        dtype=dtype,
    )
    fast = Trainer(config, _data(dataset, 0, dtype)).optimizer
    reference = Trainer(config, _data(dataset, 0, dtype)).optimizer
    for t in range(config.max_steps):
        with np.errstate(all="ignore"):
            fast.step(t)
            diverged = _epoch_checking_every_batch_loss(reference, t)
        assert fast.diverged is diverged
        assert fast.theta.tobytes() == reference.theta.tobytes()
        if diverged:
            break
