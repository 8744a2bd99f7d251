"""Per-coordinate repair of a first-layer gradient jump (relux.attack.column_repair)."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from relux.attack.column_repair import repair_columns, suspect_columns


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), k=st.integers(2, 10), n_bad=st.integers(0, 12))
def test_suspect_columns_are_exactly_the_contaminated_ones(seed: int, k: int, n_bad: int) -> None:
    """A rank-one jump with rounding-sized noise, plus ``n_bad`` columns carrying another neuron's jump
    (a random output vector): those columns, and only those, are flagged."""
    rng = np.random.default_rng(seed)
    d = 200
    c, w = rng.normal(size=k), rng.normal(size=d)
    inv = 1.0 / rng.uniform(1e-4, 1e-2, size=d) * 2.0
    delta = np.outer(c, w) + 1e-16 * inv * rng.normal(size=(k, d))  # rounding ~ eps / step
    bad = rng.choice(d, size=n_bad, replace=False)
    # another neuron's jump: a random output direction, at least 1e-4 of the row; rounding is ~1e-12, so
    # the jump escapes only if it lies within ~1e-6 rad of c (a chance of about 1e-6 per column)
    delta[:, bad] += rng.normal(size=(k, n_bad)) * rng.uniform(1e-4, 1.0, size=n_bad)
    got = suspect_columns(delta[None], inv[None], np.array([1.0]))[0]  # |f| ~ 1: rounding ~ eps / step
    assert set(np.flatnonzero(got)) == set(bad.tolist())


def test_one_output_flags_nothing() -> None:
    """With a single output every jump is rank one: the test has no information and flags nothing."""
    rng = np.random.default_rng(0)
    assert not suspect_columns(rng.normal(size=(3, 1, 50)), np.ones((3, 50)), np.ones(3)).any()


def test_repair_remeasures_a_crossed_coordinate() -> None:
    """A first-layer kink ``z = x_0 + (x_1 + ... + x_5) / 4`` and a deeper neuron's boundary
    ``x_1 = 0.3 - 1.2 (x_0 - 1/4)`` feeding other outputs. From ``x+`` (``x_0 = 1/4``) the step of 1/2
    along ``x_1`` crosses that boundary, from ``x-`` it does not; the repair's step of 1/16 crosses
    nothing, so the jump comes out exactly ``c ⊗ w`` (``f`` is piecewise linear, and forward
    differences of binary fractions that cross nothing are exact)."""
    c = np.array([1.0, 2.0, -1.0])
    c2 = np.array([3.0, -1.0, 0.5])
    d = 6
    w = np.array([1.0, 0.25, 0.25, 0.25, 0.25, 0.25])

    def f(X: np.ndarray) -> np.ndarray:
        deeper = np.maximum(X[:, 1] - 0.3 + 1.2 * (X[:, 0] - 0.25), 0.0)
        return np.outer(np.maximum(X @ w, 0.0), c) + np.outer(deeper, c2) + X[:, 2:3] - X[:, 3:4]

    X = np.zeros((2, d))
    X[:, 0] = [0.25, -0.25]
    steps = np.full((2, d), 0.5)
    steps[:, 0] = 0.125  # the known hyperplane bounds each step, as the refinement plans them
    F = f(X)
    G = np.stack([np.stack([(f(X[i:i + 1] + steps[i, j] * np.eye(d)[j]) - F[i])[0] / steps[i, j]
                            for j in range(d)], axis=1) for i in range(2)])
    want = np.outer(c, w)
    assert not np.array_equal(G[0] - G[1], want)  # column 1 carries the deeper neuron's jump
    G2, steps2, info = repair_columns(f, X, F, G, steps, 1)
    assert np.array_equal(G2[0] - G2[1], want)
    assert info.remeasured == (1,) and info.queries == 2 and info.rows_left == 0
    assert steps2[0, 1] == 0.0625 and steps2[1, 1] == 0.0625
