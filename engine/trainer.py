"""The training loop: ``Trainer`` runs one config on one dataset, step by step.

Definitions the records and the summary rely on:

- ``step`` counts completed steps from 1: an epoch for backprop, an iteration
  for random walk. ``trainer.steps()`` yields once after every step: a record
  (a dict with exactly ``RECORD_FIELDS``) every ``log_every`` steps and on the
  last step, ``None`` otherwise.
- ``train_loss`` is the full-batch training objective at the current
  parameters after the step (mean loss, plus the L2 term
  ``weight_decay / (2 n) * sum W^2`` for backprop); ``val_loss`` is the mean
  loss on the validation split, without the L2 term. For random walk the
  current parameters are the chain's state; the best point seen is what the
  run returns.
- ``evaluations`` counts passes over the training set spent by the optimizer:
  1 for the initial evaluation, then 1 per backprop epoch (any batch size) and
  ``candidates`` per random-walk iteration. Passes made only to compute the
  logged metrics are not counted.
- ``elapsed`` is engine time: the generator's own time, summed over resumed
  sessions, excluding the caller's time between yields.
- MAE is in the target's own units (standardization undone); losses are in
  standardized units.
- ``patience``: the run stops once ``patience`` consecutive steps have brought
  no new lowest training loss (strictly lower than every earlier one,
  the initial evaluation included). ``target_loss``: the run stops once the
  training loss is at most ``target_loss``. Both look at ``train_loss`` above.
- Divergence: a non-finite loss met by the optimizer during a step (backprop:
  any batch loss, or a non-finite parameter after the step), or a non-finite
  training loss at the run's last step, stops the run at that step with outcome
  "diverged". The parameters go back to the start of that step (finite numbers)
  and that step's record has None for every metric it could not compute. A
  non-finite value never appears in a record: it is reported as None.
- Summary: ``final_*`` evaluate the returned weights; ``best_val_*`` are the
  best over the logged records and the returned weights.
"""

from __future__ import annotations

import io
import json
import math
import struct
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from engine.config import TrainConfig
from engine.datasets import INIT_STREAM, TRAIN_STREAM, Dataset, stream
from engine.errors import ConfigError
from engine.functions import BinaryLossAndOutput
from engine.metrics import RECORD_FIELDS
from engine.network import Forward, Network, augment
from engine.optimizers import OPTIMIZER_CLASSES, Optimizer

CHECKPOINT_FORMAT = "mlpq-checkpoint-1"

#: Metrics only one optimizer reports; the other's records hold None there.
_OPTIMIZER_FIELDS = ("grad_norm", "learning_rate", "step_size", "temperature", "acceptance_rate")
_OPTIMIZER_FIELD_SET = frozenset(_OPTIMIZER_FIELDS)
#: (key of the best-so-far, record field, which is better) for the validation summary.
_BEST_VAL = (("loss", "val_loss", min), ("accuracy", "val_accuracy", max), ("r2", "val_r2", max))


@dataclass(frozen=True)
class TrainResult:
    """What a run produced.

    outcome : "succeeded" or "diverged"
    stop_reason : "max_steps", "max_evaluations", "target_loss", "patience", "diverged", or
        "stopped" when the caller broke off before the run ended
    weights : npz bytes, arrays ``W0, b0, W1, b1, ...`` and a 0-d unicode
        array ``config`` (JSON of ``config.to_dict()``); also ``meta`` (JSON:
        task, units, activation, classes, ...) and ``x_mean``/``x_scale`` (the
        standardization of the inputs). No pickle needed to load.
    summary : dict with final/best losses, accuracies, R^2, iterations,
        evaluations and wall_seconds (None where not applicable)
    shapes : {array name: shape} of every array in ``weights`` (what a store
        records beside the bytes, without parsing them again)
    """

    outcome: str
    stop_reason: str
    weights: bytes
    summary: dict[str, Any] = field(default_factory=dict)
    shapes: dict[str, list[int]] = field(default_factory=dict)


