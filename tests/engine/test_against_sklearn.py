"""Backprop equals scikit-learn's MLP epoch by epoch, from the same initial weights."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from sklearn.neural_network import MLPClassifier, MLPRegressor

from engine import TrainConfig, Trainer, load_dataset

SKLEARN_ACTIVATION = {"relu": "relu", "tanh": "tanh", "sigmoid": "logistic", "identity": "identity"}
EPOCHS = 20


def _assert_close(ours: list[np.ndarray], theirs: list[np.ndarray], what: str) -> None:
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        scale = np.abs(b).max()
        error = np.abs(a - b).max() / scale
        assert error < 1e-9, f"{what}[{i}]: relative error {error:.3g}"


@pytest.mark.parametrize(
    ("dataset", "hidden", "activation", "batch_size", "momentum", "weight_decay"),
    [
        ("iris", (16, 8), "relu", 16, 0.0, 0.0),
        ("digits", (32,), "relu", 64, 0.0, 0.0),
        ("digits", (24, 12), "tanh", 100, 0.0, 0.0),
        ("wine", (10,), "sigmoid", 32, 0.9, 1e-3),
        ("breast_cancer", (12,), "identity", 50, 0.5, 0.01),  # binary: one logistic output
        ("sine", (16,), "tanh", 40, 0.0, 1e-4),  # regression: squared error
        ("iris", (), "relu", None, 0.0, 0.0),  # no hidden layer, full batch
    ],
)
def test_weights_equal_sklearn_after_every_epoch(
    dataset, hidden, activation, batch_size, momentum, weight_decay
) -> None:
    config = TrainConfig(
        dataset=dataset,
        optimizer="backprop",
        hidden=hidden,
        activation=activation,
        learning_rate=0.05,
        batch_size=batch_size,
        momentum=momentum,
        weight_decay=weight_decay,
        max_steps=EPOCHS,
        seed=7,
    )
    data = load_dataset(dataset, seed=7)
    trainer = Trainer(config, data)
    W, b = trainer.parameters()
    W0_initial = W[0].copy()
    X, y = data.X_train, data.y_train
    n = len(X)
    common = dict(
        hidden_layer_sizes=hidden,
        activation=SKLEARN_ACTIVATION[activation],
        solver="sgd",
        learning_rate_init=0.05,
        learning_rate="constant",
        batch_size=batch_size or n,
        momentum=momentum,
        nesterovs_momentum=False,
        alpha=weight_decay,
        shuffle=False,
        max_iter=1,
        random_state=0,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if data.task == "regression":
            ref = MLPRegressor(**common).partial_fit(X[:2], y[:2])
        else:
            ref = MLPClassifier(**common).partial_fit(X[:2], y[:2], classes=np.unique(y))
    # start scikit-learn from our initial point, with a fresh momentum state
    ref.coefs_ = [w.copy() for w in W]
    ref.intercepts_ = [c.copy() for c in b]
    ref._optimizer.velocities = [np.zeros_like(p) for p in ref.coefs_ + ref.intercepts_]

    steps = trainer.steps()
    for epoch in range(1, EPOCHS + 1):
        next(steps)
        order = trainer.optimizer.order
        if batch_size is None:
            assert order is None
            order = np.arange(n)
        ref.partial_fit(X[order], y[order])
        W, b = trainer.parameters()
        _assert_close(W, ref.coefs_, f"epoch {epoch} W")
        _assert_close(b, ref.intercepts_, f"epoch {epoch} b")
    # the networks moved: this is not the equality of two frozen networks
    assert np.abs(W[0] - W0_initial).max() > 1e-3
