"""Random-walk candidates: the batched pass scores exactly what the plain network scores."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine import ACTIVATIONS
from engine.candidates import ZIGGURAT_BELOW, Candidates, NormalSource
from engine.network import Network

N_OUT = {"multiclass": 4, "binary": 1, "regression": 1}


def _setup(task, hidden, activation, dtype=np.float64, n=50, seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    net = Network([3, *hidden, N_OUT[task]], activation, task, np.dtype(dtype))
    X = rng.normal(size=(n, 3)).astype(dtype)
    if task == "multiclass":
        y = rng.integers(0, 4, n)
        Y = np.eye(4, dtype=dtype)[y]
    elif task == "binary":
        y = rng.integers(0, 2, n)
        Y = y[:, None].astype(dtype)
    else:
        y = rng.normal(size=n).astype(dtype)
        Y = y[:, None]
    theta = (net.init_params(rng, "xavier") * scale).astype(dtype)
    return net, X, y, Y, theta, rng


@pytest.mark.parametrize("task", ["multiclass", "binary", "regression"])
@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("hidden", [(), (5,), (6, 3)], ids=["none", "one", "two"])
def test_batched_losses_equal_the_networks_loss(task, activation, hidden) -> None:
    net, X, y, Y, theta, rng = _setup(task, hidden, activation)
    cands = Candidates(net, X, y, K=5)
    cands.propose(theta, 0.3, rng)
    losses = cands.losses()
    assert losses.shape == (5,)
    for k in range(5):
        point = np.empty_like(theta)
        cands.take(k, point)
        assert losses[k] == pytest.approx(net.loss(point, X, Y), rel=1e-12, abs=1e-15)
    # the best candidate is known, with its logits, which give the network's outputs
    assert cands.best == int(np.argmin(losses))
    cands.take(cands.best, point)
    np.testing.assert_allclose(
        cands.outputs(cands.best_logits()), net.predict(point, X), rtol=1e-10, atol=1e-14
    )


@pytest.mark.parametrize("task", ["multiclass", "binary"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_huge_logits_give_the_clipped_loss_without_overflow_trouble(task, dtype) -> None:
    # weights scaled by 1e3: logits in the thousands, far beyond exp's range
    net, X, y, Y, theta, rng = _setup(task, (8,), "relu", dtype, scale=1e3)
    cands = Candidates(net, X, y, K=3)
    cands.propose(theta, 1.0, rng)
    with np.errstate(all="raise"):  # no warnings leak from the batched pass
        losses = cands.losses()
    assert np.isfinite(losses).all()
    for k in range(3):
        point = np.empty_like(theta)
        cands.take(k, point)
        with np.errstate(all="raise"):
            expected = net.loss(point, X, Y)
        assert losses[k] == pytest.approx(expected, rel=1e-5 if dtype == np.float32 else 1e-12)


def test_set_first_scores_one_point() -> None:
    net, X, y, Y, theta, _ = _setup("multiclass", (7,), "tanh")
    cands = Candidates(net, X, y, K=4)
    cands.set_first(theta)
    assert cands.losses(1)[0] == pytest.approx(net.loss(theta, X, Y), rel=1e-12)


def test_proposals_are_theta_plus_sigma_times_standard_normal_noise() -> None:
    net, X, y, _, theta, rng = _setup("regression", (40,), "relu", n=10)
    cands = Candidates(net, X, y, K=200)
    cands.propose(theta, 0.1, rng)
    eps = np.empty((200, theta.size))
    for k in range(200):
        cands.take(k, eps[k])
    eps = (eps - theta) / 0.1
    assert abs(eps.mean()) < 0.01 and abs(eps.std() - 1) < 0.01
    # every parameter, weights and biases alike, moves
    assert (eps.std(axis=0) > 0.5).all()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_normal_source_draws_standard_normals(dtype) -> None:
    source = NormalSource(200_000, dtype)
    assert not source.ziggurat
    out = np.empty(200_000, dtype=dtype)
    source.fill(np.random.default_rng(1), out, sigma=2.0)
    assert out.dtype == dtype
    z = out.astype(np.float64) / 2.0
    # pairs (r cos t, r sin t) are independent: the two halves are uncorrelated
    assert abs(np.corrcoef(z[:100_000], z[100_000:])[0, 1]) < 0.01
    assert abs(z.mean()) < 0.01 and abs(z.var() - 1) < 0.01
    assert abs(np.mean(z**4) - 3) < 0.05  # kurtosis of a normal
    # Kolmogorov-Smirnov distance to the normal CDF
    z.sort()
    cdf = 0.5 * (1 + np.vectorize(math.erf)(z[::50] / math.sqrt(2)))
    ecdf = np.arange(0, z.size, 50) / z.size
    assert np.abs(cdf - ecdf).max() < 0.006
    again = np.empty_like(out)
    NormalSource(200_000, dtype).fill(np.random.default_rng(1), again, sigma=2.0)
    np.testing.assert_array_equal(out, again)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_small_normal_source_draws_standard_normals_by_numpy(dtype) -> None:
    size = ZIGGURAT_BELOW - 2
    source = NormalSource(size, dtype)
    assert source.ziggurat
    rng = np.random.default_rng(5)
    draws = np.empty((400, size), dtype=dtype)
    for row in draws:
        source.fill(rng, row, sigma=0.5)
    expected = np.random.default_rng(5).standard_normal(draws.shape, dtype=dtype) * 0.5
    np.testing.assert_allclose(draws, expected, rtol=1e-6)  # NumPy's own draws, scaled
    z = draws.astype(np.float64).ravel() / 0.5
    assert abs(z.mean()) < 0.01 and abs(z.var() - 1) < 0.01


def _exact_loss(net: Network, theta: np.ndarray, X: np.ndarray, y: np.ndarray) -> float:
    """The loss from logits in float64 by the textbook stable formulas (clipped like sklearn)."""
    logits = Network(net.units, net.activation, "regression", np.float64).predict(
        theta.astype(np.float64), X.astype(np.float64)
    )
    eps = np.finfo(net.dtype).eps
    lo, hi = -np.log1p(-eps), -np.log(eps)
    if net.task == "regression":
        return float(0.5 * np.mean((logits[:, 0] - y) ** 2))
    if net.task == "binary":
        per_sample = np.logaddexp(0, np.where(y == 1, -1.0, 1.0) * logits[:, 0])
    else:
        shift = logits.max(axis=1, keepdims=True)
        lse = np.log(np.exp(logits - shift).sum(axis=1)) + shift[:, 0]
        per_sample = lse - logits[np.arange(len(y)), y]
    return float(np.clip(per_sample, lo, hi).mean())


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    scale=st.floats(0.01, 30),
    task=st.sampled_from(["multiclass", "binary", "regression"]),
)
def test_batched_losses_are_exact_on_random_networks(seed, scale, task) -> None:
    net, X, y, Y, theta, rng = _setup(task, (6,), "leaky_relu", seed=seed, scale=scale)
    cands = Candidates(net, X, y, K=2)
    cands.propose(theta, 0.1, rng)
    losses = cands.losses()
    point = np.empty_like(theta)
    cands.take(1, point)
    assert losses[1] == pytest.approx(_exact_loss(net, point, X, y), rel=1e-12, abs=1e-15)
    # and so is the plain network's loss, also computed from logits
    assert losses[1] == pytest.approx(net.loss(point, X, Y), rel=1e-12, abs=1e-15)


def test_chunked_passes_give_the_same_losses_and_best(monkeypatch) -> None:
    import engine.candidates as candidates

    net, X, y, _, theta, _ = _setup("multiclass", (6, 5), "tanh", n=40)
    whole = Candidates(net, X, y, K=7)
    monkeypatch.setattr(candidates, "CHUNK_BYTES", 2 * 6 * 40 * 8)  # two candidates a chunk
    chunked = Candidates(net, X, y, K=7)
    assert (whole.chunk, chunked.chunk) == (7, 2)
    for cands in (whole, chunked):
        cands.propose(theta, 0.5, np.random.default_rng(3))
    a, b = whole.losses(), chunked.losses()
    np.testing.assert_allclose(a, b, rtol=1e-13)
    assert whole.best == chunked.best == int(np.argmin(a))
    np.testing.assert_allclose(whole.best_logits(), chunked.best_logits(), rtol=1e-13)


@pytest.mark.parametrize(
    "nan",
    [[0], [1, 4], [0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 6]],
    ids=["first", "two-chunks", "whole-first-loss-chunk", "all"],
)
def test_nan_candidates_count_as_inf_and_never_hide_the_best(monkeypatch, nan) -> None:
    import engine.candidates as candidates

    net, X, y, Y, theta, rng = _setup("multiclass", (6,), "relu", n=40)
    monkeypatch.setattr(candidates, "CHUNK_BYTES", 2 * 6 * 40 * 8)  # two candidates a chunk
    cands = Candidates(net, X, y, K=7)
    assert (cands.chunk, cands.loss_chunk) == (2, 4)  # chunks and loss groups both cut
    cands.propose(theta, 0.5, rng)
    for k in nan:
        cands.blocks[0][k, 0, 0] = np.nan
    losses = cands.losses()
    assert np.isinf(losses[nan]).all()
    finite = [k for k in range(7) if k not in nan]
    point = np.empty_like(theta)
    for k in finite:
        cands.take(k, point)
        assert losses[k] == pytest.approx(net.loss(point, X, Y), rel=1e-12)
    assert cands.best == (min(finite, key=lambda k: losses[k]) if finite else 0)
