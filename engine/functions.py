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
- ``LOSS_FUNCTIONS[task](Y, Z)`` is the mean loss over the sample axis (the
  second to last one), computed from the output layer's PRE-activation ``Z``
  (the logits): the same function scores one network, ``(n, c)`` arrays, or
  ``K`` stacked candidates, ``(K, n, c)`` arrays (it then returns ``K``
  losses). The conventions are scikit-learn's MLP (each sample's loss as if
  its probability were clipped to ``[eps, 1 - eps]``; the squared error is
  ``0.5 * mean`` of the squared residuals), but computed from logits, so the
  value is accurate even where a probability rounds to 0 or 1.

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


def inplace_step(Z: np.ndarray) -> None:
    """Heaviside step, 1 where ``z > 0`` and 0 elsewhere, in place."""
    np.heaviside(Z, 0.0, out=Z)


def inplace_sign(Z: np.ndarray) -> None:
    """Sign, +1 where ``z >= 0`` and -1 elsewhere, in place (never 0)."""
    np.copysign(1.0, Z, out=Z)


def inplace_logistic(Z: np.ndarray) -> None:
    """Logistic sigmoid ``1 / (1 + exp(-z))`` of the output layer, in place.

    To within a rounding or two of full relative precision down to the smallest
    normal numbers. ``-z`` is capped first (at 700 in float64, 88 in float32), so
    ``exp`` never overflows and raises no floating-point warning; below the cap the
    result stays near 1e-304 (6e-39) instead of underflowing. (``inplace_sigmoid``
    is exact only to within 1e-16 absolute, which is all a hidden unit needs. No
    loss takes the log of these probabilities: losses are computed from the
    logits.) Five cheap passes: ``np.logaddexp`` alone costs more.
    """
    np.negative(Z, out=Z)
    np.minimum(Z, LOGISTIC_CAP[Z.dtype], out=Z)
    np.exp(Z, out=Z)
    Z += 1
    np.reciprocal(Z, out=Z)


#: ``inplace_logistic`` caps ``-z`` here: ``exp`` of it is finite in that dtype.
LOGISTIC_CAP = {np.dtype(np.float32): 88.0, np.dtype(np.float64): 700.0}


def inplace_softmax(Z: np.ndarray) -> None:
    """Softmax over the last axis, in place (``Z`` of shape ``(..., n, c)``)."""
    Z -= Z.max(axis=-1, keepdims=True)
    np.maximum(Z, EXP_FLOOR[Z.dtype], out=Z)
    np.exp(Z, out=Z)
    Z /= Z.sum(axis=-1, keepdims=True)


class Softmax:
    """``inplace_softmax`` of at most ``capacity`` rows, its per-row buffers allocated once.

    The same operations as ``inplace_softmax`` and ``softmax_log_loss`` (the same
    reductions, written into buffers), so the same bits, without their Python wrappers.
    """

    def __init__(self, capacity: int, dtype: np.dtype) -> None:
        self._shift = np.empty((capacity, 1), dtype=dtype)
        self._total = np.empty((capacity, 1), dtype=dtype)
        self._floor = EXP_FLOOR[np.dtype(dtype)]

    def __call__(self, Z: np.ndarray) -> None:
        m = Z.shape[0]
        shift, total = self._shift[:m], self._total[:m]
        np.maximum.reduce(Z, axis=-1, out=shift, keepdims=True)
        np.subtract(Z, shift, out=Z)
        np.maximum(Z, self._floor, out=Z)
        np.exp(Z, out=Z)
        np.add.reduce(Z, axis=-1, out=total, keepdims=True)
        np.divide(Z, total, out=Z)


#: Hidden activations with ``f(1) == 1``: a column of ones (the next layer's bias
#: input) passes through them unchanged, so it need not be written again.
KEEP_ONES = frozenset({"relu", "leaky_relu", "identity", "step", "sign"})


