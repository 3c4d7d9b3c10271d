"""Training speed of the engine beside references measured in the same run, one BLAS thread.

Backprop: digits tiled x4 (7,188 samples), layers 64-256-128-10, ReLU, batch 64,
float32, one epoch of
  (a) the engine (``Trainer.steps()``, metrics off for the timed epochs),
  (b) a bare NumPy loop doing the same arithmetic (shuffle, forward, softmax,
      loss, backward, SGD update), written the plain way,
  (c) scikit-learn's MLPClassifier (``partial_fit`` = one epoch, same settings),
  (d) PyTorch on the CPU, when installed,
and the matrix-multiply-bound limit: one epoch's worth of the same GEMMs alone
(forward, weight gradients, input gradients; outputs preallocated).

Random walk: digits (1,437 training samples), layers 64-32-10, full batch:
candidate evaluations per second of the engine (``candidates`` K per
iteration, everything an iteration does: noise, proposals, batched forward,
loss, acceptance) against the matrix-multiply-bound limit: the same K forward
passes' matrix products alone (no bias, no activation, no loss), in the
fastest of several arrangements (one pass at a time; the first layer of c
candidates as one product, feature- or sample-major; the engine's own calls),
so the fraction is the share of the engine's time that no arrangement of the
products could save. The per-pass GEMMs (the limit used before, about 30%
slower than the best arrangement) and the engine's own GEMM calls are printed
beside it.

Times are process CPU seconds (``time.process_time``; one thread, so this is
the compute time, and time spent waiting for a core on a shared machine is not
counted), best of several rounds, the contenders interleaved round by round.
The last line of output is a JSON object with the headline ratios.

    python bench/train_speed.py [--quick]
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"  # before NumPy is imported

import argparse  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine import Dataset, TrainConfig, Trainer, load_dataset  # noqa: E402

try:
    from threadpoolctl import threadpool_limits
except ImportError:  # pragma: no cover - threadpoolctl is a test dependency
    threadpool_limits = None

HIDDEN = (256, 128)
BATCH = 64
LR = 0.01


def best_of(rounds: int, contenders: dict[str, Callable[[], None]]) -> dict[str, float]:
    """Best CPU time of each contender over ``rounds``, interleaved round by round."""
    best = dict.fromkeys(contenders, float("inf"))
    for _ in range(rounds):
        for name, run in contenders.items():
            t0 = time.process_time()
            run()
            best[name] = min(best[name], time.process_time() - t0)
    return best


# -- backprop ------------------------------------------------------------------------------------


def digits_x4() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = np.tile(X, (4, 1))
    y = np.tile(y, 4)
    scale = X.std(axis=0)
    scale[scale == 0] = 1
    return ((X - X.mean(axis=0)) / scale).astype(np.float32), y.astype(np.int64)


def engine_epoch(X: np.ndarray, y: np.ndarray) -> Callable[[], None]:
    data = Dataset(
        X_train=X,
        y_train=y,
        X_val=X[:500],
        y_val=y[:500],
        task="multiclass",
        n_classes=10,
        name="digits",
    )
    config = TrainConfig(
        dataset="digits",
        optimizer="backprop",
        hidden=HIDDEN,
        batch_size=BATCH,
        learning_rate=LR,
        dtype="float32",
        max_steps=10**6,
        log_every=10**6,
    )
    steps = Trainer(config, data).steps()
    return lambda: next(steps)


def bare_epoch(X: np.ndarray, y: np.ndarray) -> Callable[[], None]:
    """The same epoch as plain NumPy: shuffle, forward, softmax + loss, backward, update."""
    rng = np.random.default_rng(0)
    sizes = [X.shape[1], *HIDDEN, 10]
    W = [
        (rng.standard_normal((a, b)) * np.sqrt(2 / a)).astype(np.float32)
        for a, b in itertools.pairwise(sizes)
    ]
    b = [np.zeros(n, np.float32) for n in sizes[1:]]
    Y = np.eye(10, dtype=np.float32)[y]

    def epoch() -> None:
        order = rng.permutation(len(X))
        Xs, Ys = X[order], Y[order]
        for start in range(0, len(X), BATCH):
            xb, yb = Xs[start : start + BATCH], Ys[start : start + BATCH]
            m = len(xb)
            h1 = np.maximum(xb @ W[0] + b[0], 0)
            h2 = np.maximum(h1 @ W[1] + b[1], 0)
            z = h2 @ W[2] + b[2]
            z -= z.max(axis=1, keepdims=True)
            p = np.exp(z)
            p /= p.sum(axis=1, keepdims=True)
            loss = -np.log(np.clip((p * yb).sum(axis=1), 1e-7, 1)).mean()  # noqa: F841
            d2 = (p - yb) / m
            d1 = (d2 @ W[2].T) * (h2 > 0)
            d0 = (d1 @ W[1].T) * (h1 > 0)
            grads = [(xb.T @ d0, d0.sum(0)), (h1.T @ d1, d1.sum(0)), (h2.T @ d2, d2.sum(0))]
            for i, (gW, gb) in enumerate(grads):
                W[i] -= LR * gW
                b[i] -= LR * gb

    return epoch


def sklearn_epoch(X: np.ndarray, y: np.ndarray) -> Callable[[], None]:
    from sklearn.neural_network import MLPClassifier

    clf = MLPClassifier(
        hidden_layer_sizes=HIDDEN,
        solver="sgd",
        batch_size=BATCH,
        learning_rate_init=LR,
        momentum=0.0,
        alpha=0.0,
        shuffle=True,
        random_state=0,
    )
    warnings.simplefilter("ignore")
    clf.partial_fit(X, y, classes=np.arange(10))  # allocate; later calls are one epoch each
    return lambda: clf.partial_fit(X, y)


def torch_epoch(X: np.ndarray, y: np.ndarray) -> Callable[[], None] | None:
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, HIDDEN[0]),
        torch.nn.ReLU(),
        torch.nn.Linear(HIDDEN[0], HIDDEN[1]),
        torch.nn.ReLU(),
        torch.nn.Linear(HIDDEN[1], 10),
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)

    def epoch() -> None:
        order = torch.randperm(len(Xt))
        for start in range(0, len(Xt), BATCH):
            idx = order[start : start + BATCH]
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(Xt[idx]), yt[idx])
            loss.backward()
            optimizer.step()

    return epoch


def gemm_epoch(X: np.ndarray) -> Callable[[], None]:
    """One epoch's GEMMs alone: 3 forward, 3 weight-gradient, 2 input-gradient per batch."""
    rng = np.random.default_rng(0)
    sizes = [X.shape[1], *HIDDEN, 10]
    W = [rng.standard_normal((a, b)).astype(np.float32) for a, b in itertools.pairwise(sizes)]
    gW = [np.empty_like(w) for w in W]
    acts = [np.empty((BATCH, s), np.float32) for s in sizes[1:]]
    deltas = [np.empty((BATCH, s), np.float32) for s in sizes[1:-1]]

    def epoch() -> None:
        for start in range(0, len(X), BATCH):
            xb = X[start : start + BATCH]
            m = len(xb)
            a = [xb] + [t[:m] for t in acts]
            d = [t[:m] for t in deltas]
            for i in range(3):
                np.matmul(a[i], W[i], out=a[i + 1])
            np.matmul(a[2].T, a[3], out=gW[2])
            np.matmul(a[3], W[2].T, out=d[1])
            np.matmul(a[1].T, d[1], out=gW[1])
            np.matmul(d[1], W[1].T, out=d[0])
            np.matmul(a[0].T, d[0], out=gW[0])

    return epoch


