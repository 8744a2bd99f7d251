"""The oracle protocol: the only thing an attack sees of its victim.

An oracle answers batches of float64 inputs ``(n, d)`` with float64 outputs ``(n, k)``. Everything
else (counting, budgets, caching, retries, degradations) is a composable wrapper around it.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Protocol, runtime_checkable

import numpy as np
from numpy.typing import ArrayLike, NDArray

from relux.errors import InputError, OracleError

FloatArray = NDArray[np.float64]
#: A batch query: rows of inputs in, rows of outputs out (what the attack stages call).
QueryFn = Callable[[FloatArray], FloatArray]


class OutputKind(enum.Enum):
    """What an oracle's outputs are."""

    LOGITS = "logits"
    PROBABILITIES = "probabilities"


@runtime_checkable
class Oracle(Protocol):
    """Black-box query access to a function ``R^d -> R^k``."""

    @property
    def input_dim(self) -> int: ...

    @property
    def output_dim(self) -> int: ...

    @property
    def output_kind(self) -> OutputKind: ...

    def query(self, X: FloatArray) -> FloatArray:
        """Evaluate the victim on every row of ``X`` (shape ``(n, input_dim)``)."""
        ...


class ShapedOracle:
    """Base of oracles that store their sizes: subclasses set ``_d``, ``_k`` and ``_kind`` and
    implement ``query``."""

    _d: int
    _k: int
    _kind: OutputKind

    @property
    def input_dim(self) -> int:
        return self._d

    @property
    def output_dim(self) -> int:
        return self._k

    @property
    def output_kind(self) -> OutputKind:
        return self._kind


def as_query_batch(X: ArrayLike, input_dim: int) -> FloatArray:
    """Validate and normalise a query batch to a C-contiguous float64 ``(n, input_dim)`` array."""
    A = np.ascontiguousarray(X, dtype=np.float64)
    if A.ndim == 1:
        A = A[None, :]
    if A.ndim != 2 or A.shape[1] != input_dim:
        raise InputError(f"expected a query batch of shape (n, {input_dim}), found {np.shape(X)}")
    if not np.all(np.isfinite(A)):
        raise InputError("query batch contains NaN or inf; the attack must only send finite inputs")
    return A


def check_answer(Y: ArrayLike, n: int, output_dim: int, source: str) -> FloatArray:
    """Validate an oracle's answer: shape ``(n, output_dim)``, finite. Raise :class:`OracleError` if not."""
    try:
        A = np.asarray(Y, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise OracleError(f"{source} answered with non-numeric data: {exc}") from None
    if A.ndim == 1 and output_dim == 1 and A.shape[0] == n:
        A = A[:, None]
    if A.shape != (n, output_dim):
        raise OracleError(
            f"{source} answered with shape {A.shape}; expected ({n}, {output_dim}). "
            "Check --arch (the number of outputs) and the model behind the oracle."
        )
    if not np.all(np.isfinite(A)):
        bad = int(np.count_nonzero(~np.isfinite(A)))
        raise OracleError(f"{source} answered with {bad} NaN/inf values; these are never used")
    return np.ascontiguousarray(A)