ACTIVATIONS: dict[str, Callable[[np.ndarray], None]] = {
    "relu": inplace_relu,
    "leaky_relu": inplace_leaky_relu,
    "tanh": inplace_tanh,
    "sigmoid": inplace_sigmoid,
    "identity": inplace_identity,
    "step": inplace_step,
    "sign": inplace_sign,
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


def inplace_zero_derivative(Z: np.ndarray, delta: np.ndarray) -> None:
    """Step and sign: the derivative is 0 wherever it exists, so ``delta`` becomes 0."""
    delta.fill(0)


DERIVATIVES: dict[str, Callable[[np.ndarray, np.ndarray], None]] = {
    "relu": inplace_relu_derivative,
    "leaky_relu": inplace_leaky_relu_derivative,
    "tanh": inplace_tanh_derivative,
    "sigmoid": inplace_sigmoid_derivative,
    "identity": inplace_identity_derivative,
    "step": inplace_zero_derivative,
    "sign": inplace_zero_derivative,
}


# -- output layer and loss, keyed by task --------------------------------------------------

OUTPUT_ACTIVATIONS: dict[str, Callable[[np.ndarray], None]] = {
    "multiclass": inplace_softmax,
    "binary": inplace_logistic,
    "regression": inplace_identity,
}


def _loss_bounds(dtype: np.dtype) -> tuple[float, float]:
    eps = float(np.finfo(dtype).eps)
    return -math.log1p(-eps), -math.log(eps)


#: Per-sample loss bounds of scikit-learn's clip of probabilities to [eps, 1 - eps].
LOSS_CLIP = {dtype: _loss_bounds(dtype) for dtype in EXP_FLOOR}


def _clip_losses(per_sample: np.ndarray) -> None:
    # np.clip's Python wrapper costs more than the two ufuncs on a few hundred values;
    # the result is the same (a NaN stays NaN).
    low, high = LOSS_CLIP[per_sample.dtype]
    np.maximum(per_sample, low, out=per_sample)
    np.minimum(per_sample, high, out=per_sample)


def _mean(x: np.ndarray, axis: int | tuple[int, ...]) -> np.ndarray:
    # x.mean(axis) without its Python bookkeeping: the same sum (np.add.reduce) and division.
    axes = axis if isinstance(axis, tuple) else (axis,)
    return np.add.reduce(x, axis=axis) / math.prod(x.shape[a] for a in axes)


def log_loss(Y: np.ndarray, Z: np.ndarray) -> np.ndarray:
    """Categorical cross-entropy of softmax(Z), mean over samples, from the logits.

    Parameters
    ----------
    Y : ndarray of shape (n_samples, n_classes)
        One-hot targets.
    Z : ndarray of shape (..., n_samples, n_classes)
        Output pre-activations (logits).

    Returns
    -------
    loss : ndarray of shape (...)
        ``mean_i -log softmax(z_i)[y_i]``, each term clipped as scikit-learn
        clips the probability to ``[eps, 1 - eps]``; a 0-d array for one network.
    """
    # -log softmax_y(z) = log sum_c exp(z_c - z_y): the sum is >= 1 (its y term is 1),
    # so no log 0, and an overflow to inf is a loss beyond the clip anyway.
    z_true = (Z * Y).sum(axis=-1, keepdims=True)  # Y is one-hot: picks z_y
    E = Z - z_true
    np.maximum(E, EXP_FLOOR[E.dtype], out=E)
    with np.errstate(over="ignore"):
        np.exp(E, out=E)
    per_sample = np.log(E.sum(axis=-1))
    _clip_losses(per_sample)
    return _mean(per_sample, -1)


def binary_log_loss(Y: np.ndarray, Z: np.ndarray) -> np.ndarray:
    """Binary cross-entropy of sigmoid(Z), mean over samples, from the logits.

    Parameters
    ----------
    Y : ndarray of shape (n_samples, 1)
        0/1 targets.
    Z : ndarray of shape (..., n_samples, 1)
        Output pre-activations (logits).
    """
    # -log p(y) = softplus(z) for y = 0, softplus(-z) for y = 1, exact in both tails
    s = Z * (1 - 2 * Y)
    np.maximum(s, EXP_FLOOR[s.dtype], out=s)
    with np.errstate(over="ignore"):
        np.exp(s, out=s)
    np.log1p(s, out=s)
    _clip_losses(s)
    return _mean(s, (-2, -1))


def squared_loss(Y: np.ndarray, Z: np.ndarray) -> np.ndarray:
    """Half the squared error, summed over outputs and averaged over samples.

    With one output (the engine's regression) this is scikit-learn's
    ``squared_error``, ``0.5 * mean((z - y)^2)``; summing over outputs keeps
    ``Z - Y`` the exact gradient when there are several.

    Parameters
    ----------
    Y : ndarray of shape (n_samples, n_outputs)
    Z : ndarray of shape (..., n_samples, n_outputs)
        Predictions (the output layer is the identity).
    """
    R = Z - Y
    R *= R
    return 0.5 * _mean(R.sum(axis=-1), -1)


def softmax_log_loss(Y: np.ndarray, Z: np.ndarray) -> np.ndarray:
    """``log_loss(Y, Z)``, and ``Z`` turned into ``softmax(Z)`` in place, sharing the work.

    ``-log softmax_y(z) = log sum_c exp(z_c - m) + m - z_y`` with ``m`` the row
    max, which softmax computes anyway.
    """
    z_true = (Z * Y).sum(axis=-1)
    shift = Z.max(axis=-1, keepdims=True)
    Z -= shift
    np.maximum(Z, EXP_FLOOR[Z.dtype], out=Z)
    np.exp(Z, out=Z)
    total = Z.sum(axis=-1, keepdims=True)
    Z /= total
    per_sample = np.log(total[..., 0])
    per_sample += shift[..., 0]
    per_sample -= z_true
    _clip_losses(per_sample)
    return _mean(per_sample, -1)


def _then_activate(task: str) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    loss, activate = LOSS_FUNCTIONS[task], OUTPUT_ACTIVATIONS[task]

    def loss_and_activate(Y: np.ndarray, Z: np.ndarray) -> np.ndarray:
        value = loss(Y, Z)
        activate(Z)
        return value

    return loss_and_activate


class BinaryLossAndOutput:
    """``LOSS_AND_OUTPUT["binary"]`` for one fixed target column, buffers allocated once.

    ``f(Z)`` returns ``binary_log_loss(Y, Z)`` (the same operations, so the same
    bits) and applies ``inplace_logistic`` to ``Z``; ``accuracy(P)`` is the share
    of rows where ``P > 0.5`` matches ``Y``. The caller silences overflow in
    ``exp`` (``np.errstate``), as the trainer's loop does.
    """

    def __init__(self, Y: np.ndarray) -> None:
        self.n = Y.shape[0]
        self._sign = 1 - 2 * Y
        self._s = np.empty_like(Y)
        self._hit = np.empty(Y.shape, dtype=bool)
        self._truth = Y == 1
        self._floor = EXP_FLOOR[Y.dtype]
        self._low, self._high = LOSS_CLIP[Y.dtype]

    def __call__(self, Z: np.ndarray) -> np.ndarray:
        s = self._s
        np.multiply(Z, self._sign, out=s)
        np.maximum(s, self._floor, out=s)
        np.exp(s, out=s)
        np.log1p(s, out=s)
        np.maximum(s, self._low, out=s)
        np.minimum(s, self._high, out=s)
        value = np.add.reduce(s, axis=(-2, -1)) / self.n
        inplace_logistic(Z)
        return value

    def stacked(self, Z: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """``__call__`` on two splits stacked in ``Z``: the losses of rows ``:n`` and ``n:``.

        Elementwise passes over both at once; each split's sum is its own reduction.
        """
        s = self._s
        np.multiply(Z, self._sign, out=s)
        np.maximum(s, self._floor, out=s)
        np.exp(s, out=s)
        np.log1p(s, out=s)
        np.maximum(s, self._low, out=s)
        np.minimum(s, self._high, out=s)
        first = np.add.reduce(s[:n], axis=(-2, -1)) / n
        rest = np.add.reduce(s[n:], axis=(-2, -1)) / (self.n - n)
        inplace_logistic(Z)
        return first, rest

    def stacked_accuracy(self, P: np.ndarray, n: int) -> tuple[float, float]:
        """``accuracy`` on two splits stacked in ``P``: rows ``:n`` and ``n:``."""
        hit = self._hit
        np.greater(P, 0.5, out=hit)
        np.equal(hit, self._truth, out=hit)
        return (
            int(np.count_nonzero(hit[:n])) / n,
            int(np.count_nonzero(hit[n:])) / (self.n - n),
        )

    def accuracy(self, P: np.ndarray) -> float:
        hit = self._hit
        np.greater(P, 0.5, out=hit)
        np.equal(hit, self._truth, out=hit)
        return int(np.count_nonzero(hit)) / self.n


LOSS_FUNCTIONS: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "multiclass": log_loss,
    "binary": binary_log_loss,
    "regression": squared_loss,
}

#: ``LOSS_FUNCTIONS[task](Y, Z)`` that also applies ``OUTPUT_ACTIVATIONS[task]`` to
#: ``Z`` in place (the backward pass needs both; multiclass shares the softmax's work).
LOSS_AND_OUTPUT: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "multiclass": softmax_log_loss,
    "binary": _then_activate("binary"),
    "regression": _then_activate("regression"),
}
