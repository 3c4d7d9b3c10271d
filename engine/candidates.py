"""K random-walk proposals, scored in one batched forward pass.

Only this module knows the layout, chosen for speed:

- Layer ``i`` of candidate ``k`` is stored transposed with its bias as an
  extra column, ``A_i[k] = [W_i; b_i]^T`` of shape ``(fan_out, fan_in + 1)``,
  and the ``K`` blocks of a layer are contiguous. Inputs carry a row of ones
  (``[X^T; 1]``), so a product includes the bias. Hidden layers get one more
  row, ``[0 ... 0 1]``, which makes the row of ones of the next layer's input
  come out of the product itself. So the first layer of a whole chunk of
  candidates is ONE matrix product ``(c (fan_out + 1), fan_in + 1) @
  (fan_in + 1, n)`` and deeper layers are one batched ``np.matmul``; no
  separate bias pass anywhere.
- Activations are feature-major, ``(chunk, units, n)``, so the loss reduces
  over the few output units as whole rows of ``n`` samples. Candidates pass
  through the layers a chunk at a time and through the loss ``LOSS_GROUP``
  chunks at a time (buffers sized to those, not to ``K``); only the best
  candidate's logits are kept. The views each chunk works on are made once
  (``_make_plan``), so an iteration is NumPy calls and little else.
- The loss is computed from the logits, with the conventions of
  ``LOSS_FUNCTIONS`` (probabilities clipped to ``[eps, 1 - eps]``, which is a
  clip of each sample's loss).
"""

from __future__ import annotations

import itertools
import math

import numpy as np

from engine.functions import EXP_FLOOR, KEEP_ONES, OUTPUT_ACTIVATIONS
from engine.network import Network

#: Candidates go through the layers a chunk at a time: enough of them that the first
#: layer's product has about ``CHUNK_ROWS`` rows (OpenBLAS then runs near its peak) ...
CHUNK_ROWS = 128
#: ... and few enough that their widest hidden activations (at most ``CHUNK_BYTES``) stay
#: in the CPU's L2 cache between the product, the activation and the next product.
CHUNK_BYTES = 2 << 20
#: The loss works on ``LOSS_GROUP`` chunks' logits at once (fewer NumPy calls).
LOSS_GROUP = 2


