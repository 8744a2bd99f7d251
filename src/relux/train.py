"""A small deterministic float64 trainer for ReLU MLPs: minibatch Adam, pure numpy.

Classification (``k >= 2`` outputs) minimises softmax cross-entropy; a single output (``k = 1``) regresses
the label with the mean squared error, like FMSH24's MNIST regressors. Everything random (shuffling)
comes from the ``numpy.random.Generator`` passed in, and all arithmetic is float64, so the same inputs
and seed give the same bytes on the same machine.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from relux.errors import InputError
from relux.model import MLP, format_arch

FloatArray = NDArray[np.float64]
Layers = list[tuple[FloatArray, FloatArray]]

#: Called after every epoch with (epoch number starting at 1, mean training loss of that epoch).
EpochCallback = Callable[[int, float], None]

LR_SCHEDULES = ("constant", "cosine")
_EVAL_CHUNK = 8192


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of :func:`train_mlp`. ``lr_schedule='cosine'`` decays the step size to zero."""

    epochs: int = 20
    batch_size: int = 64
    learning_rate: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    lr_schedule: str = "cosine"

    def __post_init__(self) -> None:
        if not (isinstance(self.epochs, int) and self.epochs >= 1):
            raise InputError(f"epochs must be an integer >= 1, found {self.epochs!r}")
        if not (isinstance(self.batch_size, int) and self.batch_size >= 1):
            raise InputError(f"batch_size must be an integer >= 1, found {self.batch_size!r}")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise InputError(f"learning_rate must be a finite number > 0, found {self.learning_rate!r}")
        if not (0.0 <= self.beta1 < 1.0 and 0.0 <= self.beta2 < 1.0):
            raise InputError(f"Adam betas must lie in [0, 1), found {self.beta1!r}, {self.beta2!r}")
        if not self.eps > 0:
            raise InputError(f"eps must be > 0, found {self.eps!r}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise InputError(f"weight_decay must be >= 0, found {self.weight_decay!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise InputError(f"lr_schedule must be one of {LR_SCHEDULES}, found {self.lr_schedule!r}")


@dataclass(frozen=True)
class TrainReport:
    """What training achieved. Accuracies for classification, mean squared errors for regression
    (the other pair is ``None``); test metrics are ``None`` without a test set."""

    task: str
    arch: str
    epochs: int
    seconds: float
    n_train: int
    n_test: int
    final_loss: float
    train_accuracy: float | None = None
    test_accuracy: float | None = None
    train_mse: float | None = None
    test_mse: float | None = None
    loss_history: tuple[float, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["loss_history"] = list(self.loss_history)
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    def __repr__(self) -> str:
        if self.task == "classification":
            metric = f"train_acc={self.train_accuracy:.4f}"
            if self.test_accuracy is not None:
                metric += f", test_acc={self.test_accuracy:.4f}"
        else:
            metric = f"train_mse={self.train_mse:.4g}"
            if self.test_mse is not None:
                metric += f", test_mse={self.test_mse:.4g}"
        return (
            f"TrainReport({self.task}, arch={self.arch}, epochs={self.epochs}, {metric}, "
            f"seconds={self.seconds:.1f})"
        )


# -------------------------------------------------------------------------------------------- kernels
def he_init(arch: Sequence[int], rng: np.random.Generator) -> Layers:
    """He-normal weights ``N(0, 2 / fan_in)`` and zero biases, the usual start for ReLU training."""
    layers: Layers = []
    for fan_in, fan_out in zip(arch[:-1], arch[1:], strict=True):
        W = rng.standard_normal((fan_out, fan_in)) * math.sqrt(2.0 / fan_in)
        layers.append((W, np.zeros(fan_out)))
    return layers


def forward_logits(layers: Sequence[tuple[FloatArray, FloatArray]], X: FloatArray) -> FloatArray:
    """Outputs of the network for the rows of ``X``, evaluated in chunks to bound memory."""
    outs: list[FloatArray] = []
    for start in range(0, X.shape[0], _EVAL_CHUNK):
        H = X[start : start + _EVAL_CHUNK]
        for W, b in layers[:-1]:
            H = np.maximum(H @ W.T + b, 0.0)
        W, b = layers[-1]
        outs.append(H @ W.T + b)
    if not outs:
        return np.zeros((0, layers[-1][0].shape[0]))
    return np.concatenate(outs)


def loss_and_grads(
    layers: Sequence[tuple[FloatArray, FloatArray]], X: FloatArray, y: NDArray[Any], task: str
) -> tuple[float, Layers]:
    """Mean loss over the batch and its gradient with respect to every ``(W, b)``.

    ``task='classification'``: softmax cross-entropy against integer labels ``y``.
    ``task='regression'``: squared error of the single output against ``y`` (as float).
    """
    acts = [X]
    H = X
    for W, b in layers[:-1]:
        H = np.maximum(H @ W.T + b, 0.0)
        acts.append(H)
    W_out, b_out = layers[-1]
    out = H @ W_out.T + b_out
    n = X.shape[0]
    if task == "classification":
        shifted = out - out.max(axis=1, keepdims=True)
        exp = np.exp(shifted)
        total = exp.sum(axis=1, keepdims=True)
        rows = np.arange(n)
        loss = float(np.mean(np.log(total[:, 0]) - shifted[rows, y]))
        delta = exp / total
        delta[rows, y] -= 1.0
        delta /= n
    elif task == "regression":
        resid = out[:, 0] - y
        loss = float(np.mean(resid * resid))
        delta = (2.0 / n) * resid[:, None]
    else:
        raise InputError(f"task must be 'classification' or 'regression', found {task!r}")
    grads: Layers = []
    for i in range(len(layers) - 1, -1, -1):
        W, _ = layers[i]
        H_prev = acts[i]
        grads.append((delta.T @ H_prev, delta.sum(axis=0)))
        if i > 0:
            delta = (delta @ W) * (H_prev > 0.0)
    grads.reverse()
    return loss, grads


def _learning_rate(config: TrainConfig, step: int, total_steps: int) -> float:
    if config.lr_schedule == "cosine":
        return config.learning_rate * 0.5 * (1.0 + math.cos(math.pi * step / total_steps))
    return config.learning_rate


def evaluate(
    layers: Sequence[tuple[FloatArray, FloatArray]], X: FloatArray, y: NDArray[np.int64], task: str
) -> float:
    """Accuracy (classification, argmax of the logits) or mean squared error (regression)."""
    if X.shape[0] == 0:
        return float("nan")
    out = forward_logits(layers, X)
    if task == "classification":
        return float(np.mean(np.argmax(out, axis=1) == y))
    resid = out[:, 0] - y
    return float(np.mean(resid * resid))


# ------------------------------------------------------------------------------------------ training
def train_mlp(
    init: MLP | Sequence[tuple[FloatArray, FloatArray]],
    X_train: FloatArray,
    y_train: NDArray[np.int64],
    config: TrainConfig,
    rng: np.random.Generator,
    *,
    X_test: FloatArray | None = None,
    y_test: NDArray[np.int64] | None = None,
    on_epoch: EpochCallback | None = None,
) -> tuple[MLP, TrainReport]:
    """Train from the starting weights ``init`` with minibatch Adam and return the trained network.

    The task follows the output width: ``k >= 2`` classifies (labels must be ``< k``), ``k = 1``
    regresses the label. ``rng`` shuffles the training set every epoch; nothing else is random.
    """
    layers: Layers = [
        (np.array(W, dtype=np.float64), np.array(b, dtype=np.float64))
        for W, b in (init.layers if isinstance(init, MLP) else init)
    ]
    arch = (layers[0][0].shape[1],) + tuple(W.shape[0] for W, _ in layers)
    X = np.ascontiguousarray(X_train, dtype=np.float64)
    y = np.asarray(y_train, dtype=np.int64)
    if X.ndim != 2 or X.shape[1] != arch[0] or y.shape != (X.shape[0],) or X.shape[0] == 0:
        raise InputError(
            f"expected X_train (n, {arch[0]}) with n >= 1 labels for arch {format_arch(arch)}, "
            f"found X {X.shape} and y {y.shape}"
        )
    k = arch[-1]
    task = "classification" if k >= 2 else "regression"
    if task == "classification" and (y.min() < 0 or y.max() >= k):
        raise InputError(
            f"labels run from {int(y.min())} to {int(y.max())} but the network has {k} outputs; "
            f"use an output width of at least {int(y.max()) + 1}"
        )
    target: NDArray[Any] = y if task == "classification" else y.astype(np.float64)

    n = X.shape[0]
    steps_per_epoch = -(-n // config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    m_state = [(np.zeros_like(W), np.zeros_like(b)) for W, b in layers]
    v_state = [(np.zeros_like(W), np.zeros_like(b)) for W, b in layers]
    history: list[float] = []
    step = 0
    started = time.perf_counter()
    for epoch in range(1, config.epochs + 1):
        order = rng.permutation(n)
        epoch_loss = 0.0
        for start in range(0, n, config.batch_size):
            idx = order[start : start + config.batch_size]
            loss, grads = loss_and_grads(layers, X[idx], target[idx], task)
            epoch_loss += loss * idx.size
            step += 1
            lr = _learning_rate(config, step - 1, total_steps)
            corr1 = 1.0 - config.beta1**step
            corr2 = 1.0 - config.beta2**step
            for (param_pair, grad_pair, m_pair, v_pair) in zip(layers, grads, m_state, v_state, strict=True):
                for p, g, m, v in zip(param_pair, grad_pair, m_pair, v_pair, strict=True):
                    if config.weight_decay and p.ndim == 2:
                        g = g + config.weight_decay * p
                    m *= config.beta1
                    m += (1.0 - config.beta1) * g
                    v *= config.beta2
                    v += (1.0 - config.beta2) * (g * g)
                    p -= (lr / corr1) * m / (np.sqrt(v / corr2) + config.eps)
        mean_loss = epoch_loss / n
        if not math.isfinite(mean_loss):
            raise InputError(
                f"training diverged at epoch {epoch} (loss {mean_loss}); lower the learning rate "
                f"(now {config.learning_rate})"
            )
        history.append(mean_loss)
        if on_epoch is not None:
            on_epoch(epoch, mean_loss)
    seconds = time.perf_counter() - started

    train_metric = evaluate(layers, X, y, task)
    test_metric: float | None = None
    n_test = 0
    if X_test is not None and y_test is not None and len(X_test):
        Xt = np.ascontiguousarray(X_test, dtype=np.float64)
        yt = np.asarray(y_test, dtype=np.int64)
        if Xt.ndim != 2 or Xt.shape[1] != arch[0] or yt.shape != (Xt.shape[0],):
            raise InputError(f"expected X_test (m, {arch[0]}) with m labels, found {Xt.shape} and {yt.shape}")
        test_metric = evaluate(layers, Xt, yt, task)
        n_test = Xt.shape[0]
    is_class = task == "classification"
    report = TrainReport(
        task=task,
        arch=format_arch(arch),
        epochs=config.epochs,
        seconds=seconds,
        n_train=n,
        n_test=n_test,
        final_loss=history[-1],
        train_accuracy=train_metric if is_class else None,
        test_accuracy=test_metric if is_class else None,
        train_mse=None if is_class else train_metric,
        test_mse=None if is_class else test_metric,
        loss_history=tuple(history),
    )
    return MLP(layers), report
