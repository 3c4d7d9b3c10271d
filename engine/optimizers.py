"""Training methods behind one interface (after scikit-learn's ``_stochastic_optimizers.py``).

An ``Optimizer`` owns the current parameters of one network and advances them
one step at a time; the trainer never asks which method it drives. Both
minimize the full-batch training objective; backprop follows its gradient,
random walk proposes Gaussian steps.

The unit of ``evaluations`` is a pass over the training set: one backprop epoch
is one pass (whatever the batch size), one random-walk iteration with ``K``
candidates is ``K`` passes; ``passes_per_step`` says which.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any

import numpy as np

from engine.candidates import Candidates
from engine.functions import BinaryLossAndOutput
from engine.network import Backprop, Forward, Network, augment

#: Random walk with adapt_step: log(sigma) moves by this times (accepted - target)
#: after every iteration, so the acceptance rate settles near the target.
ADAPT_RATE = 0.05
#: Bounds on the adapted sigma, so it can neither vanish nor blow up.
SIGMA_MIN, SIGMA_MAX = 1e-8, 1e3


class Optimizer(ABC):
    """One training method over a network and its training set.

    Parameters
    ----------
    config : TrainConfig
    net : Network
    X : ndarray of shape (n_samples, n_features)
    Y : ndarray of shape (n_samples, n_outputs)
        Targets in the network's output layout (one-hot, 0/1 column, values).
    theta0 : ndarray of shape (n_params,)
        Initial parameters (copied).
    rng : numpy Generator
        The run's training stream; all the method's randomness comes from it.
    """

    #: Training-set passes one step costs (the unit of ``evaluations``).
    passes_per_step: int = 1

    def __init__(
        self,
        config,
        net: Network,
        X: np.ndarray,
        Y: np.ndarray,
        theta0: np.ndarray,
        rng: np.random.Generator,
    ) -> None:
        self.config = config
        self.net = net
        self.X = X
        self.Y = Y
        self.rng = rng
        self.theta = np.array(theta0, dtype=net.dtype, copy=True)
        #: True once a step hit a non-finite loss; ``theta`` is then the last finite point.
        self.diverged = False
        #: Changes whenever ``theta`` may have changed: equal versions, equal parameters
        #: (what is computed from them can be reused).
        self.version = 0

    @abstractmethod
    def start(self) -> None:
        """The initial evaluation of a fresh run (one training-set pass)."""

    @abstractmethod
    def step(self, t: int) -> dict[str, float | None]:
        """Run step ``t`` (0-based); return this method's metrics for the record."""

    @abstractmethod
    def train_eval(self) -> tuple[float, np.ndarray]:
        """(training objective, output layer on the training set) at ``theta``.

        The output array is a buffer, valid until the next call into the optimizer.
        """

    def revert(self) -> None:
        """Mark the run diverged: the trainer found the last step's training loss non-finite.

        Afterwards ``result_params`` are finite numbers.
        """
        self.diverged = True

    @property
    def result_params(self) -> np.ndarray:
        """The parameters a run returns (the current point unless the method says otherwise)."""
        return self.theta

    # -- checkpoint state --------------------------------------------------------------------

    def state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Arrays and JSON-able scalars that restore this optimizer exactly."""
        return (
            {"theta": self.theta},
            {"rng": self.rng.bit_generator.state, "diverged": self.diverged},
        )

    def load_state(self, arrays: dict[str, np.ndarray], scalars: dict[str, Any]) -> None:
        np.copyto(self.theta, arrays["theta"])
        self.rng.bit_generator.state = scalars["rng"]
        self.diverged = bool(scalars["diverged"])
        self.version += 1


class BackpropOptimizer(Optimizer):
    """Mini-batch gradient descent on the backpropagated gradient.

    Each epoch draws a permutation of the training set from ``rng`` (not in
    full-batch mode, where order cannot matter) and walks it in batches of
    ``batch_size``; every batch does ``v = momentum v - lr g; theta += v``
    (``theta -= lr g`` without momentum), where ``g`` includes the L2 term
    ``weight_decay * W / m`` (``lr g`` comes straight out of the backward
    pass). The learning rate of epoch ``t`` is ``learning_rate / (1 + lr_decay t)``.
    A non-finite batch loss or parameter makes the epoch end in divergence,
    with the parameters of its start.
    """

    def __init__(self, config, net, X, Y, theta0, rng) -> None:
        super().__init__(config, net, X, Y, theta0, rng)
        n = X.shape[0]
        self.batch = n if config.batch_size is None else min(config.batch_size, n)
        self.full_batch = self.batch == n
        self._X1 = augment(X)  # [X, 1]: the passes take their inputs so (see Forward)
        self.grad = np.zeros_like(self.theta)
        self.velocity = np.zeros_like(self.theta) if config.momentum else None
        self._start_of_step = np.empty_like(self.theta)
        self._bp = Backprop(net, self.theta, self.grad, self.batch, config.weight_decay)
        # Whole-training-set passes (train_eval); in full-batch mode the same
        # buffers as training, so a step can reuse the evaluation's forward pass.
        self._eval = self._bp if self.full_batch else Forward(net, self.theta, n)
        # (data loss, objective, probabilities) of the last train_eval at theta
        self._evaluated: tuple[float, float, np.ndarray] | None = None
        # The training set's loss and output activation (binary: buffers of its own).
        if net.task == "binary":
            self._loss_and_output = BinaryLossAndOutput(Y)
        else:
            self._loss_and_output = lambda P: net.loss_and_output(Y, P)
        self._zeros = np.zeros_like(self.theta)
        self._stacked: BinaryLossAndOutput | None = None  # share_validation
        #: (validation loss, training accuracy, validation accuracy) of ``train_eval(True)``
        self.val_scores: tuple[float, float, float] | None = None
        # sqrt in the parameters' dtype (math.sqrt is float64's, without a NumPy call)
        self._sqrt = math.sqrt if self.theta.dtype == np.float64 else _float_sqrt
        #: The sample order of the last epoch (None in full-batch mode).
        self.order: np.ndarray | None = None
        if not self.full_batch:
            # The shuffled epoch lives in these buffers; batches are fixed views of them.
            self._Xs = np.empty_like(self._X1)
            self._Ys = np.empty_like(Y)
            self._batches = [
                (self._Xs[s : s + self.batch], self._Ys[s : s + self.batch])
                for s in range(0, n, self.batch)
            ]

    def share_validation(self, X_val: np.ndarray, Y_val: np.ndarray) -> bool:
        """Score the validation split along with the training set (``train_eval(True)``).

        Full-batch binary runs only. The validation rows go below the training
        rows: one forward pass over both, whose first rows are the training
        pass the next backward pass reuses, and the loss, output activation and
        accuracy passes run once over both. Returns whether the optimizer does it.
        """
        if not self.full_batch or self.net.task != "binary":
            return False
        n, n_val = self.X.shape[0], X_val.shape[0]
        # The backward pass takes the first n rows of these buffers (acts(n) views).
        self._bp = Backprop(self.net, self.theta, self.grad, n + n_val, self.config.weight_decay)
        self._eval = self._bp
        self._X_both = augment(np.concatenate([self.X, X_val]))
        self._val_fwd = Forward(self.net, self.theta, n_val)  # the validation rows alone
        self._X_val = self._X_both[n:]
        self._stacked = BinaryLossAndOutput(np.concatenate([self.Y, Y_val]))
        self._Y_val = Y_val
        self._evaluated = None
        return True

    def last_scores(self) -> tuple[float, float, float, float] | None:
        """(objective, validation loss, training and validation accuracy) at ``theta``.

        From the last ``train_eval(True)`` if it was at the current parameters
        (no step or revert since), else None.
        """
        if self._evaluated is None or self.val_scores is None:
            return None
        return (self._evaluated[1], *self.val_scores)

    def start(self) -> None:
        self.train_eval()

    def train_eval(self, with_val: bool = False) -> tuple[float, np.ndarray]:
        """See ``Optimizer.train_eval``; with ``with_val`` (after ``share_validation``)
        ``val_scores`` then holds the validation split's scores at the same point."""
        n = self.X.shape[0]
        if with_val and self._stacked is not None:
            if self._evaluated is None:
                out = self._bp.forward(self._X_both)
                first, rest = self._stacked.stacked(out, n)
                data_loss = float(first)
                self._evaluated = (data_loss, data_loss + self._bp.l2_term(n), out[:n])
                self.val_scores = (float(rest), *self._stacked.stacked_accuracy(out, n))
            else:  # the training side is done already: the validation side alone
                P_val = self._val_fwd.forward(self._X_val)
                self._val_loss = BinaryLossAndOutput(self._Y_val)  # rare: allocated on demand
                val_loss = float(self._val_loss(P_val))
                train_acc = self._loss_and_output.accuracy(self._evaluated[2])
                self.val_scores = (val_loss, train_acc, self._val_loss.accuracy(P_val))
        elif self._evaluated is None:
            P = self._eval.forward(self._X1)
            data_loss = float(self._loss_and_output(P))
            self._evaluated = (data_loss, data_loss + self._bp.l2_term(n), P)
        return self._evaluated[1:]

    def step(self, t: int) -> dict[str, float | None]:
        cfg = self.config
        lr = cfg.learning_rate / (1.0 + cfg.lr_decay * t)
        theta, grad, velocity, momentum = self.theta, self.grad, self.velocity, cfg.momentum
        np.copyto(self._start_of_step, theta)
        self.version += 1
        reuse = self._evaluated[0] if self.full_batch and self._evaluated is not None else None
        self._evaluated = None
        self.val_scores = None
        grad_norm = None
        if self.full_batch:
            loss = self._bp.backprop(self._X1, self.Y, reuse, lr)[0]  # grad = lr * dE/dtheta
            finite = math.isfinite(loss)
            if finite:
                grad_norm = self._sqrt(np.dot(grad, grad)) / lr
                _update(theta, grad, velocity, momentum)
        else:
            order = self.rng.permutation(self.X.shape[0])
            self.order = order
            np.take(self._X1, order, axis=0, out=self._Xs, mode="clip")
            np.take(self.Y, order, axis=0, out=self._Ys, mode="clip")
            # A batch whose loss is not finite ends the epoch in divergence. The batch
            # losses themselves are never reported, so gradient() spares them and the
            # loop goes on: its answer (or a NaN it leaves in the parameters, which then
            # stay NaN) is checked once at the end, with the same outcome: the
            # parameters of the epoch's start and a diverged run.
            finite = True
            gradient = self._bp.gradient
            for xb, yb in self._batches:
                if not gradient(xb, yb, lr):  # grad = lr * dE/dtheta
                    finite = False
                _update(theta, grad, velocity, momentum)
            grad_norm = self._sqrt(np.dot(grad, grad)) / lr  # at the last batch
        # theta . 0 is 0 when every entry is finite, NaN otherwise: one call for isfinite().all()
        if not finite or not math.isfinite(np.dot(theta, self._zeros)):
            self.diverged = True
            np.copyto(theta, self._start_of_step)
            if velocity is not None:
                velocity[...] = 0.0  # never used again; keeps the state finite
            grad_norm = None
        return {"grad_norm": grad_norm, "learning_rate": lr}

    def revert(self) -> None:
        """Go back to the parameters at the start of the last step."""
        super().revert()
        np.copyto(self.theta, self._start_of_step)
        self.version += 1
        self._evaluated = None
        self.val_scores = None

    def state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        arrays, scalars = super().state()
        if self.velocity is not None:
            arrays["velocity"] = self.velocity
        return arrays, scalars

    def load_state(self, arrays: dict[str, np.ndarray], scalars: dict[str, Any]) -> None:
        super().load_state(arrays, scalars)
        if self.velocity is not None:
            np.copyto(self.velocity, arrays["velocity"])
        self._evaluated = None