def bench_backprop(rounds: int) -> dict[str, float | None]:
    X, y = digits_x4()
    contenders = {
        "engine": engine_epoch(X, y),
        "bare NumPy loop": bare_epoch(X, y),
        "scikit-learn MLPClassifier": sklearn_epoch(X, y),
        "GEMMs alone (limit)": gemm_epoch(X),
    }
    torch_run = torch_epoch(X, y)
    if torch_run is not None:
        contenders["PyTorch (CPU)"] = torch_run
    times = best_of(rounds, contenders)
    ours = times["engine"]
    print(
        f"\nBackprop: one epoch, digits x4 ({len(X)} samples), 64-256-128-10 ReLU, "
        f"batch {BATCH}, float32, 1 thread (best of {rounds})"
    )
    print(f"  {'':30s} {'seconds':>9s} {'engine / this':>14s}")
    for name, seconds in times.items():
        print(f"  {name:30s} {seconds:9.4f} {ours / seconds:14.2f}")
    if torch_run is None:
        print("  PyTorch: not installed, skipped")
    return {
        "backprop_epoch_seconds": ours,
        "backprop_vs_bare_loop": ours / times["bare NumPy loop"],
        "speedup_vs_sklearn": times["scikit-learn MLPClassifier"] / ours,
        "backprop_vs_gemm_limit": ours / times["GEMMs alone (limit)"],
        "speedup_vs_torch": times["PyTorch (CPU)"] / ours if torch_run else None,
    }


