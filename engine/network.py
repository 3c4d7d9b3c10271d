"""The multilayer perceptron: parameter layout, initialization, forward and backward pass.

All weights and biases of a network live in ONE flat vector ``theta`` of
``n_params`` values, laid out layer by layer as ``W0, b0, W1, b1, ...``;
``W_i`` (shape ``(fan_in, fan_out)``) and ``b_i`` (``(fan_out,)``) are views
into it. One flat vector makes an optimizer step, a random-walk proposal, a
gradient norm or a checkpoint a single array operation. ``K`` stacked networks
are a ``(K, n_params)`` array whose views are ``(K, fan_in, fan_out)`` and
``(K, 1, fan_out)``, so one batched matmul evaluates all of them.

The forward and backward passes follow scikit-learn's MLP
(``_multilayer_perceptron.py``) step for step, into buffers allocated once;
``Forward`` and ``Backprop`` fold each layer's bias into its matrix product
(``[a, 1] @ [W; b]``), one NumPy call a layer instead of two.
"""

from __future__ import annotations

import math

import numpy as np

from engine.functions import (
    ACTIVATIONS,
    DERIVATIVES,
    KEEP_ONES,
    LOSS_AND_OUTPUT,
    LOSS_FUNCTIONS,
    OUTPUT_ACTIVATIONS,
    Softmax,
)

#: Initialization chosen by "auto" for each activation.
AUTO_INIT = {
    "relu": "he",
    "leaky_relu": "he",
    "tanh": "xavier",
    "sigmoid": "xavier",
    "identity": "xavier",
    # Symmetric around 0 like tanh, which they are the hard-threshold limits of.
    "step": "xavier",
    "sign": "xavier",
}


