"""Backpropagation is exact: central differences, a hand-worked network, table properties."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from engine import ACTIVATIONS, DERIVATIVES, LOSS_FUNCTIONS, NO_GRADIENT
from engine.network import AUTO_INIT, Backprop, Forward, Network

TASKS = ("multiclass", "binary", "regression")


def _problem(task: str, hidden: list[int], activation: str, seed: int = 0):
    rng = np.random.default_rng(seed)
    n, d = 9, 4
    n_out = {"multiclass": 3, "binary": 1, "regression": 1}[task]
    net = Network([d, *hidden, n_out], activation, task, np.float64)
    theta = net.init_params(rng, "xavier")
    theta += rng.normal(0.0, 0.3, theta.shape)  # non-zero biases too
    X = rng.normal(size=(n, d))
    if task == "multiclass":
        Y = np.eye(n_out)[rng.integers(0, n_out, n)]
    elif task == "binary":
        Y = rng.integers(0, 2, (n, 1)).astype(np.float64)
    else:
        Y = rng.normal(size=(n, 1))
    return net, theta, X, Y


@pytest.mark.parametrize("task", TASKS)
# step and sign have no gradient to check by differences (zero almost everywhere, undefined
# at 0, where a difference quotient blows up): see the test after this one.
@pytest.mark.parametrize("activation", sorted(set(ACTIVATIONS) - NO_GRADIENT))
@pytest.mark.parametrize("hidden", [[], [5], [6, 4]], ids=["no-hidden", "one", "two"])
@pytest.mark.parametrize("alpha", [0.0, 0.7])
def test_gradient_matches_central_differences(task, activation, hidden, alpha) -> None:
    net, theta, X, Y = _problem(task, hidden, activation)
    grad = np.empty_like(theta)
    loss, gWs, gbs = Backprop(net, theta, grad, len(X), alpha).backprop(X, Y)
    assert loss == pytest.approx(net.loss(theta, X, Y, alpha), rel=1e-12)
    # the returned lists are the layers' views of the flat gradient
    Ws, bs = net.unpack(grad)
    for a, b in zip(gWs + gbs, Ws + bs, strict=True):
        assert np.shares_memory(a, b) and np.array_equal(a, b)
    h = 1e-6
    numeric = np.empty_like(theta)
    for j in range(theta.size):
        t = theta.copy()
        t[j] += h
        up = net.loss(t, X, Y, alpha)
        t[j] -= 2 * h
        down = net.loss(t, X, Y, alpha)
        numeric[j] = (up - down) / (2 * h)
    error = np.linalg.norm(numeric - grad) / (np.linalg.norm(numeric) + np.linalg.norm(grad))
    assert error < 1e-6, error


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("activation", sorted(NO_GRADIENT))
def test_through_a_hard_threshold_only_the_output_layer_gets_a_gradient(task, activation) -> None:
    net, theta, X, Y = _problem(task, [6, 4], activation)
    grad = np.empty_like(theta)
    loss, gWs, gbs = Backprop(net, theta, grad, len(X), 0.0).backprop(X, Y)
    assert loss == pytest.approx(net.loss(theta, X, Y, 0.0), rel=1e-12)
    # The chain rule through step/sign multiplies by 0: every hidden layer's gradient is 0.
    for g in gWs[:-1] + gbs[:-1]:
        assert not g.any()
    # The output layer sees the thresholded features and has an ordinary gradient.
    h = 1e-6
    Ws, bs = net.unpack(theta)
    for param, g in ((Ws[-1], gWs[-1]), (bs[-1], gbs[-1])):
        numeric = np.empty_like(param)
        for idx in np.ndindex(param.shape):
            keep = param[idx]
            param[idx] = keep + h
            up = net.loss(theta, X, Y, 0.0)
            param[idx] = keep - h
            down = net.loss(theta, X, Y, 0.0)
            param[idx] = keep
            numeric[idx] = (up - down) / (2 * h)
        np.testing.assert_allclose(g, numeric, rtol=1e-6, atol=1e-9)
    assert np.abs(gWs[-1]).max() > 0


def test_hand_worked_two_layer_regression_network() -> None:
    # x = [1, 2], y = 1, relu hidden layer of 2, one linear output, loss 0.5 (p - y)^2.
    net = Network([2, 2, 1], "relu", "regression", np.float64)
    theta = np.zeros(net.n_params)
    Ws, bs = net.unpack(theta)
    Ws[0][...] = [[0.5, -1.0], [0.25, 0.5]]
    bs[0][...] = [0.0, 0.5]
    Ws[1][...] = [[2.0], [-1.0]]
    bs[1][...] = [0.25]
    X = np.array([[1.0, 2.0]])
    Y = np.array([[1.0]])
    # By hand:
    #   z1 = [1*0.5 + 2*0.25 + 0, 1*(-1) + 2*0.5 + 0.5] = [1.0, 0.5]; relu keeps both
    #   p  = 1.0*2 + 0.5*(-1) + 0.25 = 1.75;  loss = 0.5 * 0.75^2 = 0.28125
    #   delta2 = p - y = 0.75: dW1 = h^T delta2 = [[0.75], [0.375]], db1 = [0.75]
    #   delta1 = delta2 W1^T = [1.5, -0.75] (relu' = 1 on both units)
    #   dW0 = x^T delta1 = [[1.5, -0.75], [3.0, -1.5]], db0 = [1.5, -0.75]
    grad = np.empty_like(theta)
    loss, gWs, gbs = Backprop(net, theta, grad, 1).backprop(X, Y)
    assert loss == 0.28125
    np.testing.assert_array_equal(gWs[1], [[0.75], [0.375]])
    np.testing.assert_array_equal(gbs[1], [0.75])
    np.testing.assert_array_equal(gWs[0], [[1.5, -0.75], [3.0, -1.5]])
    np.testing.assert_array_equal(gbs[0], [1.5, -0.75])


def test_hand_worked_logistic_unit() -> None:
    # No hidden layer, binary task, all parameters 0: p = sigmoid(0) = 1/2 whatever x is.
    # loss = -log(1/2) = ln 2; dE/dz = p - y = -1/2 for y = 1, so dW = x * (-1/2), db = -1/2.
    net = Network([2, 1], "relu", "binary", np.float64)
    theta = np.zeros(net.n_params)
    grad = np.empty_like(theta)
    loss, gWs, gbs = Backprop(net, theta, grad, 1).backprop(np.array([[1.0, 2.0]]), np.ones((1, 1)))
    assert loss == pytest.approx(math.log(2), rel=1e-15)
    np.testing.assert_array_equal(gWs[0], [[-0.5], [-1.0]])
    np.testing.assert_array_equal(gbs[0], [-0.5])


def test_hand_worked_softmax_layer_of_two_samples() -> None:
    # W = 0, b = [ln 1, ln 3] -> softmax = [1/4, 3/4] for every sample.
    # Labels: sample 0 class 0, sample 1 class 1.
    # loss = -(ln 1/4 + ln 3/4) / 2;  dE/dz = P - Y = [[-3/4, 3/4], [1/4, -1/4]]
    # db = column means = [-1/4, 1/4];  dW = X^T (P - Y) / 2 with X = [[2, 0], [0, 4]]
    #    = [[2 * -3/4, 2 * 3/4], [4 * 1/4, 4 * -1/4]] / 2 = [[-0.75, 0.75], [0.5, -0.5]]
    net = Network([2, 2], "relu", "multiclass", np.float64)
    theta = np.zeros(net.n_params)
    _, bs = net.unpack(theta)
    bs[0][...] = [0.0, math.log(3.0)]
    grad = np.empty_like(theta)
    X = np.array([[2.0, 0.0], [0.0, 4.0]])
    Y = np.eye(2)
    loss, gWs, gbs = Backprop(net, theta, grad, 2).backprop(X, Y)
    assert loss == pytest.approx(-(math.log(0.25) + math.log(0.75)) / 2, rel=1e-14)
    np.testing.assert_allclose(gbs[0], [-0.25, 0.25], rtol=1e-14)
    np.testing.assert_allclose(gWs[0], [[-0.75, 0.75], [0.5, -0.5]], rtol=1e-14)


def test_one_sgd_step_of_the_hand_worked_network() -> None:
    # W0 - 0.1 dW0 = [[0.5 - 0.15, -1 + 0.075], [0.25 - 0.3, 0.5 + 0.15]]
    net = Network([2, 2, 1], "relu", "regression", np.float64)
    theta = np.zeros(net.n_params)
    Ws, bs = net.unpack(theta)
    Ws[0][...] = [[0.5, -1.0], [0.25, 0.5]]
    bs[0][...] = [0.0, 0.5]
    Ws[1][...] = [[2.0], [-1.0]]
    bs[1][...] = [0.25]
    grad = np.empty_like(theta)
    Backprop(net, theta, grad, 1).backprop(np.array([[1.0, 2.0]]), np.array([[1.0]]))
    theta -= 0.1 * grad
    np.testing.assert_allclose(Ws[0], [[0.35, -0.925], [-0.05, 0.65]], rtol=1e-15)
    np.testing.assert_allclose(bs[1], [0.25 - 0.075], rtol=1e-15)


# -- the tables ---------------------------------------------------------------------------------

_values = arrays(np.float64, (3, 4), elements=st.floats(-6, 6, allow_subnormal=False))


@settings(max_examples=50, deadline=None)
@given(Z=_values)
def test_derivatives_from_the_output_match_numeric_derivatives(Z) -> None:
    h = 1e-6
    for name, act in ACTIVATIONS.items():
        out = Z.copy()
        act(out)
        delta = np.ones_like(Z)
        DERIVATIVES[name](out, delta)
        up, down = Z + h, Z - h
        act(up)
        act(down)
        numeric = (up - down) / (2 * h)
        # kinks (relu, leaky_relu at 0) have no derivative; skip points near them
        smooth = np.abs(Z) > 1e-4
        np.testing.assert_allclose(
            delta[smooth], numeric[smooth], rtol=1e-5, atol=1e-8, err_msg=name
        )


@settings(max_examples=50, deadline=None)
@given(Z=arrays(np.float64, (5, 3), elements=st.floats(-50, 50, allow_subnormal=False)))
def test_softmax_rows_are_distributions_and_the_loss_is_minus_log_p_true(Z) -> None:
    from engine.functions import inplace_softmax

    P = Z.copy()
    inplace_softmax(P)
    np.testing.assert_allclose(P.sum(axis=1), 1.0, rtol=1e-12)
    assert (P >= 0).all()
    y = np.arange(5) % 3
    Y = np.eye(3)[y]
    loss = float(LOSS_FUNCTIONS["multiclass"](Y, Z))  # from the logits
    eps = np.finfo(np.float64).eps
    expected = -np.log(np.clip(P[np.arange(5), y], eps, 1 - eps)).mean()
    # equal wherever the probability is representable well away from 0 and 1
    if (P[np.arange(5), y] > 1e-300).all() and (1 - P[np.arange(5), y] > 1e-6).all():
        assert loss == pytest.approx(expected, rel=1e-9)
    assert 0 <= loss <= -np.log(eps) + 1e-12


@settings(max_examples=50, deadline=None)
@given(z=st.floats(-800, 800), y=st.integers(0, 1))
def test_binary_loss_is_exact_in_both_tails(z, y) -> None:
    Z = np.array([[z]])
    loss = float(LOSS_FUNCTIONS["binary"](np.array([[float(y)]]), Z))
    eps = np.finfo(np.float64).eps
    exact = np.logaddexp(0.0, -z if y else z)  # -log p(y)
    assert loss == pytest.approx(np.clip(exact, -np.log1p(-eps), -np.log(eps)), rel=1e-12)


def test_sigmoid_does_not_overflow_for_large_inputs() -> None:
    Z = np.array([-1000.0, -50.0, 0.0, 50.0, 1000.0])
    with np.errstate(all="raise"):
        ACTIVATIONS["sigmoid"](Z)
    assert Z[0] == 0.0 and Z[2] == 0.5 and Z[-1] == 1.0


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_output_logistic_is_relatively_exact_and_never_overflows(dtype) -> None:
    from engine.functions import OUTPUT_ACTIVATIONS

    z = np.concatenate([np.linspace(-80, 80, 2001), [-1e4, -700.0, -89.0, 1e4]])
    P = z.astype(dtype)
    with np.errstate(over="raise", invalid="raise", divide="raise"):  # underflow is fine
        OUTPUT_ACTIVATIONS["binary"](P)
    zd = z.astype(dtype).astype(np.longdouble)  # the inputs as the function saw them
    exact = (1 / (1 + np.exp(-zd))).astype(np.float64)
    normal = exact > 1e3 * np.finfo(dtype).tiny
    np.testing.assert_allclose(P[normal], exact[normal], rtol=4 * np.finfo(dtype).eps)
    assert (P[~normal] >= 0).all()
    assert (P[~normal] < (1e-300 if dtype == np.float64 else 1e-36)).all()
    assert P[-1] == 1.0


def test_batched_loss_scores_stacked_networks_like_single_ones() -> None:
    net, theta, X, Y = _problem("multiclass", [5], "tanh")
    stacked = np.stack([theta, theta * 0.5, theta + 0.1])
    losses = LOSS_FUNCTIONS["multiclass"](Y, Forward(net, stacked, len(X)).forward(X))
    for k in range(3):
        assert losses[k] == pytest.approx(net.loss(stacked[k], X, Y), rel=1e-12)


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_init_scheme_follows_activation(activation) -> None:
    net = Network([200, 300, 10], activation, "multiclass", np.float64)
    Ws, bs = net.unpack(net.init_params(np.random.default_rng(0)))
    assert all((b == 0).all() for b in bs)
    W = Ws[0]
    if AUTO_INIT[activation] == "he":
        assert W.std() == pytest.approx(math.sqrt(2 / 200), rel=0.02)
    else:
        bound = math.sqrt(6 / 500)
        assert np.abs(W).max() <= bound
        assert W.std() == pytest.approx(bound / math.sqrt(3), rel=0.02)


def test_float32_and_float64_start_from_the_same_point() -> None:
    args = ([4, 8, 3], "relu", "multiclass")
    t64 = Network(*args, np.float64).init_params(np.random.default_rng(5))
    t32 = Network(*args, np.float32).init_params(np.random.default_rng(5))
    assert t32.dtype == np.float32
    np.testing.assert_array_equal(t32, t64.astype(np.float32))


@settings(max_examples=50, deadline=None)
@given(
    Z=arrays(np.float64, (6, 4), elements=st.floats(-300, 300, allow_subnormal=False)),
    task=st.sampled_from(TASKS),
)
def test_loss_and_output_equal_the_loss_then_the_output_activation(Z, task) -> None:
    from engine.functions import LOSS_AND_OUTPUT, OUTPUT_ACTIVATIONS

    if task != "multiclass":
        Z = Z[:, :1]
    Y = np.eye(4)[np.arange(6) % 4] if task == "multiclass" else (np.arange(6) % 2)[:, None] * 1.0
    expected_loss = float(LOSS_FUNCTIONS[task](Y, Z))
    expected_P = Z.copy()
    OUTPUT_ACTIVATIONS[task](expected_P)
    P = Z.copy()
    loss = float(LOSS_AND_OUTPUT[task](Y, P))
    assert loss == pytest.approx(expected_loss, rel=1e-12, abs=1e-15)
    np.testing.assert_allclose(P, expected_P, rtol=1e-12, atol=1e-300)


def test_the_numpy_free_names_are_the_engine_tables() -> None:
    from engine.names import ACTIVATION_NAMES, NO_GRADIENT

    assert tuple(ACTIVATIONS) == ACTIVATION_NAMES
    assert set(DERIVATIVES) == set(ACTIVATION_NAMES)
    assert set(ACTIVATION_NAMES) >= NO_GRADIENT


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("hidden", [[], [5], [6, 1, 4]], ids=["no-hidden", "one", "three"])
@pytest.mark.parametrize("alpha", [0.0, 0.7])
def test_gradient_without_the_loss_is_backprops_gradient_bit_for_bit(
    task, activation, hidden, alpha
) -> None:
    net, theta, X, Y = _problem(task, hidden, activation)
    expected, grad = np.empty_like(theta), np.empty_like(theta)
    loss = Backprop(net, theta, expected, len(X), alpha).backprop(X, Y, None, 0.3)[0]
    bp = Backprop(net, theta, grad, len(X), alpha)
    X1 = np.hstack([X, np.ones((len(X), 1))])
    for m in (len(X), 4):  # the whole batch, then a smaller one through the same buffers
        finite = bp.gradient(X1[:m], Y[:m], 0.3)
        assert finite and math.isfinite(loss)
    bp.gradient(X1, Y, 0.3)
    assert grad.tobytes() == expected.tobytes()


# Output logits of every row of the batch below (the true class is the first), and whether
# the mean loss is finite: the log losses clip each sample's loss, so an infinite logit
# makes it non-finite only through a NaN.
INF = math.inf
LOGITS = [
    ([0.0, 1.0, -2.0], True),
    ([1e308, -1e308, 1e308], True),  # finite, however large
    ([-INF, 0.0, 1.0], True),  # the true class at -inf: the sample's loss is clipped
    ([0.0, -INF, 1.0], False),  # another class at -inf: z_y = sum(z * y) is NaN
    ([0.0, 1.0, INF], False),  # +inf: the softmax is NaN
    ([INF, 0.0, 0.0], False),
    ([-INF, -INF, -INF], False),
    ([0.0, math.nan, 0.0], False),
]


@pytest.mark.parametrize(("logits", "finite"), LOGITS)
def test_gradient_reports_a_non_finite_loss_or_leaves_a_nan_in_the_gradient(logits, finite):
    # No hidden layer, zero weights: every row's logits are the output biases.
    net = Network([2, 3], "relu", "multiclass", np.float64)
    theta = np.zeros(net.n_params)
    theta[-3:] = logits
    X1 = np.array([[0.5, -1.0, 1.0], [2.0, 0.0, 1.0]])
    Y = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    Y[1] = Y[0]  # both rows of the true class 0
    with np.errstate(all="ignore"):
        loss = Backprop(net, theta, np.empty_like(theta), 2).backprop(X1, Y)[0]
        grad = np.empty_like(theta)
        reported = Backprop(net, theta, grad, 2).gradient(X1, Y)
    assert math.isfinite(loss) is finite
    if not reported:
        assert not finite  # never a false alarm
    if not finite:
        assert not reported or np.isnan(grad).any()  # a NaN the parameters will carry


@pytest.mark.parametrize("logit", [0.0, 1e308, INF, -INF, math.nan])
@pytest.mark.parametrize("task", ["binary", "regression"])
def test_gradient_of_one_output_reports_a_non_finite_loss_or_leaves_a_nan(logit, task) -> None:
    net = Network([2, 1], "relu", task, np.float64)
    theta = np.zeros(net.n_params)
    theta[-1] = logit
    X1 = np.array([[0.5, -1.0, 1.0], [2.0, 0.0, 1.0]])
    Y = np.array([[1.0], [0.0]]) if task == "binary" else np.array([[-1e308], [3.0]])
    with np.errstate(all="ignore"):
        loss = Backprop(net, theta, np.empty_like(theta), 2).backprop(X1, Y)[0]
        grad = np.empty_like(theta)
        reported = Backprop(net, theta, grad, 2).gradient(X1, Y)
    if not reported:
        assert not math.isfinite(loss)
    if not math.isfinite(loss):
        assert not reported or np.isnan(grad).any()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_softmax_with_its_buffers_is_inplace_softmax_bit_for_bit(dtype) -> None:
    from engine.functions import Softmax, inplace_softmax

    rng = np.random.default_rng(5)
    Z = (rng.normal(size=(40, 7)) * rng.choice([1e-3, 1.0, 30.0, 1e3], size=(40, 1))).astype(dtype)
    softmax = Softmax(64, dtype)
    for m in (40, 13):
        expected, got = Z[:m].copy(), Z[:m].copy()
        inplace_softmax(expected)
        softmax(got)
        assert got.tobytes() == expected.tobytes()