# -- random walk ---------------------------------------------------------------------------------


def gemm_strategies(X: np.ndarray, K: int, dtype: str) -> dict[str, Callable[[], None]]:
    """The GEMMs of one iteration's K forward passes (64-32-10), alone, arranged several ways.

    Each is a way BLAS can do the matrix products those K passes need (biases
    left out: they are not matrix products), outputs preallocated, weights of
    the right shapes:

    - ``per pass``: one candidate at a time, sample-major, ``X @ W0`` then ``H @ W1``;
    - ``feature-major c``: candidates ``c`` at a time, the first layer of the
      ``c`` candidates as ONE product ``(c 32, 64) @ (64, n)``, the second as one
      batched ``np.matmul`` ``(c, 10, 32) @ (c, 32, n)``;
    - ``sample-major c``: the first layer of ``c`` candidates as ONE product
      ``(n, 64) @ (64, c 32)``, the second batched over views of it.

    The fastest of them is the limit: a lower bound on the time the forward
    passes' matrix multiplies need, however the engine arranges them.
    """
    rng = np.random.default_rng(0)
    n = len(X)
    XT = np.ascontiguousarray(X.T)
    W0 = rng.standard_normal((K, 64, 32)).astype(dtype)
    W1 = rng.standard_normal((K, 32, 10)).astype(dtype)
    A0 = np.ascontiguousarray(W0.transpose(0, 2, 1))  # (K, 32, 64): rows of the first layer
    A1 = np.ascontiguousarray(W1.transpose(0, 2, 1))  # (K, 10, 32)
    W0_all = np.ascontiguousarray(W0.transpose(1, 0, 2)).reshape(64, K * 32)  # (64, K 32)
    out: dict[str, Callable[[], None]] = {}

    hid, logits = np.empty((n, 32), dtype), np.empty((n, 10), dtype)

    def per_pass() -> None:
        for k in range(K):
            np.matmul(X, W0[k], out=hid)
            np.matmul(hid, W1[k], out=logits)

    out["per pass"] = per_pass
    for c in sorted({min(c, K) for c in (1, 2, 4, 8, 16, 32, 64)}):
        H = np.empty((c, 32, n), dtype)
        Z = np.empty((c, 10, n), dtype)
        Hs = np.empty((n, c * 32), dtype)
        Zs = np.empty((c, n, 10), dtype)

        def feature_major(c: int = c, H: np.ndarray = H, Z: np.ndarray = Z) -> None:
            for s in range(0, K, c):
                m = min(c, K - s)
                np.matmul(A0[s : s + m].reshape(m * 32, 64), XT, out=H[:m].reshape(m * 32, n))
                np.matmul(A1[s : s + m], H[:m], out=Z[:m])

        def sample_major(c: int = c, Hs: np.ndarray = Hs, Zs: np.ndarray = Zs) -> None:
            for s in range(0, K, c):
                m = min(c, K - s)
                h = Hs[:, : m * 32]
                np.matmul(X, W0_all[:, s * 32 : (s + m) * 32], out=h)
                np.matmul(h.reshape(n, m, 32).transpose(1, 0, 2), W1[s : s + m], out=Zs[:m])

        out[f"feature-major {c}"] = feature_major
        out[f"sample-major {c}"] = sample_major
    return out


