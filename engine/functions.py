"""Activations, their derivatives and the losses, in lookup tables.

Keys are the strings the grid file and the database use (``activation`` for the
hidden layers, ``task`` for the output activation and the loss), after
scikit-learn's ``neural_network/_base.py``:

- ``ACTIVATIONS[name](Z)`` applies the activation to the pre-activation ``Z``
  in place.
- ``DERIVATIVES[name](Z, delta)`` multiplies the back-propagated error ``delta``
  in place by the activation's derivative, written from the layer's OUTPUT
  ``Z`` (no pre-activation is kept).
- ``OUTPUT_ACTIVATIONS[task]`` is the output layer's activation: softmax,
  logistic sigmoid or identity. Each is the canonical link of
  ``LOSS_FUNCTIONS[task]``, so the error at the output pre-activation is simply
  ``P - Y``.
- ``LOSS_FUNCTIONS[task](Y, P)`` is the mean loss over the sample axis (the
  second to last one), so the same function scores one network, ``(n, c)``
  arrays, or ``K`` stacked candidates, ``(K, n, c)`` arrays (it then returns
  ``K`` losses). The conventions are scikit-learn's MLP: probabilities clipped
  to ``[eps, 1 - eps]`` of their dtype before the log, and the squared error is
  ``0.5 * mean`` of the squared residuals.

Every function works for float32 and float64 arrays, keeps their dtype and
allocates at most per-row temporaries.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

#: Slope of leaky ReLU for negative inputs.
LEAKY_SLOPE = 0.01

#: Exponents are raised to this floor before ``exp``: results stay normal numbers
#: (subnormal ones make ``exp`` 10-100x slower), and ``exp(floor)`` is far below
#: anything that can change a probability or a loss in that dtype.
EXP_FLOOR = {
    np.dtype(np.float32): math.log(np.finfo(np.float32).smallest_normal) + 1.0,  # about -86
    np.dtype(np.float64): math.log(np.finfo(np.float64).smallest_normal) + 1.0,  # about -707
}


# -- hidden activations, in place ---------------------------------------------------------


def inplace_identity(Z: np.ndarray) -> None:
    """Identity: leave ``Z`` unchanged."""


def inplace_relu(Z: np.ndarray) -> None:
    """ReLU, ``max(z, 0)``, in place."""
    np.maximum(Z, 0, out=Z)


def inplace_leaky_relu(Z: np.ndarray) -> None:
    """Leaky ReLU, ``max(z, 0.01 z)``, in place."""
    np.maximum(Z, Z * LEAKY_SLOPE, out=Z)


def inplace_tanh(Z: np.ndarray) -> None:
    """Hyperbolic tangent, in place."""
    np.tanh(Z, out=Z)


def inplace_sigmoid(Z: np.ndarray) -> None:
    """Logistic sigmoid ``1 / (1 + exp(-z))``, in place.

    Computed as ``(1 + tanh(z / 2)) / 2``, which is the same function but never
    overflows, so large negative inputs need no special case.
    """
    Z *= 0.5
    np.tanh(Z, out=Z)
    Z += 1
    Z *= 0.5


def inplace_softmax(Z: np.ndarray) -> None:
    """Softmax over the last axis, in place (``Z`` of shape ``(..., n, c)``)."""
    Z -= Z.max(axis=-1, keepdims=True)
    np.maximum(Z, EXP_FLOOR[Z.dtype], out=Z)
    np.exp(Z, out=Z)
    Z /= Z.sum(axis=-1, keepdims=True)


ACTIVATIONS: dict[str, Callable[[np.ndarray], None]] = {
    "relu": inplace_relu,
    "leaky_relu": inplace_leaky_relu,
    "tanh": inplace_tanh,
    "sigmoid": inplace_sigmoid,
    "identity": inplace_identity,
}


# -- derivatives from the layer's output, in place ----------------------------------------


def inplace_identity_derivative(Z: np.ndarray, delta: np.ndarray) -> None:
    """Identity: the derivative is 1, ``delta`` is unchanged."""


def inplace_relu_derivative(Z: np.ndarray, delta: np.ndarray) -> None:
    """ReLU: zero ``delta`` where the unit's output is 0 (``z <= 0``)."""
    np.multiply(delta, Z > 0, out=delta)