class Network:
    """Layer sizes, activations and the layout of the flat parameter vector.

    Parameters
    ----------
    units : sequence of int
        ``[n_features, *hidden, n_outputs]``.
    activation : str
        Hidden-layer activation, a key of ``ACTIVATIONS``.
    task : str
        "multiclass", "binary" or "regression": picks the output activation
        and the loss.
    dtype : numpy dtype
        float32 or float64.
    """

    def __init__(self, units: list[int], activation: str, task: str, dtype: np.dtype) -> None:
        self.units = [int(u) for u in units]
        self.n_layers = len(self.units) - 1  # weight layers
        self.activation = activation
        self.task = task
        self.dtype = np.dtype(dtype)
        self.hidden_activation = ACTIVATIONS[activation]
        self.derivative = DERIVATIVES[activation]
        self.output_activation = OUTPUT_ACTIVATIONS[task]
        self.loss_function = LOSS_FUNCTIONS[task]
        self.loss_and_output = LOSS_AND_OUTPUT[task]
        # (start, stop) of W_i and of b_i in theta
        self.w_spans: list[tuple[int, int]] = []
        self.b_spans: list[tuple[int, int]] = []
        offset = 0
        for fan_in, fan_out in zip(self.units[:-1], self.units[1:], strict=True):
            self.w_spans.append((offset, offset + fan_in * fan_out))
            offset += fan_in * fan_out
            self.b_spans.append((offset, offset + fan_out))
            offset += fan_out
        self.n_params = offset

    # -- layout ------------------------------------------------------------------------------

    def unpack(self, theta: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Views of the weights and biases in ``theta``.

        ``theta`` of shape ``(n_params,)`` gives ``W_i (fan_in, fan_out)`` and
        ``b_i (fan_out,)``; of shape ``(K, n_params)`` it gives
        ``W_i (K, fan_in, fan_out)`` and ``b_i (K, 1, fan_out)``.
        """
        lead = theta.shape[:-1]
        Ws, bs = [], []
        for (w0, w1), (b0, b1), fan_in, fan_out in zip(
            self.w_spans, self.b_spans, self.units[:-1], self.units[1:], strict=True
        ):
            Ws.append(theta[..., w0:w1].reshape(*lead, fan_in, fan_out))
            bs.append(theta[..., b0:b1].reshape(*lead, 1, fan_out) if lead else theta[b0:b1])
        return Ws, bs

    def unpack_augmented(self, theta: np.ndarray) -> list[np.ndarray]:
        """Views ``[W_i; b_i]`` of shape ``(..., fan_in + 1, fan_out)`` into ``theta``.

        The layout puts each layer's bias right after its weights, so a layer's
        weights and bias are one block: the bias is its last row.
        """
        lead = theta.shape[:-1]
        return [
            theta[..., w0:b1].reshape(*lead, fan_in + 1, fan_out)
            for (w0, _), (_, b1), fan_in, fan_out in zip(
                self.w_spans, self.b_spans, self.units[:-1], self.units[1:], strict=True
            )
        ]

    def weight_mask(self) -> np.ndarray:
        """Boolean ``(n_params,)``, True on weights, False on biases."""
        mask = np.zeros(self.n_params, dtype=bool)
        for w0, w1 in self.w_spans:
            mask[w0:w1] = True
        return mask

    def init_params(self, rng: np.random.Generator, init: str = "auto") -> np.ndarray:
        """Initial ``theta``: weights by He or Xavier/Glorot, biases zero.

        He: ``N(0, 2 / fan_in)``. Xavier/Glorot: uniform on
        ``+-sqrt(6 / (fan_in + fan_out))``. ``init="auto"`` picks He for
        relu and leaky_relu, Xavier otherwise. Draws are float64 and then cast,
        so float32 and float64 runs with one seed start from the same point.
        """
        scheme = AUTO_INIT[self.activation] if init == "auto" else init
        theta = np.zeros(self.n_params)
        Ws, _ = self.unpack(theta)
        for W in Ws:
            fan_in, fan_out = W.shape
            if scheme == "he":
                W[...] = rng.standard_normal((fan_in, fan_out)) * math.sqrt(2.0 / fan_in)
            elif scheme == "xavier":
                bound = math.sqrt(6.0 / (fan_in + fan_out))
                W[...] = rng.uniform(-bound, bound, (fan_in, fan_out))
            else:
                raise ValueError(f"init: must be auto, he or xavier, got {init!r}")
        return theta.astype(self.dtype)

    # -- passes ------------------------------------------------------------------------------

    def forward(
        self, Ws: list[np.ndarray], bs: list[np.ndarray], X: np.ndarray, acts: list[np.ndarray]
    ) -> np.ndarray:
        """Forward pass into the buffers ``acts``; returns the output pre-activation (logits).

        The output activation is not applied: the loss is computed from the
        logits (``LOSS_FUNCTIONS``); ``self.output_activation`` turns them into
        probabilities in place.

        Parameters
        ----------
        Ws, bs : from ``unpack`` (single or stacked networks)
        X : ndarray of shape (n_samples, n_features)
        acts : list of ndarray, one per weight layer, of shape
            ``(..., n_samples, units[i + 1])``; overwritten with each layer's output.
        """
        a = X
        last = self.n_layers - 1
        for i in range(self.n_layers):
            z = acts[i]
            np.matmul(a, Ws[i], out=z)
            z += bs[i]
            if i < last:
                self.hidden_activation(z)
            a = z
        return a

    def predict(self, theta: np.ndarray, X: np.ndarray) -> np.ndarray:
        """Output layer for ``X`` (probabilities or regression values), freshly allocated."""
        Ws, bs = self.unpack(theta)
        lead = theta.shape[:-1]
        acts = [np.empty((*lead, X.shape[0], u), dtype=self.dtype) for u in self.units[1:]]
        out = self.forward(Ws, bs, X, acts)
        self.output_activation(out)
        return out

    def logits(self, theta: np.ndarray, X: np.ndarray) -> np.ndarray:
        """Output pre-activation for ``X``, freshly allocated."""
        Ws, bs = self.unpack(theta)
        lead = theta.shape[:-1]
        acts = [np.empty((*lead, X.shape[0], u), dtype=self.dtype) for u in self.units[1:]]
        return self.forward(Ws, bs, X, acts)

    def loss(self, theta: np.ndarray, X: np.ndarray, Y: np.ndarray, alpha: float = 0.0) -> float:
        """Mean loss of ``theta`` on ``(X, Y)`` plus the L2 term ``alpha/(2n) sum W^2``."""
        value = float(self.loss_function(Y, self.logits(theta, X)))
        if alpha:
            Ws, _ = self.unpack(theta)
            value += 0.5 * alpha * sum(float(np.dot(W.ravel(), W.ravel())) for W in Ws) / len(X)
        return value


class Forward:
    """Forward passes of one network through buffers allocated once.

    The biases ride in the matrix products: layer ``i`` multiplies its input
    with a column of ones appended, ``[a, 1]``, by ``[W_i; b_i]`` (the
    ``(fan_in + 1, fan_out)`` block that ``W_i`` and ``b_i`` already form in
    ``theta``), so a layer is one product and no separate bias pass. Hidden
    layers' buffers carry that column of ones for the next layer.

    Parameters
    ----------
    net : Network
    theta : ndarray of shape (n_params,) or (K, n_params)
        The parameters, read through views (never copied): updating ``theta``
        in place is seen by the next pass.
    capacity : int
        Largest number of samples that will be passed.
    """

    def __init__(self, net: Network, theta: np.ndarray, capacity: int) -> None:
        self.net = net
        self.Ws, self.bs = net.unpack(theta)
        self.As = net.unpack_augmented(theta)
        lead = theta.shape[:-1]
        last = net.n_layers - 1
        self._acts = []
        for i, u in enumerate(net.units[1:]):
            buf = np.empty((*lead, capacity, u + (i < last)), dtype=net.dtype)
            if i < last:
                buf[..., -1] = 1
            self._acts.append(buf)
        self._ones_kept = net.activation in KEEP_ONES
        self._inputs: np.ndarray | None = None  # [X, 1] for callers that pass X
        self._views: dict[int, list[np.ndarray]] = {}
        # Per batch size: (A_i, where layer i's product goes, the layer's buffer or None
        # for the output layer) -- the views a pass needs, made once.
        self._layers: dict[int, list[tuple[np.ndarray, np.ndarray, np.ndarray | None]]] = {}

    def acts(self, m: int) -> list[np.ndarray]:
        """The activation buffers for ``m`` samples (cached views; hidden ones with the ones)."""
        views = self._views.get(m)
        if views is None:
            views = [a[..., :m, :] for a in self._acts]
            self._views[m] = views
        return views

    def _layer_views(self, m: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
        layers = self._layers.get(m)
        if layers is None:
            acts = self.acts(m)
            last = len(acts) - 1
            layers = [
                (A, z, None) if i == last else (A, z[..., :-1], z)
                for i, (A, z) in enumerate(zip(self.As, acts, strict=True))
            ]
            self._layers[m] = layers
        return layers

    def inputs(self, X: np.ndarray) -> np.ndarray:
        """``[X, 1]``: ``X`` itself when it has the column of ones already (``augment``)."""
        if X.shape[-1] == self.net.units[0] + 1:
            return X
        m = X.shape[0]
        if self._inputs is None or self._inputs.shape[0] < m:
            self._inputs = augment(np.empty((m, X.shape[1]), dtype=self.net.dtype))
        X1 = self._inputs[:m]
        X1[:, :-1] = X
        return X1

    def forward(self, X: np.ndarray) -> np.ndarray:
        """Output logits for ``X`` (at most ``capacity`` rows), in the internal buffer.

        ``X`` is ``(n_samples, n_features)``, or ``augment(X)`` (no copy then).
        Returns an array of shape ``(..., n_samples, n_outputs)`` valid until the next pass.
        """
        a = self.inputs(X)
        activation = self.net.hidden_activation
        for A, out, z in self._layer_views(a.shape[-2]):
            np.matmul(a, A, out=out)
            if z is None:  # the output layer
                return out
            activation(z)  # the whole buffer: one contiguous pass
            if not self._ones_kept:
                z[..., -1] = 1
            a = z
        raise AssertionError("a network has at least one layer")  # pragma: no cover


def augment(X: np.ndarray) -> np.ndarray:
    """``[X, 1]``: a new C-contiguous array with a column of ones after ``X``'s columns."""
    X1 = np.ones((*X.shape[:-1], X.shape[-1] + 1), dtype=X.dtype)
    X1[..., :-1] = X
    return X1


class Backprop(Forward):
    """Forward pass, loss and backward pass for one network, into buffers allocated once.

    As ``Forward``, every layer's weights and bias are one block, so the
    gradient of a layer, ``[a, 1]^T delta``, is one product too.

    Parameters
    ----------
    net : Network
    theta : ndarray of shape (n_params,)
        The parameters; read through views, never copied.
    grad : ndarray of shape (n_params,)
        Receives the gradient (same layout as ``theta``).
    capacity : int
        Largest batch that will be passed.
    alpha : float
        L2 penalty (scikit-learn's convention).
    """

    def __init__(
        self, net: Network, theta: np.ndarray, grad: np.ndarray, capacity: int, alpha: float = 0.0
    ) -> None:
        super().__init__(net, theta, capacity)
        self.alpha = float(alpha)
        self.gWs, self.gbs = net.unpack(grad)
        self.gAs = net.unpack_augmented(grad)
        self.grad = grad
        # Errors at the hidden layers, one column wider than the layer (it is never read:
        # the product that makes it is the next one's shape, and cheaper uncut).
        self._deltas = [np.empty((capacity, u + 1), dtype=net.dtype) for u in net.units[1:-1]]
        self._delta_views: dict[int, list[np.ndarray]] = {}
        # Per batch size: the backward pass's views, output layer first (see _backward).
        self._back: dict[int, list[tuple]] = {}
        # gradient(): the output activation alone, and what stands for the loss's check
        self._output = OUTPUT_ACTIVATIONS[net.task]
        if net.task == "multiclass":
            self._softmax = Softmax(capacity, net.dtype)
            self._products = np.empty((capacity, net.units[-1]), dtype=net.dtype)

    def deltas(self, m: int) -> list[np.ndarray]:
        views = self._delta_views.get(m)
        if views is None:
            views = [d[:m] for d in self._deltas]
            self._delta_views[m] = views
        return views

    def l2_term(self, n: int) -> float:
        """``alpha / (2 n) * sum of squared weights`` (0 without weight decay)."""
        if not self.alpha:
            return 0.0
        return 0.5 * self.alpha * sum(float(np.dot(W.ravel(), W.ravel())) for W in self.Ws) / n

    def backprop(
        self, X: np.ndarray, Y: np.ndarray, forward_done: float | None = None, scale: float = 1.0
    ) -> tuple[float, list[np.ndarray], list[np.ndarray]]:
        """Loss and gradients of the mean loss (+ L2 term) on a batch.

        Parameters
        ----------
        X : ndarray of shape (n_samples, n_features), or ``augment(X)``
        Y : ndarray of shape (n_samples, n_outputs)
            One-hot classes, 0/1 column, or regression targets.
        forward_done : float, optional
            The mean loss of the last ``forward`` on this very ``X`` with the
            current parameters, after which the output activation was applied
            to its buffer in place: the pass is reused instead of recomputed.
        scale : float
            Return ``scale`` times the gradients (an optimizer passes its
            learning rate, which saves a pass over the parameters).

        Returns
        -------
        loss : float
            Mean loss plus the L2 term, before the update.
        weight_grads : list of ndarray, ``scale * dE/dW_i`` (views into ``grad``)
        bias_grads : list of ndarray, ``scale * dE/db_i`` (views into ``grad``)
        """
        net = self.net
        X1 = self.inputs(X)
        m = X1.shape[0]
        if forward_done is None:
            P = self.forward(X1)
            loss = float(net.loss_and_output(Y, P))
        else:
            P, loss = self.acts(m)[-1], forward_done
        if self.alpha:
            loss += self.l2_term(m)
        self._backward(X1, P, Y, m, scale)
        return loss, self.gWs, self.gbs

    def gradient(self, X1: np.ndarray, Y: np.ndarray, scale: float = 1.0) -> bool:
        """``backprop(X1, Y, None, scale)``'s gradients, into ``grad``, without its loss.

        The same operations make the same gradient bits; of the loss only what tells
        whether it is finite is computed, and for a log loss not even that (see below).

        Parameters
        ----------
        X1 : ndarray of shape (n_samples, n_features + 1), ``augment(X)``
        Y : ndarray of shape (n_samples, n_outputs)

        Returns
        -------
        bool
            False only if ``backprop``'s loss would not be finite. True with such a
            loss only when ``grad`` holds a NaN (and so do parameters updated by it).
        """
        P = self.forward(X1)
        m = X1.shape[0]
        task = self.net.task
        if task == "multiclass":
            # softmax_log_loss's clipped per-sample loss is NaN, and the loss not finite,
            # exactly when a row's softmax is NaN (a NaN or +inf logit, or all -inf: then
            # the output layer's bias gradient, a sum of that row and others, is NaN) or
            # its z_y = sum(z * y) is (a NaN logit, or a non-finite logit off the true
            # class): a NaN among the products z * y, which min-reduce propagates.
            products = self._products[:m]
            np.multiply(P, Y, out=products)
            finite = not math.isnan(np.minimum.reduce(products, axis=None))
            self._softmax(P)
        else:
            # binary_log_loss is finite unless a logit is NaN, and then so is P and the
            # gradient. The squared error has no such shortcut: it is computed.
            finite = task == "binary" or math.isfinite(self.net.loss_function(Y, P))
            self._output(P)
        if self.alpha:
            finite = finite and math.isfinite(self.l2_term(m))
        self._backward(X1, P, Y, m, scale)
        return finite

    def _backward(self, X1: np.ndarray, P: np.ndarray, Y: np.ndarray, m: int, scale: float) -> None:
        """Backward pass from the output activations ``P`` (overwritten) of ``X1``."""
        # Softmax/CE, sigmoid/BCE and identity/squared error are canonical pairs:
        # dE/dz at the output is (P - Y) / m. The factor scale / m goes in here, on
        # m x n_outputs values, instead of on every gradient entry at the end.
        delta = P
        np.subtract(delta, Y, out=delta)
        np.multiply(delta, scale / m, out=delta)
        alpha = self.alpha
        derivative = self.net.derivative
        layers = self._back.get(m)
        if layers is None:
            layers = self._back_views(m)
        for i, gA, a_prev, A_T, d, below in layers:
            if a_prev is None:  # the first layer: its input is X1, with its column of ones
                np.matmul(X1.T, delta, out=gA)  # [dE/dW_0; dE/db_0] in one product
            else:
                np.matmul(a_prev.T, delta, out=gA)  # [dE/dW_i; dE/db_i] in one product
            if alpha:
                self.gWs[i] += (alpha * scale / m) * self.Ws[i]
            if d is not None:
                if A_T.shape[0] == 1:
                    # One unit above: an outer product, exactly (one product per entry)
                    # and without the cost of a BLAS call on a rank-1 problem.
                    np.multiply(delta, A_T, out=d)
                else:
                    np.matmul(delta, A_T, out=d)
                derivative(a_prev, d)
                delta = below

    def _back_views(self, m: int) -> list[tuple]:
        """(i, gradient block, layer input or None for X1, A_i^T, error buffer, its cut)."""
        acts, deltas = self.acts(m), self.deltas(m)
        layers = []
        for i in range(self.net.n_layers - 1, -1, -1):
            if i:
                d = deltas[i - 1]
                layers.append((i, self.gAs[i], acts[i - 1], self.As[i].T, d, d[:, :-1]))
            else:
                layers.append((i, self.gAs[i], None, None, None, None))
        self._back[m] = layers
        return layers
