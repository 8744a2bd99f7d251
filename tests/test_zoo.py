"""The victim zoo: random, unitary balanced and trained networks, ``build`` and the ``relux zoo`` CLI."""

from __future__ import annotations

import hashlib
import importlib.util
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from relux.errors import InputError
from relux.model import MLP
from relux.zoo import build, dataset_for_input, random_mlp, trained_mlp, unitary_mlp

needs_sklearn = pytest.mark.skipif(
    importlib.util.find_spec("sklearn") is None, reason="scikit-learn not installed"
)


def _same(a: MLP, b: MLP) -> bool:
    return all(
        W1.tobytes() == W2.tobytes() and b1.tobytes() == b2.tobytes()
        for (W1, b1), (W2, b2) in zip(a.layers, b.layers, strict=True)
    )


@pytest.mark.parametrize("maker", [random_mlp, unitary_mlp])
def test_seeded_builders_are_deterministic(maker: Callable[..., MLP]) -> None:
    a = maker("10-8x2-3", np.random.default_rng(7))
    b = maker((10, 8, 8, 3), np.random.default_rng(7))
    c = maker("10-8x2-3", np.random.default_rng(8))
    assert a.arch == (10, 8, 8, 3)
    assert _same(a, b)
    assert not any(np.array_equal(W1, W2) for (W1, _), (W2, _) in zip(a.layers, c.layers, strict=True))


def test_random_nets_have_few_dead_neurons() -> None:
    X = np.random.default_rng(123).uniform(-1.0, 1.0, size=(4000, 20))
    never, total = 0, 0
    for seed in range(5):
        model = random_mlp("20-32x3-1", np.random.default_rng(seed))
        on = np.concatenate(model.activation_patterns(X), axis=1).mean(axis=0)
        never += int(np.count_nonzero(on == 0.0))
        total += on.size
        assert 0.3 < float(np.median(on)) < 0.7  # zero-mean weights, small biases: typically on half the time
    assert never <= 0.02 * total


def test_random_weights_are_he_scaled() -> None:
    model = random_mlp("400-300-10", np.random.default_rng(0))
    W, b = model.layers[0]
    # 120,000 N(0, 2/400) draws: the sample std is within 1% of sqrt(2/400) with overwhelming probability.
    assert abs(W.std() / np.sqrt(2 / 400) - 1) < 0.01
    assert 0.05 < b.std() < 0.2  # 300 draws of N(0, 0.1^2)


def test_unitary_rows_unit_norm_and_balanced() -> None:
    model = unitary_mlp("12-24-24-24-2", np.random.default_rng(3))
    for W, _ in model.layers:
        # Normalising a row leaves its norm within a few ulps of 1.
        assert np.allclose(np.linalg.norm(W, axis=1), 1.0, rtol=0, atol=1e-14)
    X = np.random.default_rng(99).uniform(-1.0, 1.0, size=(5000, 12))  # fresh samples, not the fitting ones
    for on in model.activation_patterns(X):
        frac = on.mean(axis=0)
        assert frac.min() > 0.35 and frac.max() < 0.65


@needs_sklearn
def test_trained_digits_classifier() -> None:
    model, report = trained_mlp("64-32-10", "digits", np.random.default_rng(0))
    assert model.arch == (64, 32, 10)
    assert report.task == "classification"
    assert report.test_accuracy is not None and report.test_accuracy >= 0.9
    assert report.seconds < 30


@needs_sklearn
def test_trained_is_deterministic() -> None:
    a, ra = trained_mlp("64-16-10", "digits", np.random.default_rng(5), epochs=3)
    b, rb = trained_mlp("64-16-10", "digits", np.random.default_rng(5), epochs=3)
    c, _ = trained_mlp("64-16-10", "digits", np.random.default_rng(6), epochs=3)
    assert _same(a, b) and ra.loss_history == rb.loss_history
    assert not _same(a, c)


@needs_sklearn
def test_trained_regression_and_mismatches() -> None:
    _, report = trained_mlp("64-16-1", "digits", np.random.default_rng(0), epochs=20)
    assert report.task == "regression" and report.test_mse is not None
    assert report.test_mse < 0.5 * 8.25  # well below the variance of uniform-ish digit labels 0..9
    with pytest.raises(InputError, match="64 features"):
        trained_mlp("784-16-10", "digits", np.random.default_rng(0))
    with pytest.raises(InputError, match="10 classes"):
        trained_mlp("64-16-5", "digits", np.random.default_rng(0))


def test_build_random_and_unitary() -> None:
    model, info = build("10-5x2-1", "unitary", seed=4)
    assert info == {"arch": "10-5x2-1", "init": "unitary", "seed": 4, "params": model.n_params}
    again, _ = build((10, 5, 5, 1), "unitary", seed=4)
    assert _same(model, again)
    rand, info = build("10-5-1", "random", seed=0)
    assert info["params"] == 10 * 5 + 5 + 5 + 1


def test_build_rejects_bad_arguments() -> None:
    with pytest.raises(InputError, match="unknown init"):
        build("10-5-1", "xavier", seed=0)
    with pytest.raises(InputError, match="only apply to --init trained"):
        build("10-5-1", "random", seed=0, data="digits")
    with pytest.raises(InputError, match="unknown dataset"):
        build("64-5-10", "trained", seed=0, data="cifar")
    with pytest.raises(InputError, match="seed"):
        build("10-5-1", "random", seed=-1)
    with pytest.raises(InputError, match="architecture"):
        build("10--1", "random", seed=0)
    with pytest.raises(InputError, match="no packaged dataset has 10"):
        build("10-5-1", "trained", seed=0)
    assert dataset_for_input(3072) == "mnist32"


@needs_sklearn
def test_build_trained_info() -> None:
    model, info = build("64-8-10", "trained", seed=1, epochs=2)
    assert info["data"] == "digits" and info["training"]["epochs"] == 2
    assert info["dataset"]["n_features"] == 64 and info["params"] == model.n_params


# ------------------------------------------------------------------------------------------------ CLI
def _save_model_available() -> bool:
    try:
        from relux.formats import save_model  # noqa: F401
    except ImportError:
        return False
    return True


needs_formats = pytest.mark.skipif(
    not _save_model_available(), reason="relux.formats.save_model not built yet"
)


@needs_formats
def test_cli_writes_model_and_prints_sha(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from relux.cli import main

    out = tmp_path / "victim.npz"
    code = main(["zoo", "10-5x2-1", "--init", "unitary", "--seed", "3", "--out", str(out)])
    assert code == 0 and out.is_file()
    text = capsys.readouterr().out
    assert "10-5x2-1" in text and hashlib.sha256(out.read_bytes()).hexdigest() in text


@needs_formats
@needs_sklearn
def test_cli_trained_reports_accuracy(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from relux.cli import main

    out = tmp_path / "digits.npz"
    code = main(["-q", "zoo", "64-8-10", "--init", "trained", "--epochs", "2", "--out", str(out)])
    assert code == 0 and out.is_file()
    assert "test accuracy" in capsys.readouterr().out


@needs_formats
def test_cli_bad_input_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from relux.cli import main

    out = str(tmp_path / "m.npz")
    assert main(["zoo", "10-5-1", "--init", "random", "--data", "digits", "--out", out]) == 2
    assert main(["zoo", "10-5-1", "--init", "random", "--out", str(tmp_path / "no" / "m.npz")]) == 2
    assert "does not exist" in capsys.readouterr().err
