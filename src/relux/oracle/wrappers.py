"""Composable oracle wrappers: counting, budgets, caching, and controlled degradations.

Each wrapper holds its own state; nothing is global. Wrap in the order you want the effects, e.g.
``CountingOracle(BudgetOracle(CachingOracle(victim), limit))`` counts every row the attack asks for,
while the budget only sees rows that missed the cache.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np

from relux.errors import BudgetExhausted, InputError
from relux.oracle.base import FloatArray, Oracle, OutputKind, as_query_batch


class OracleWrapper:
    """Forwards the protocol to ``inner``; subclasses override :meth:`query`."""

    def __init__(self, inner: Oracle) -> None:
        self.inner = inner

    @property
    def input_dim(self) -> int:
        return self.inner.input_dim

    @property
    def output_dim(self) -> int:
        return self.inner.output_dim

    @property
    def output_kind(self) -> OutputKind:
        return self.inner.output_kind

    def query(self, X: FloatArray) -> FloatArray:
        return self.inner.query(X)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.inner!r})"


class CountingOracle(OracleWrapper):
    """Counts the rows (queries) and calls (batches) that pass through. Thread-safe."""

    def __init__(self, inner: Oracle) -> None:
        super().__init__(inner)
        self._lock = threading.Lock()
        self.queries = 0
        self.calls = 0

    def query(self, X: FloatArray) -> FloatArray:
        A = as_query_batch(X, self.input_dim)
        Y = self.inner.query(A)
        with self._lock:
            self.queries += A.shape[0]
            self.calls += 1
        return Y


class BudgetOracle(OracleWrapper):
    """Refuses, with :class:`BudgetExhausted`, any batch that would take the total past ``budget`` rows."""

    def __init__(self, inner: Oracle, budget: int) -> None:
        super().__init__(inner)
        if int(budget) < 0:
            raise InputError(f"a query budget must be >= 0, found {budget}")
        self.budget = int(budget)
        self.used = 0
        self._lock = threading.Lock()

    def query(self, X: FloatArray) -> FloatArray:
        A = as_query_batch(X, self.input_dim)
        with self._lock:
            if self.used + A.shape[0] > self.budget:
                raise BudgetExhausted(
                    f"query budget exhausted: {self.used} of {self.budget} queries used and the next batch "
                    f"needs {A.shape[0]}; raise --budget to continue",
                    queries=self.used,
                    budget=self.budget,
                )
            self.used += A.shape[0]
        return self.inner.query(A)

    @property
    def remaining(self) -> int:
        return self.budget - self.used


class CachingOracle(OracleWrapper):
    """Answers repeated points from an LRU cache keyed on the exact bytes of each row."""

    def __init__(self, inner: Oracle, max_entries: int = 1_000_000) -> None:
        super().__init__(inner)
        if max_entries < 1:
            raise InputError(f"cache size must be >= 1, found {max_entries}")
        self.max_entries = max_entries
        self._cache: OrderedDict[bytes, FloatArray] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def query(self, X: FloatArray) -> FloatArray:
        A = as_query_batch(X, self.input_dim)
        keys = [row.tobytes() for row in A]
        out = np.empty((A.shape[0], self.output_dim), dtype=np.float64)
        missing: dict[bytes, list[int]] = {}
        with self._lock:
            for i, k in enumerate(keys):
                hit = self._cache.get(k)
                if hit is not None:
                    self._cache.move_to_end(k)
                    out[i] = hit
                    self.hits += 1
                else:
                    missing.setdefault(k, []).append(i)
        if missing:
            first = [idx[0] for idx in missing.values()]
            Y = self.inner.query(A[first])
            with self._lock:
                for (k, idx), y in zip(missing.items(), Y, strict=True):
                    out[idx] = y
                    self._cache[k] = y.copy()
                    self.misses += 1
                while len(self._cache) > self.max_entries:
                    self._cache.popitem(last=False)
        return out


class Float32Oracle(OracleWrapper):
    """Simulates float32 inference: inputs and outputs are cast through float32."""

    def query(self, X: FloatArray) -> FloatArray:
        A = as_query_batch(X, self.input_dim).astype(np.float32).astype(np.float64)
        return self.inner.query(A).astype(np.float32).astype(np.float64)


class RoundingOracle(OracleWrapper):
    """Rounds every output to ``decimals`` decimal places, as some prediction APIs do."""

    def __init__(self, inner: Oracle, decimals: int) -> None:
        super().__init__(inner)
        self.decimals = int(decimals)

    def query(self, X: FloatArray) -> FloatArray:
        return np.round(self.inner.query(X), self.decimals)


class NoisyOracle(OracleWrapper):
    """Adds i.i.d. Gaussian noise of standard deviation ``sigma`` to every output."""

    def __init__(self, inner: Oracle, sigma: float, rng: np.random.Generator) -> None:
        super().__init__(inner)
        if not sigma >= 0:
            raise InputError(f"noise sigma must be >= 0, found {sigma}")
        self.sigma = float(sigma)
        self.rng = rng
        self._lock = threading.Lock()

    def query(self, X: FloatArray) -> FloatArray:
        Y = self.inner.query(X)
        with self._lock:
            noise = self.rng.normal(0.0, self.sigma, size=Y.shape)
        return Y + noise


def unwrap(oracle: Oracle, kind: type) -> object | None:
    """Find the first wrapper of type ``kind`` in a chain of wrappers (or ``None``)."""
    cur: object = oracle
    while True:
        if isinstance(cur, kind):
            return cur
        if isinstance(cur, OracleWrapper):
            cur = cur.inner
        else:
            return None