def inplace_leaky_relu_derivative(Z: np.ndarray, delta: np.ndarray) -> None:
    """Leaky ReLU: scale ``delta`` by 0.01 where the output is ``<= 0``."""
    np.multiply(delta, LEAKY_SLOPE, out=delta, where=Z <= 0)


def inplace_tanh_derivative(Z: np.ndarray, delta: np.ndarray) -> None:
    """tanh: ``delta *= 1 - Z**2``."""
    delta *= 1 - Z**2


def inplace_sigmoid_derivative(Z: np.ndarray, delta: np.ndarray) -> None:
    """Sigmoid: ``delta *= Z (1 - Z)``."""
    delta *= Z
    delta *= 1 - Z


DERIVATIVES: dict[str, Callable[[np.ndarray, np.ndarray], None]] = {
    "relu": inplace_relu_derivative,
    "leaky_relu": inplace_leaky_relu_derivative,
    "tanh": inplace_tanh_derivative,
    "sigmoid": inplace_sigmoid_derivative,
    "identity": inplace_identity_derivative,
}


# -- output layer and loss, keyed by task --------------------------------------------------

OUTPUT_ACTIVATIONS: dict[str, Callable[[np.ndarray], None]] = {
    "multiclass": inplace_softmax,
    "binary": inplace_sigmoid,
    "regression": inplace_identity,
}


def log_loss(Y: np.ndarray, P: np.ndarray) -> np.ndarray:
    """Categorical cross-entropy, mean over samples.

    Parameters
    ----------
    Y : ndarray of shape (n_samples, n_classes)
        One-hot targets.
    P : ndarray of shape (..., n_samples, n_classes)
        Softmax probabilities.

    Returns
    -------
    loss : ndarray of shape (...)
        ``-mean_i log p_i[y_i]``; a 0-d array for a single network.
    """
    # Y is one-hot, so sum_c Y*P picks p[y] with one multiply-add per entry and
    # the log runs over n values instead of n*c.
    p_true = (P * Y).sum(axis=-1)
    eps = np.finfo(P.dtype).eps
    np.clip(p_true, eps, 1 - eps, out=p_true)
    np.log(p_true, out=p_true)
    return -p_true.mean(axis=-1)


def binary_log_loss(Y: np.ndarray, P: np.ndarray) -> np.ndarray:
    """Binary cross-entropy, mean over samples.

    Parameters
    ----------
    Y : ndarray of shape (n_samples, 1)
        0/1 targets.
    P : ndarray of shape (..., n_samples, 1)
        Sigmoid probabilities of class 1.
    """
    eps = np.finfo(P.dtype).eps
    p_true = np.where(Y > 0.5, P, 1 - P)  # probability given to the true class
    np.clip(p_true, eps, 1 - eps, out=p_true)
    np.log(p_true, out=p_true)
    return -p_true.mean(axis=(-2, -1))


def squared_loss(Y: np.ndarray, P: np.ndarray) -> np.ndarray:
    """Half the squared error, summed over outputs and averaged over samples.

    With one output (the engine's regression) this is scikit-learn's
    ``squared_error``, ``0.5 * mean((p - y)^2)``; summing over outputs keeps
    ``P - Y`` the exact gradient when there are several.

    Parameters
    ----------
    Y : ndarray of shape (n_samples, n_outputs)
    P : ndarray of shape (..., n_samples, n_outputs)
    """
    R = P - Y
    R *= R
    return 0.5 * R.sum(axis=-1).mean(axis=-1)


LOSS_FUNCTIONS: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "multiclass": log_loss,
    "binary": binary_log_loss,
    "regression": squared_loss,
}
