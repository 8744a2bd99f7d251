"""The oracle protocol and its composable wrappers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from relux.errors import BudgetExhausted, InputError, OracleError
from relux.model import MLP
from relux.oracle import (
    BudgetOracle,
    CachingOracle,
    CallableOracle,
    CountingOracle,
    Float32Oracle,
    MLPOracle,
    NoisyOracle,
    Oracle,
    OutputKind,
    RoundingOracle,
    load_callable,
    unwrap,
)


def _victim() -> MLP:
    rng = np.random.default_rng(0)
    return MLP([(rng.normal(size=(5, 3)), rng.normal(size=5)), (rng.normal(size=(2, 5)), rng.normal(size=2))])


def test_mlp_oracle_is_an_oracle_and_exact() -> None:
    m = _victim()
    o = MLPOracle(m)
    assert isinstance(o, Oracle)
    assert (o.input_dim, o.output_dim, o.output_kind) == (3, 2, OutputKind.LOGITS)
    X = np.random.default_rng(1).normal(size=(7, 3))
    # the oracle is the model's own forward pass: bit-identical
    assert np.array_equal(o.query(X), m.forward(X))


def test_counting_counts_rows_and_calls() -> None:
    o = CountingOracle(MLPOracle(_victim()))
    o.query(np.zeros((4, 3)))
    o.query(np.ones((1, 3)))
    assert (o.queries, o.calls) == (5, 2)


def test_budget_refuses_past_the_limit_and_keeps_count() -> None:
    o = BudgetOracle(MLPOracle(_victim()), budget=5)
    o.query(np.zeros((3, 3)))
    with pytest.raises(BudgetExhausted) as err:
        o.query(np.zeros((3, 3)))
    assert err.value.queries == 3 and err.value.budget == 5
    assert "budget" in str(err.value)
    o.query(np.zeros((2, 3)))
    assert o.remaining == 0
    with pytest.raises(InputError):
        BudgetOracle(MLPOracle(_victim()), budget=-1)


def test_cache_answers_repeats_without_asking() -> None:
    counter = CountingOracle(MLPOracle(_victim()))
    cache = CachingOracle(counter)
    X = np.random.default_rng(2).normal(size=(4, 3))
    Y1 = cache.query(np.concatenate([X, X[:2]]))
    assert counter.queries == 4  # duplicates inside one batch are asked once
    Y2 = cache.query(X)
    assert counter.queries == 4 and cache.hits == 4 and cache.misses == 4
    assert np.array_equal(Y1[:4], Y2) and np.array_equal(Y1[4:], Y2[:2])


def test_cache_evicts_least_recently_used() -> None:
    counter = CountingOracle(MLPOracle(_victim()))
    cache = CachingOracle(counter, max_entries=2)
    a, b, c = np.eye(3)
    cache.query(np.stack([a, b]))
    cache.query(c[None])  # evicts a
    cache.query(a[None])
    assert counter.queries == 4


def test_degradations() -> None:
    base = MLPOracle(_victim())
    X = np.random.default_rng(3).normal(size=(5, 3))
    Y = base.query(X)
    Y32 = Float32Oracle(base).query(X)
    assert np.array_equal(Y32, Y32.astype(np.float32).astype(np.float64))
    # float32 rounding of inputs and outputs: relative error of a few float32 ulps
    assert np.max(np.abs(Y32 - Y)) <= 1e-5 * (1 + np.max(np.abs(Y)))
    Yr = RoundingOracle(base, 2).query(X)
    assert np.array_equal(Yr, np.round(Y, 2))
    Yn = NoisyOracle(base, 1e-3, np.random.default_rng(0)).query(X)
    assert 0 < np.max(np.abs(Yn - Y)) < 1e-2  # 5 sigma of N(0, 1e-3) over 10 draws is 5e-3


def test_wrappers_compose_and_unwrap() -> None:
    chain = CountingOracle(BudgetOracle(CachingOracle(MLPOracle(_victim())), 100))
    chain.query(np.zeros((3, 3)))
    assert isinstance(unwrap(chain, BudgetOracle), BudgetOracle)
    assert unwrap(chain, NoisyOracle) is None
    assert chain.input_dim == 3 and chain.output_dim == 2


def test_callable_oracle_validates_answers() -> None:
    good = CallableOracle(lambda X: X[:, :2], 3, 2)
    assert good.query(np.ones((2, 3))).shape == (2, 2)
    with pytest.raises(OracleError, match="shape"):
        CallableOracle(lambda X: X, 3, 2).query(np.ones((2, 3)))
    with pytest.raises(OracleError, match="NaN"):
        CallableOracle(lambda X: np.full((len(X), 2), np.nan), 3, 2).query(np.ones((2, 3)))
    with pytest.raises(InputError):
        good.query(np.ones((2, 4)))


def test_load_callable_from_file_and_module(tmp_path: Path) -> None:
    f = tmp_path / "victim.py"
    f.write_text("import numpy as np\n\ndef f(X):\n    return X.sum(axis=1, keepdims=True)\n")
    fn = load_callable(f"{f}:f")
    assert np.array_equal(fn(np.ones((2, 3))), [[3.0], [3.0]])
    assert load_callable("numpy:sum") is np.sum
    for bad in ("nofile.py:f", f"{f}:missing", "no_colon", f"{f}:1bad"):
        with pytest.raises(InputError):
            load_callable(bad)