class RandomWalkOptimizer(Optimizer):
    """Random walk with a Metropolis acceptance test on the full-batch training loss.

    Each iteration ``t`` draws ``K = candidates`` proposals
    ``theta + sigma eps`` (``eps ~ N(0, I)`` over all weights and biases),
    scores them in ONE batched forward pass, and submits the best to the
    test: accepted if its loss is lower than the current one, else with
    probability ``exp(-delta / T_t)``, ``T_t = temperature * cooling^t`` (so
    ``T = 0`` is pure descent). Proposals with a non-finite loss are rejected.
    With ``adapt_step``, ``log sigma += ADAPT_RATE (accepted - target_acceptance)``.
    The best point seen is kept and is what the run returns.
    ``acceptance_rate`` is accepted iterations / iterations.
    """

    def __init__(self, config, net, X, Y, theta0, rng) -> None:
        super().__init__(config, net, X, Y, theta0, rng)
        K = config.candidates
        self.passes_per_step = K
        self.sigma = float(config.step_size)
        self.loss = math.inf  # training loss at theta
        self.best = self.theta.copy()
        self.best_loss = math.inf
        self.accepted = 0
        self.proposed = 0
        y = Y.argmax(axis=1) if net.task == "multiclass" else Y[:, 0]
        self._cands = Candidates(net, X, y, K)
        self._logits = np.empty((net.units[-1], X.shape[0]), dtype=net.dtype)  # at theta
        self._outputs: tuple[int, np.ndarray] | None = None  # (version, output layer at theta)
        self._proposed = -1  # version of theta at the last proposal

    @property
    def result_params(self) -> np.ndarray:
        return self.best

    def start(self) -> None:
        self._cands.set_first(self.theta)
        self.loss = _finite_or_inf(float(self._cands.losses(1)[0]))
        np.copyto(self._logits, self._cands.best_logits())
        self.best_loss = self.loss
        np.copyto(self.best, self.theta)

    def train_eval(self) -> tuple[float, np.ndarray]:
        if self._outputs is None or self._outputs[0] != self.version:
            self._outputs = (self.version, self._cands.outputs(self._logits))
        return self.loss, self._outputs[1]

    def step(self, t: int) -> dict[str, float | None]:
        cfg = self.config
        sigma = self.sigma
        temperature = cfg.temperature * cfg.cooling**t
        cands = self._cands
        cands.propose(
            self.theta,
            sigma,
            self.rng,
            same_center=self._proposed == self.version,
            quantize=cfg.quantize or 0.0,
        )
        self._proposed = self.version
        losses = cands.losses()
        k = cands.best  # the lowest loss (NaN counts as +inf)
        new_loss = _finite_or_inf(float(losses[k]))
        delta = new_loss - self.loss
        u = self.rng.random()  # drawn every iteration, used only when T > 0
        accept = delta < 0 or (temperature > 0 and u < math.exp(-delta / temperature))
        self.proposed += 1
        if accept:
            self.accepted += 1
            self.version += 1
            cands.take(k, self.theta)
            np.copyto(self._logits, cands.best_logits())
            self.loss = new_loss
            if new_loss < self.best_loss:
                self.best_loss = new_loss
                np.copyto(self.best, self.theta)
        if not math.isfinite(self.loss):
            self.diverged = True  # only possible when the initial loss is not finite
        if cfg.adapt_step:
            self.sigma = min(
                max(sigma * math.exp(ADAPT_RATE * (accept - cfg.target_acceptance)), SIGMA_MIN),
                SIGMA_MAX,
            )
        return {
            "step_size": sigma,
            "temperature": temperature,
            "acceptance_rate": self.accepted / self.proposed,
        }

    def state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        arrays, scalars = super().state()
        arrays.update(best=self.best, logits=self._logits)
        scalars.update(
            sigma=self.sigma,
            loss=self.loss,
            best_loss=self.best_loss,
            accepted=self.accepted,
            proposed=self.proposed,
        )
        return arrays, scalars

    def load_state(self, arrays: dict[str, np.ndarray], scalars: dict[str, Any]) -> None:
        super().load_state(arrays, scalars)
        np.copyto(self.best, arrays["best"])
        np.copyto(self._logits, arrays["logits"])
        self.sigma = float(scalars["sigma"])
        self.loss = float(scalars["loss"])
        self.best_loss = float(scalars["best_loss"])
        self.accepted = int(scalars["accepted"])
        self.proposed = int(scalars["proposed"])


def _update(
    theta: np.ndarray, grad: np.ndarray, velocity: np.ndarray | None, momentum: float
) -> None:
    """scikit-learn's SGD update: v = momentum v - lr g; theta += v (grad holds lr g)."""
    if velocity is None:
        theta -= grad
    else:
        velocity *= momentum
        velocity -= grad
        theta += velocity


def _float_sqrt(x: np.floating) -> float:
    return float(np.sqrt(x))


def _finite_or_inf(x: float) -> float:
    return x if math.isfinite(x) else math.inf


OPTIMIZER_CLASSES: dict[str, type[Optimizer]] = {
    "backprop": BackpropOptimizer,
    "random_walk": RandomWalkOptimizer,
}
