"""The numpy Adam trainer: exact gradients, determinism, validation."""

from __future__ import annotations

import numpy as np
import pytest

from relux.errors import InputError
from relux.train import TrainConfig, he_init, loss_and_grads, train_mlp


def _toy(rng: np.random.Generator, n: int = 200, d: int = 6, k: int = 3) -> tuple[np.ndarray, np.ndarray]:
    X = rng.standard_normal((n, d))
    y = (np.argmax(X[:, :k], axis=1)).astype(np.int64)
    return X, y


@pytest.mark.parametrize("task,k", [("classification", 3), ("regression", 1)])
def test_gradients_match_finite_differences(task: str, k: int) -> None:
    rng = np.random.default_rng(0)
    layers = he_init((5, 7, 6, k), rng)
    layers = [(W, rng.standard_normal(b.shape) * 0.1) for W, b in layers]
    X = rng.standard_normal((9, 5))
    y = rng.integers(0, 3, size=9)
    _, grads = loss_and_grads(layers, X, y, task)
    h = 1e-6
    for li, (W, b) in enumerate(layers):
        for arr, garr in ((W, grads[li][0]), (b, grads[li][1])):
            for idx in np.ndindex(arr.shape):
                old = arr[idx]
                arr[idx] = old + h
                up, _ = loss_and_grads(layers, X, y, task)
                arr[idx] = old - h
                down, _ = loss_and_grads(layers, X, y, task)
                arr[idx] = old
                # Central differences of a piecewise-smooth loss: O(h^2) truncation plus ~eps*|loss|/h
                # rounding, about 1e-9 here; no ReLU kink lies within h of these points (seeded).
                assert abs((up - down) / (2 * h) - garr[idx]) < 1e-7


def test_training_is_deterministic_and_seed_dependent() -> None:
    X, y = _toy(np.random.default_rng(1))
    cfg = TrainConfig(epochs=5, batch_size=16)

    def run(seed: int) -> list[bytes]:
        rng = np.random.default_rng(seed)
        model, _ = train_mlp(he_init((6, 8, 3), rng), X, y, cfg, rng)
        return [W.tobytes() + b.tobytes() for W, b in model.layers]

    assert run(3) == run(3)
    assert run(3) != run(4)


def test_training_learns_a_separable_problem() -> None:
    X, y = _toy(np.random.default_rng(2), n=600)
    rng = np.random.default_rng(0)
    _, report = train_mlp(
        he_init((6, 16, 3), rng), X[:500], y[:500], TrainConfig(epochs=40, learning_rate=3e-3), rng,
        X_test=X[500:], y_test=y[500:],
    )
    assert report.task == "classification" and report.epochs == 40
    assert report.train_accuracy is not None and report.train_accuracy > 0.9
    assert report.test_accuracy is not None and report.test_accuracy > 0.85
    assert report.loss_history[-1] < report.loss_history[0]
    assert '"task": "classification"' in report.to_json()


def test_regression_reports_mse() -> None:
    rng = np.random.default_rng(0)
    X = rng.uniform(0, 1, size=(300, 4))
    y = np.rint(X.sum(axis=1) * 2).astype(np.int64)
    _, report = train_mlp(he_init((4, 16, 1), rng), X, y, TrainConfig(epochs=150, learning_rate=3e-3), rng)
    assert report.task == "regression" and report.train_accuracy is None
    variance = float(np.var(y))
    assert report.train_mse is not None and report.train_mse < 0.2 * variance


def test_validation_errors() -> None:
    rng = np.random.default_rng(0)
    X, y = _toy(rng)
    with pytest.raises(InputError, match="outputs"):
        train_mlp(he_init((6, 4, 2), rng), X, y, TrainConfig(epochs=1), rng)
    with pytest.raises(InputError, match="expected X_train"):
        train_mlp(he_init((5, 4, 3), rng), X, y, TrainConfig(epochs=1), rng)
    for bad in ({"epochs": 0}, {"batch_size": 0}, {"learning_rate": -1.0}, {"lr_schedule": "step"}):
        with pytest.raises(InputError):
            TrainConfig(**bad)