class Trainer:
    """Train ``config`` on ``data``; resume exactly from ``state`` (bytes of ``checkpoint()``)."""

    def __init__(self, config: TrainConfig, data: Dataset, state: bytes | None = None) -> None:
        if data.name != config.dataset:
            raise ConfigError("dataset", f"config says {config.dataset!r}, data is {data.name!r}")
        if config.task is not None and data.task != config.task:
            raise ConfigError("task", f"config says {config.task!r}, data is {data.task!r}")
        self.config = config
        self.data = data
        dtype = np.dtype(config.dtype)
        self._X = np.ascontiguousarray(data.X_train, dtype=dtype)
        self._X_val = np.ascontiguousarray(data.X_val, dtype=dtype)
        self._Y = _targets(data.task, data.y_train, data.n_classes, dtype)
        self._Y_val = _targets(data.task, data.y_val, data.n_classes, dtype)
        n_out = data.n_classes if data.task == "multiclass" else 1
        self.net = net = Network(
            [data.n_features, *config.hidden, n_out], config.activation, data.task, dtype
        )
        theta0 = self.net.init_params(stream(config.seed, INIT_STREAM), config.init)
        optimizer_class = OPTIMIZER_CLASSES[config.optimizer]
        self._opt: Optimizer = optimizer_class(
            config, self.net, self._X, self._Y, theta0, stream(config.seed, TRAIN_STREAM)
        )
        self._alpha = config.weight_decay if config.optimizer == "backprop" else 0.0
        binary = data.task == "binary"
        share = getattr(self._opt, "share_validation", None)
        self._shared_val = share is not None and share(self._X_val, self._Y_val)
        own_binary = binary and not self._shared_val
        # Validation passes of the trainer's own (the optimizer's when shared).
        self._val = None if self._shared_val else Forward(net, self._opt.theta, len(self._X_val))
        self._X_val1 = None if self._shared_val else augment(self._X_val)  # [X_val, 1]
        self._binary_train = BinaryLossAndOutput(self._Y) if own_binary else None
        self._binary_val = BinaryLossAndOutput(self._Y_val) if own_binary else None
        # (optimizer.version, scores) of the last record's own validation pass
        self._scores_cache: tuple[int, dict[str, float | None]] | None = None
        #: Steps completed so far.
        self.step = 0
        self._evaluations = 0
        self._elapsed = 0.0
        self._best_loss = math.inf  # lowest training loss seen (patience)
        self._since_best = 0
        self._best_val: dict[str, float | None] = {"loss": None, "accuracy": None, "r2": None}
        self._stop_reason: str | None = None
        if state is None:
            t0 = time.perf_counter()
            with np.errstate(over="ignore", invalid="ignore"):
                self._opt.start()
                self._evaluations = 1
                self._best_loss = _finite_or_inf(self._opt.train_eval()[0])
            self._elapsed = time.perf_counter() - t0
        else:
            self._restore(state)

    # -- the loop ------------------------------------------------------------------------------

    def steps(self) -> Iterator[dict[str, Any] | None]:
        """Run the remaining steps; yield a record (or None) after each one.

        The caller may ``checkpoint()`` or stop iterating between any two yields.
        """
        cfg, opt = self.config, self._opt
        while self._stop_reason is None:
            t0 = time.perf_counter()
            with np.errstate(over="ignore", invalid="ignore"):  # divergence is handled below
                record = self._advance(cfg, opt)
            self._elapsed += time.perf_counter() - t0
            if record is not None:
                record["elapsed"] = self._elapsed
            yield record

    def _advance(self, cfg: TrainConfig, opt: Optimizer) -> dict[str, Any] | None:
        """One step, its bookkeeping and (when due) its record."""
        info = opt.step(self.step)
        self.step += 1
        self._evaluations += opt.passes_per_step
        if opt.diverged:
            self._stop_reason = "diverged"
            return self._record(info, None)
        spent = cfg.max_evaluations is not None and (
            self._evaluations + opt.passes_per_step > cfg.max_evaluations
        )
        due = self.step % cfg.log_every == 0 or self.step >= cfg.max_steps or spent
        train = None
        if due or cfg.patience is not None or cfg.target_loss is not None:
            train = opt.train_eval(True) if self._shared_val and due else opt.train_eval()
            loss = train[0]
            if loss < self._best_loss:
                self._best_loss, self._since_best = loss, 0
            else:
                self._since_best += 1
            if cfg.target_loss is not None and loss <= cfg.target_loss:
                self._stop_reason = "target_loss"
            elif cfg.patience is not None and self._since_best >= cfg.patience:
                self._stop_reason = "patience"
        if self._stop_reason is None and spent:
            self._stop_reason = "max_evaluations"
        elif self._stop_reason is None and self.step >= cfg.max_steps:
            self._stop_reason = "max_steps"
        if self._stop_reason is not None and not math.isfinite(train[0]):
            # The run ends on parameters with a non-finite loss: that is divergence.
            # (Mid-run, a non-finite logged loss only shows as None; the optimizer's own
            # checks stop the run, so logging never changes a run's course.)
            opt.revert()
            self._stop_reason = "diverged"
            return self._record(info, None)
        if due or self._stop_reason is not None:
            return self._record(info, train)
        return None

    def _record(
        self, info: dict[str, float | None], train: tuple[float, np.ndarray] | None
    ) -> dict[str, Any]:
        record: dict[str, Any] = dict.fromkeys(RECORD_FIELDS)
        record["step"] = self.step
        record["evaluations"] = float(self._evaluations)
        for key, value in info.items():
            if key in _OPTIMIZER_FIELD_SET and value is not None:
                record[key] = _finite_or_none(float(value))
        if train is not None:  # None when diverged: nothing trustworthy to measure
            loss, P = train
            record["train_loss"] = _finite_or_none(float(loss))
            if self._shared_val:
                if self._opt.val_scores is None:  # a stop on a step that was not due
                    self._opt.train_eval(True)
                val_loss, train_acc, val_acc = self._opt.val_scores
                record["train_accuracy"] = train_acc
                record["val_loss"] = _finite_or_none(val_loss)
                record["val_accuracy"] = val_acc
            else:
                record.update(self._scores_here(P))
        self._track_best(record)
        return record

    def _scores_here(self, P: np.ndarray) -> dict[str, float | None]:
        """Accuracies (or R^2 and MAE) and the validation loss at the current parameters.

        ``P`` is the training set's output layer there. A step that left the
        parameters where they were (a rejected random-walk proposal) gets the
        scores of the last record again, not recomputed: the same numbers.
        """
        version = self._opt.version
        if self._scores_cache is not None and self._scores_cache[0] == version:
            return self._scores_cache[1]
        P_val = self._val.forward(self._X_val1)
        if self._binary_val is not None:
            # no NaN or inf in a record: None instead (an accuracy is always finite)
            scores: dict[str, float | None] = {
                "train_accuracy": self._binary_train.accuracy(P),
                "val_loss": _finite_or_none(float(self._binary_val(P_val))),
                "val_accuracy": self._binary_val.accuracy(P_val),
            }
        else:
            raw = self._scores("train", P, self.data.y_train)
            raw["val_loss"] = float(self.net.loss_function(self._Y_val, P_val))
            self.net.output_activation(P_val)
            raw.update(self._scores("val", P_val, self.data.y_val))
            scores = {k: None if v is None else _finite_or_none(float(v)) for k, v in raw.items()}
        self._scores_cache = (version, scores)
        return scores

    def _scores(self, split: str, P: np.ndarray, y: np.ndarray) -> dict[str, float]:
        task = self.data.task
        if task == "regression":
            pred = P[:, 0].astype(np.float64)
            target = y.astype(np.float64)
            resid = pred - target
            ss_tot = float(np.sum((target - target.mean()) ** 2))
            r2 = 1.0 - float(np.dot(resid, resid)) / ss_tot if ss_tot > 0 else None
            mae = float(np.mean(np.abs(resid))) * self.data.y_scale
            return {f"{split}_r2": r2, f"{split}_mae": mae}
        labels = P.argmax(axis=1) if task == "multiclass" else (P[:, 0] > 0.5)
        # The share of hits; np.mean of the booleans would be the same, slower.
        return {f"{split}_accuracy": np.count_nonzero(labels == y) / len(y)}

    def _track_best(self, record: dict[str, Any]) -> None:
        best = self._best_val
        for key, field_name, better in _BEST_VAL:
            value = record[field_name]  # finite or None, as every record value
            if value is not None:
                old = best[key]
                best[key] = value if old is None else better(old, value)

    @property
    def optimizer(self) -> Optimizer:
        """The optimizer driving this run (for inspection; the loop never needs it)."""
        return self._opt

    def parameters(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Copies of the current weights and biases (random walk: the chain's state)."""
        Ws, bs = self.net.unpack(self._opt.theta)
        return [W.copy() for W in Ws], [b.copy() for b in bs]

    # -- results ---------------------------------------------------------------------------------

    def result(self) -> TrainResult:
        """Outcome, weights and summary as of now (callable at any point)."""
        with np.errstate(over="ignore", invalid="ignore"):
            return self._result()

    def _result(self) -> TrainResult:
        theta = self._opt.result_params
        last = self._opt.last_scores() if self._shared_val else None
        if last is not None:
            # The last record's pass was at these very parameters: the same numbers.
            train_loss, val_loss, train_acc, val_acc = last
            final = {
                "train_loss": _finite_or_none(train_loss),
                "val_loss": _finite_or_none(val_loss),
                "train_accuracy": train_acc,
                "val_accuracy": val_acc,
            }
        else:
            final = self._final_scores(theta)
        best = dict(self._best_val)
        for key, better in (("loss", min), ("accuracy", max), ("r2", max)):
            value = final.get(f"val_{key}")
            if value is not None:
                best[key] = value if best[key] is None else better(best[key], value)
        summary = {
            "final_train_loss": final["train_loss"],
            "final_val_loss": final["val_loss"],
            "best_val_loss": best["loss"],
            "final_train_accuracy": final.get("train_accuracy"),
            "final_val_accuracy": final.get("val_accuracy"),
            "best_val_accuracy": best["accuracy"],
            "final_val_r2": final.get("val_r2"),
            "best_val_r2": best["r2"],
            "iterations": self.step,
            "evaluations": float(self._evaluations),
            "wall_seconds": self._elapsed,
        }
        diverged = self._stop_reason == "diverged"
        weights, shapes = self._weights(theta)
        return TrainResult(
            outcome="diverged" if diverged else "succeeded",
            stop_reason=self._stop_reason or "stopped",
            weights=weights,
            summary=summary,
            shapes=shapes,
        )

    def _final_scores(self, theta: np.ndarray) -> dict[str, float | None]:
        net = self.net
        P = net.logits(theta, self._X)
        P_val = net.logits(theta, self._X_val)
        train_loss = float(net.loss_function(self._Y, P))
        if self._alpha:
            Ws, _ = net.unpack(theta)
            sq = sum(float(np.dot(W.ravel(), W.ravel())) for W in Ws)
            train_loss += 0.5 * self._alpha * sq / self._X.shape[0]
        final = {"train_loss": train_loss, "val_loss": float(net.loss_function(self._Y_val, P_val))}
        net.output_activation(P)
        net.output_activation(P_val)
        final.update(self._scores("train", P, self.data.y_train))
        final.update(self._scores("val", P_val, self.data.y_val))
        final = {k: _finite_or_none(v) for k, v in final.items()}
        return final

    def _weights(self, theta: np.ndarray) -> tuple[bytes, dict[str, list[int]]]:
        Ws, bs = self.net.unpack(theta)
        arrays: dict[str, np.ndarray] = {}
        for i, (W, b) in enumerate(zip(Ws, bs, strict=True)):
            arrays[f"W{i}"] = np.ascontiguousarray(W)
            arrays[f"b{i}"] = np.ascontiguousarray(b)
        data = self.data
        meta = {
            "task": data.task,
            "units": self.net.units,
            "activation": self.net.activation,
            "n_classes": data.n_classes,
            "classes": _jsonable(data.classes),
            "feature_names": list(data.feature_names),
            "y_mean": data.y_mean,
            "y_scale": data.y_scale,
        }
        d = data.n_features
        arrays["x_mean"] = np.zeros(d) if data.x_mean is None else np.asarray(data.x_mean, float)
        arrays["x_scale"] = np.ones(d) if data.x_scale is None else np.asarray(data.x_scale, float)
        arrays["config"] = np.array(json.dumps(self.config.to_dict()))
        arrays["meta"] = np.array(json.dumps(meta))
        return _npz(arrays), {name: list(a.shape) for name, a in arrays.items()}

    # -- checkpoint ------------------------------------------------------------------------------

    def checkpoint(self) -> bytes:
        """The whole training state as npz bytes (no pickle); ``Trainer(state=...)`` resumes it."""
        arrays, opt_scalars = self._opt.state()
        trainer = {
            "step": self.step,
            "evaluations": self._evaluations,
            "elapsed": self._elapsed,
            "best_loss": self._best_loss,
            "since_best": self._since_best,
            "best_val": self._best_val,
            "stop_reason": self._stop_reason,
        }
        buf = io.BytesIO()
        np.savez(
            buf,
            format=np.array(CHECKPOINT_FORMAT),
            config=np.array(json.dumps(self.config.to_dict())),
            trainer=np.array(json.dumps(trainer)),
            optimizer=np.array(json.dumps(opt_scalars)),
            **{f"opt_{k}": v for k, v in arrays.items()},
        )
        return buf.getvalue()

    def _restore(self, state: bytes) -> None:
        with np.load(io.BytesIO(state), allow_pickle=False) as z:
            files = {name: z[name] for name in z.files}
        if str(files.get("format", "")) != CHECKPOINT_FORMAT:
            raise ValueError(f"state: not an {CHECKPOINT_FORMAT} checkpoint")
        if json.loads(str(files["config"])) != self.config.to_dict():
            raise ValueError("state: the checkpoint was taken with a different config")
        trainer = json.loads(str(files["trainer"]))
        arrays = {k[4:]: v for k, v in files.items() if k.startswith("opt_")}
        self._opt.load_state(arrays, json.loads(str(files["optimizer"])))
        self.step = int(trainer["step"])
        self._evaluations = int(trainer["evaluations"])
        self._elapsed = float(trainer["elapsed"])
        self._best_loss = float(trainer["best_loss"])
        self._since_best = int(trainer["since_best"])
        self._best_val = dict(trainer["best_val"])
        self._stop_reason = trainer["stop_reason"]


def load_weights(npz_bytes: bytes) -> tuple[list[np.ndarray], list[np.ndarray], dict[str, Any]]:
    """Weights, biases and config dict from ``TrainResult.weights``."""
    with np.load(io.BytesIO(npz_bytes), allow_pickle=False) as z:
        n = sum(1 for name in z.files if name.startswith("W") and name[1:].isdigit())
        Ws = [z[f"W{i}"] for i in range(n)]
        bs = [z[f"b{i}"] for i in range(n)]
        config = json.loads(str(z["config"]))
    return Ws, bs, config


def _npz(arrays: dict[str, np.ndarray]) -> bytes:
    """``np.savez`` of ``arrays`` (no pickle, uncompressed), written directly.

    The same ``.npy`` members (format 1.0, as ``np.lib.format.write_array``
    writes them) in a plain stored zip with a fixed timestamp, without
    ``zipfile``'s per-member cost; ``np.load`` reads it like any ``.npz``.
    """
    local, central = [], []
    offset = 0
    for name, a in arrays.items():
        if not a.flags.c_contiguous:
            a = np.ascontiguousarray(a)
        descr = np.lib.format.dtype_to_descr(a.dtype)
        header = f"{{'descr': {descr!r}, 'fortran_order': False, 'shape': {a.shape!r}, }}"
        pad = -(len(_NPY_MAGIC) + 2 + len(header) + 1) % _NPY_ALIGN
        header = (header + " " * pad + "\n").encode("latin1")
        data = b"".join((_NPY_MAGIC, struct.pack("<H", len(header)), header, a.tobytes()))
        member = f"{name}.npy".encode()
        fields = struct.pack("<IIIHH", zlib.crc32(data), len(data), len(data), len(member), 0)
        local.append(b"".join((_ZIP_LOCAL, fields, member, data)))
        central.append(
            b"".join((_ZIP_CENTRAL, fields, struct.pack("<HHHII", 0, 0, 0, 0, offset), member))
        )
        offset += len(local[-1])
    directory = b"".join(central)
    end = struct.pack(
        "<IHHHHIIH", 0x06054B50, 0, 0, len(central), len(central), len(directory), offset, 0
    )
    return b"".join((*local, directory, end))


#: .npy format 1.0: magic and version; the header is padded to this alignment.
_NPY_MAGIC = b"\x93NUMPY\x01\x00"
_NPY_ALIGN = 64
#: Zip member headers up to the CRC: signature, version 2.0, no flags, stored,
#: time 00:00 and date 1980-01-01 (the central one also says "made by" 2.0).
_ZIP_LOCAL = struct.pack("<IHHHHH", 0x04034B50, 20, 0, 0, 0, 0x21)
_ZIP_CENTRAL = struct.pack("<IHHHHHH", 0x02014B50, 20, 20, 0, 0, 0, 0x21)


def _targets(task: str, y: np.ndarray, n_classes: int | None, dtype: np.dtype) -> np.ndarray:
    """Targets in the output layer's layout: one-hot, a 0/1 column, or a value column."""
    if task == "multiclass":
        return np.eye(n_classes, dtype=dtype)[y]
    return np.ascontiguousarray(y.reshape(-1, 1), dtype=dtype)


def _finite_or_inf(x: float) -> float:
    return x if math.isfinite(x) else math.inf


def _finite_or_none(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def _jsonable(classes: tuple | None) -> list | None:
    if classes is None:
        return None
    return [c if isinstance(c, int | float | str) else str(c) for c in classes]