def rw_rates(dtype: str, K: int, iterations: int, rounds: int) -> dict[str, float | str]:
    """Candidate evaluations per second: the engine, the GEMM limit, the engine's own GEMMs."""
    data = load_dataset("digits", seed=0, dtype=dtype)
    X = data.X_train
    n = len(X)
    config = TrainConfig(
        dataset="digits",
        optimizer="random_walk",
        hidden=(32,),
        dtype=dtype,
        candidates=K,
        max_steps=10**7,
        log_every=10**7,
    )
    trainer = Trainer(config, data)
    steps = trainer.steps()
    for _ in range(20):  # leave the initial point
        next(steps)

    def engine() -> None:
        for _ in range(iterations):
            next(steps)

    strategies = gemm_strategies(X, K, dtype)
    cands = trainer.optimizer._cands  # the engine's own buffers and GEMM calls
    b0, b1, hidden, Z, c = cands.blocks[0], cands.blocks[1], cands.hidden[0], cands.Z, cands.chunk

    def engine_gemms() -> None:
        for s in range(0, K, c):
            e = min(s + c, K)
            h = hidden[: e - s]
            np.matmul(b0[s:e].reshape((e - s) * 33, -1), cands.XT, out=h.reshape((e - s) * 33, n))
            np.matmul(b1[s:e], h, out=Z[: e - s])

    strategies["the engine's own (bias rows included)"] = engine_gemms

    def repeat(run: Callable[[], None]) -> Callable[[], None]:
        def timed() -> None:
            for _ in range(iterations):
                run()

        return timed

    # Pick the fastest arrangements in a short trial, then time them with the engine,
    # interleaved round by round (the per-pass one too, as a reference).
    trial = best_of(max(2, rounds // 2), {name: repeat(run) for name, run in strategies.items()})
    finalists = sorted(trial, key=trial.get)[:2]
    timed = {name: strategies[name] for name in dict.fromkeys([*finalists, "per pass"])}
    timed["the engine's own (bias rows included)"] = engine_gemms
    contenders = {"engine": engine, **{name: repeat(run) for name, run in timed.items()}}
    times = best_of(rounds, contenders)
    evaluations = iterations * K
    gemm_times = {name: t for name, t in times.items() if name != "engine"}
    fastest = min(gemm_times, key=gemm_times.get)
    return {
        "engine": evaluations / times["engine"],
        "limit": evaluations / gemm_times[fastest],
        "limit_strategy": fastest,
        "per_pass": evaluations / times["per pass"],
        "engine_gemms": evaluations / times["the engine's own (bias rows included)"],
    }


def bench_random_walk(rounds: int, iterations: int) -> dict[str, float | str]:
    print(
        f"\nRandom walk: digits (1437 training samples), 64-32-10 ReLU, full batch, 1 thread "
        f"(best of {rounds})"
    )
    print(
        f"  {'dtype':8s} {'K':>4s} {'engine eval/s':>14s} {'GEMM limit':>11s} {'fraction':>9s} "
        f"{'per-pass GEMMs':>15s} {'engine GEMMs':>13s}  limit's arrangement"
    )
    out: dict[str, float | str] = {}
    for dtype in ("float32", "float64"):
        for K in (1, 16, 64):
            rates = rw_rates(dtype, K, max(2, iterations // K), rounds)
            fraction = rates["engine"] / rates["limit"]
            print(
                f"  {dtype:8s} {K:4d} {rates['engine']:14.0f} {rates['limit']:11.0f} "
                f"{fraction:9.2f} {rates['per_pass']:15.0f} {rates['engine_gemms']:13.0f}  "
                f"{rates['limit_strategy']}"
            )
            out[f"rw_fraction_of_limit_{dtype}_K{K}"] = fraction
            out[f"rw_fraction_of_per_pass_gemms_{dtype}_K{K}"] = rates["engine"] / rates["per_pass"]
            out[f"rw_fraction_of_engine_gemms_{dtype}_K{K}"] = (
                rates["engine"] / rates["engine_gemms"]
            )
            out[f"rw_limit_strategy_{dtype}_K{K}"] = rates["limit_strategy"]
    print("  fraction = engine / GEMM limit (evaluations per second), the limit being the fastest")
    print("  arrangement of the same forward passes' matrix products alone (see gemm_strategies).")
    print("  Beside it, the rates of the per-pass GEMMs and of the engine's own GEMM calls alone.")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds; about half a minute")
    args = parser.parse_args()
    if threadpool_limits is not None:
        threadpool_limits(1)
    rounds = 3 if args.quick else 7
    load_before = os.getloadavg()[0]  # other work on a 2-core machine moves these ratios
    print(
        f"NumPy {np.__version__}; BLAS threads limited to 1; "
        f"OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE')!r} "
        f"OPENBLAS_L2_SIZE={os.environ.get('OPENBLAS_L2_SIZE')!r}"
    )
    result = bench_backprop(rounds)
    rw = bench_random_walk(rounds + 2, iterations=256 if args.quick else 512)
    result.update(rw)
    result["rw_fraction_of_limit"] = rw["rw_fraction_of_limit_float32_K64"]
    result["rw_fraction_of_limit_float64"] = rw["rw_fraction_of_limit_float64_K64"]
    result["quick"] = args.quick
    result["load_average_1min"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}))


if __name__ == "__main__":
    main()