class Candidates:
    """Proposals ``theta + sigma * eps`` and their full-batch training losses.

    Parameters
    ----------
    net : Network
    X : ndarray of shape (n_samples, n_features)
    y : ndarray of shape (n_samples,)
        Class indices (classification) or targets (regression).
    K : int
        Number of candidates.
    """

    def __init__(self, net: Network, X: np.ndarray, y: np.ndarray, K: int) -> None:
        dt = net.dtype
        self.net = net
        self.K = K
        self.n = n = X.shape[0]
        units = net.units
        shapes = [(fan_out, fan_in + 1) for fan_in, fan_out in itertools.pairwise(units)]
        # One flat buffer (of even length, for the normal pairs): all the noise of an iteration.
        self.flat = np.empty(K * net.n_params + (K * net.n_params) % 2, dtype=dt)
        self._normal = NormalSource(self.flat.size, dt)
        self._noise: list[np.ndarray] = []
        offset = 0
        for rows, cols in shapes:
            self._noise.append(self.flat[offset : offset + K * rows * cols].reshape(K, rows, cols))
            offset += K * rows * cols
        self._base = [np.empty(shape, dtype=dt) for shape in shapes]
        self._unpacked: tuple[np.ndarray, list[np.ndarray], list[np.ndarray]] | None = None
        # the candidates' blocks; hidden layers have the extra row [0 ... 0 1]
        last = len(shapes) - 1
        self.blocks = []
        for i, (rows, cols) in enumerate(shapes):
            block = np.zeros((K, rows + (i < last), cols), dtype=dt)
            if i < last:
                block[:, rows, -1] = 1
            self.blocks.append(block)
        self.XT = np.ones((X.shape[1] + 1, n), dtype=dt)  # [X^T; 1]
        self.XT[:-1] = X.T
        # (On digits, 64-32-10, that is 4 candidates, measured about 5% faster per
        # candidate than 11 (the earlier 2 MB rule), 2, 6 or 8, in float32 and float64.)
        widest = max(units[1:-1], default=units[-1])
        self.chunk = max(
            1, min(K, -(-CHUNK_ROWS // (widest + 1)), CHUNK_BYTES // (widest * n * dt.itemsize))
        )
        self.hidden = [np.empty((self.chunk, u + 1, n), dtype=dt) for u in units[1:-1]]
        self._ones_kept = self.net.activation in KEEP_ONES
        # ReLU as ``maximum(h, zeros)`` with a zeros array of a candidate's shape: NumPy's
        # SIMD loop for two contiguous operands is about twice as fast as its loop for a
        # scalar operand (``maximum(h, 0)``), and the result is the same.
        self._relu_zeros = (
            [np.zeros((u + 1, n), dtype=dt) for u in units[1:-1]]
            if self.net.activation == "relu"
            else None
        )
        self.loss_chunk = min(K, self.chunk * LOSS_GROUP)
        self.Z = np.empty((self.loss_chunk, units[-1], n), dtype=dt)  # a loss chunk's logits
        self.best = -1  # index of the lowest loss of the last ``losses``
        self._best_logits = np.empty((units[-1], n), dtype=dt)
        self.task = net.task
        eps = float(np.finfo(dt).eps)
        self.clip = (-math.log1p(-eps), -math.log(eps))  # losses at p = 1 - eps and p = eps
        self.exp_floor = EXP_FLOOR[dt]
        self._per_sample = np.empty((self.loss_chunk, n), dtype=dt)
        self._sums = np.empty(self.loss_chunk, dtype=dt)  # a chunk's sums of per-sample losses
        self._activation = net.hidden_activation
        if self.task == "multiclass":
            self._true_index = y.astype(np.intp) * n + np.arange(n)  # into a (C n) row
            self._true = np.empty((self.loss_chunk, n), dtype=dt)
            self._exp = np.empty((self.loss_chunk, units[-1], n), dtype=dt)
            self._floor = np.full((units[-1], n), self.exp_floor, dtype=dt)  # as for ReLU
        elif self.task == "binary":
            self._sign = 1 - 2 * y.astype(dt)  # softplus(sign * z) is the loss
        else:
            self._target = y.astype(dt)
        self._plan = self._make_plan(K)

    def _views(self, theta: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """``net.unpack(theta)``, kept for the array the caller passes every time."""
        if self._unpacked is None or self._unpacked[0] is not theta:
            self._unpacked = (theta, *self.net.unpack(theta))
        return self._unpacked[1], self._unpacked[2]

    def _set_base(self, theta: np.ndarray) -> None:
        Ws, bs = self._views(theta)
        for base, W, b in zip(self._base, Ws, bs, strict=True):
            base[:, :-1] = W.T
            base[:, -1] = b

    def propose(
        self,
        theta: np.ndarray,
        sigma: float,
        rng: np.random.Generator,
        *,
        same_center: bool = False,
        quantize: float = 0.0,
    ) -> None:
        """Make the K candidates ``theta + sigma * eps``, ``eps ~ N(0, I)`` drawn from ``rng``.

        ``same_center``: ``theta`` holds the same values as at the last ``propose``
        (a rejected step), so its layout for the candidates is reused. ``quantize``:
        every candidate weight and bias is rounded to the nearest multiple of it.
        """
        self._normal.fill(rng, self.flat, sigma)
        if not same_center:
            self._set_base(theta)
        for block, noise, base in zip(self.blocks, self._noise, self._base, strict=True):
            params = block[:, : base.shape[0]]
            np.add(noise, base, out=params)
            if quantize:
                params *= 1.0 / quantize
                np.round(params, out=params)
                params *= quantize

    def set_first(self, theta: np.ndarray) -> None:
        """Make candidate 0 exactly ``theta`` (to score a single point with ``losses(1)``)."""
        self._set_base(theta)
        for block, base in zip(self.blocks, self._base, strict=True):
            block[0, : base.shape[0]] = base

    def take(self, k: int, theta: np.ndarray) -> None:
        """Copy candidate ``k`` into ``theta`` (the network's canonical layout)."""
        Ws, bs = self._views(theta)
        for block, W, b in zip(self.blocks, Ws, bs, strict=True):
            rows = W.shape[1]
            W[...] = block[k, :rows, :-1].T
            b[...] = block[k, :rows, -1]

    def best_logits(self) -> np.ndarray:
        """Output pre-activation of candidate ``self.best``: shape (n_outputs, n)."""
        return self._best_logits

    def losses(self, m: int | None = None) -> np.ndarray:
        """Full-batch training loss of the first ``m`` (default all) candidates, shape (m,).

        Also sets ``self.best``, the first index of the lowest loss (NaN counting as
        +inf), and keeps that candidate's logits for ``best_logits``.
        """
        m = self.K if m is None else m
        plan = self._plan if m == self.K else self._make_plan(m)
        out = np.empty(m, dtype=np.float64)
        best_loss = math.inf
        self.best = 0
        with np.errstate(over="ignore"):  # an overflow means a loss above the clip anyway
            for start, passes, Z, sums, loss_views in plan:
                for layers in passes:
                    self._forward(layers)
                self._loss_sums(Z, sums, *loss_views)
                chunk_losses = out[start : start + sums.shape[0]]
                np.divide(sums, self.n, out=chunk_losses)  # the mean, in the network's dtype
                k = int(chunk_losses.argmin())
                if math.isnan(chunk_losses[k]):  # argmin finds the first NaN; NaN counts as inf
                    chunk_losses[np.isnan(chunk_losses)] = math.inf
                    k = int(chunk_losses.argmin())
                if chunk_losses[k] < best_loss or start == 0:
                    best_loss = float(chunk_losses[k])
                    self.best = start + k
                    np.copyto(self._best_logits, Z[k])
        return out

    def _make_plan(self, m: int) -> list[tuple]:
        """Per chunk of the first ``m`` candidates, the views its pass works on."""
        plan = []
        n, last = self.n, len(self.blocks) - 1
        for start in range(0, m, self.loss_chunk):
            c = min(self.loss_chunk, m - start)
            passes = []
            for first in range(start, start + c, self.chunk):
                stop = min(first + self.chunk, start + c)
                f = stop - first
                layers = []
                a = self.XT
                for i, block in enumerate(self.blocks):
                    block = block[first:stop]
                    out = self.hidden[i][:f] if i < last else self.Z[first - start : stop - start]
                    if i == 0:  # the first layer of the whole chunk in one product
                        rows = block.shape[1]
                        layers.append(
                            (block.reshape(f * rows, -1), a, out.reshape(f * rows, n), out)
                        )
                    else:
                        layers.append((block, a, out, out))
                    a = out
                passes.append(layers)
            Z = self.Z[:c]
            sums = self._sums[:c]
            if self.task == "multiclass":
                loss_views = (
                    self._per_sample[:c],
                    Z.reshape(c, -1),
                    self._true[:c],
                    self._true[:c, None, :],
                    self._exp[:c],
                )
            else:
                loss_views = (self._per_sample[:c], Z[:, 0, :])
            plan.append((start, passes, Z, sums, loss_views))
        return plan

    def _forward(self, layers: list[tuple]) -> None:
        """Logits of one chunk's candidates (into the chunk buffer ``self.Z``)."""
        last = len(layers) - 1
        for i, (weights, inputs, product, out) in enumerate(layers):
            np.matmul(weights, inputs, out=product)
            if i < last:
                if self._relu_zeros is not None:
                    np.maximum(out, self._relu_zeros[i], out=out)
                else:
                    self._activation(out)
                if not self._ones_kept:
                    out[:, -1, :] = 1

    def _loss_sums(
        self, Z: np.ndarray, sums: np.ndarray, per_sample: np.ndarray, *views: np.ndarray
    ) -> None:
        """Sum over samples of each candidate's loss, from the logits ``Z``, into ``sums``."""
        if self.task == "regression":
            np.subtract(views[0], self._target, out=per_sample)
            np.square(per_sample, out=per_sample)
            per_sample *= 0.5
            np.add.reduce(per_sample, axis=1, out=sums)
            return
        if self.task == "multiclass":
            # -log softmax_y(z) = log sum_c exp(z_c - z_y): shifted by the true logit,
            # the sum is >= 1 (no underflow to log 0) and an overflow to inf is a loss
            # beyond the clip. (Logits soon span hundreds in a long run, so a shift per
            # sample is needed: exp(z_c) alone would overflow.)
            flat, true, true_b, E = views
            # (mode="clip": the indices are in range; the default mode buffers ``out``)
            np.take(flat, self._true_index, axis=1, out=true, mode="clip")
            np.subtract(Z, true_b, out=E)
            np.maximum(E, self._floor, out=E)  # subnormal results would be ~10x slower
            np.exp(E, out=E)
            np.add.reduce(E, axis=1, out=per_sample)
            np.log(per_sample, out=per_sample)
        else:  # binary: softplus(z) for class 0, softplus(-z) for class 1
            np.multiply(views[0], self._sign, out=per_sample)
            np.maximum(per_sample, self.exp_floor, out=per_sample)
            np.exp(per_sample, out=per_sample)
            np.log1p(per_sample, out=per_sample)
        # (the two ufuncs of ndarray.clip, without its Python wrapper)
        np.maximum(per_sample, self.clip[0], out=per_sample)
        np.minimum(per_sample, self.clip[1], out=per_sample)
        np.add.reduce(per_sample, axis=1, out=sums)

    def outputs(self, logits: np.ndarray) -> np.ndarray:
        """Output layer (probabilities or predictions) from ``logits``: shape (n, n_outputs)."""
        P = np.array(logits.T, order="C")
        OUTPUT_ACTIVATIONS[self.task](P)
        return P


#: ``NormalSource`` uses NumPy's own ziggurat below this many draws per fill (the
#: two methods took about as long at 1,024 draws on our machines).
ZIGGURAT_BELOW = 1024


class NormalSource:
    """Normal draws ``sigma * N(0, 1)`` by the Box-Muller transform, vectorized.

    NumPy's ``Generator.standard_normal`` (a ziggurat, one draw at a time) takes
    about 8-9 ns a draw on our machines; this takes 4-5, which matters because
    the random walk draws one normal per parameter per candidate. Below
    ``ZIGGURAT_BELOW`` draws per fill its dozen NumPy calls cost more than the
    draws themselves, and ``fill`` calls NumPy's ziggurat instead (exact; which
    method a run uses depends only on its config). Each pair is
    ``(r cos t, r sin t)`` with ``r = sigma sqrt(-2 ln u)``, ``u`` uniform on
    ``(0, 1]`` in float64 (so draws reach 8.5 standard deviations, the float64
    ziggurat's range), and ``t = 2 pi v``, ``v`` uniform in float32 with cos and
    sin in float32 (about 1e-7 relative error in each draw). All uniforms come
    from the run's generator, so draws are reproducible and resumable.

    Parameters
    ----------
    size : int
        Even number of draws per ``fill``.
    dtype : float32 or float64
        dtype of the output.
    """

    def __init__(self, size: int, dtype: np.dtype) -> None:
        if size % 2:
            raise ValueError(f"size must be even, got {size}")
        self.half = h = size // 2
        self.dtype = np.dtype(dtype)
        self.ziggurat = size < ZIGGURAT_BELOW
        if self.ziggurat:
            return
        self._radius = np.empty(h)  # float64
        self._radius_cast = np.empty(h, dtype=self.dtype) if self.dtype != np.float64 else None
        self._angle = np.empty(h, dtype=np.float32)
        self._trig = np.empty(2 * h, dtype=np.float32)

    def fill(self, rng: np.random.Generator, out: np.ndarray, sigma: float = 1.0) -> None:
        """Write ``size`` independent ``N(0, sigma^2)`` draws into ``out`` (1-D, ``size`` long)."""
        if self.ziggurat:
            rng.standard_normal(out=out, dtype=self.dtype)
            out *= sigma
            return
        h = self.half
        r, t, trig = self._radius, self._angle, self._trig
        rng.random(out=r)
        np.subtract(1.0, r, out=r)  # (0, 1]: the log is finite
        np.log(r, out=r)
        if self._radius_cast is not None:  # -2 sigma^2 ln u rounded once to the output dtype,
            r = np.multiply(r, -2.0 * sigma * sigma, out=self._radius_cast, casting="same_kind")
        else:
            r *= -2.0 * sigma * sigma
        np.sqrt(r, out=r)  # then its root in that dtype (float32 roots are 3x faster)
        rng.random(out=t, dtype=np.float32)
        t *= np.float32(2 * math.pi)
        np.cos(t, out=trig[:h])
        np.sin(t, out=trig[h:])
        np.multiply(trig[:h], r, out=out[:h])
        np.multiply(trig[h:], r, out=out[h:])
