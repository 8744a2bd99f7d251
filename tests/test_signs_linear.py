"""The last-layer sign solve with rows on (or off) at every fit point (relux.attack.signs: ``solve_flips``
with ``linear``, ``linear_row_signs``)."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from relux.attack.signs import linear_row_signs, solve_flips


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), m=st.integers(3, 12), n_on=st.integers(1, 3), k=st.integers(1, 3))
def test_rows_on_everywhere_add_a_free_linear_term_and_the_others_signs_are_exact(
    seed: int, m: int, n_on: int, k: int
) -> None:
    """A row on at every fit point contributes ``e ŵ`` to the affine term (``e = α`` when its sign
    is right, 0 when not), with ``e`` unknown: the solve must allow it, and then finds the other
    rows' flips exactly. Without it, that term reads as flips no 0/1 vector explains."""
    rng = np.random.default_rng(seed)
    p = m + n_on + 4  # more layer-input coordinates than rows: the columns are independent
    W = rng.normal(size=(m, p))
    L = rng.normal(size=(n_on, p))
    alpha = rng.normal(size=(k, m))
    t = rng.random(m) < 0.5
    e = rng.normal(size=(k, n_on)) * (rng.random(n_on) < 0.5)
    gamma = -(alpha * t) @ W + e @ L
    sol = solve_flips(alpha, gamma, W, 16, linear=L)
    assert sol.ok, sol.reason
    assert np.array_equal(sol.flips, t)
    if np.abs(e).max() > 1e-3:
        plain = solve_flips(alpha, gamma, W, 16)
        assert not plain.ok or not np.array_equal(plain.flips, t)


def test_dependent_rows_on_everywhere_are_projected_off_as_one() -> None:
    """Two such rows with the same weights (dependent columns): their span is found all the same."""
    rng = np.random.default_rng(3)
    W = rng.normal(size=(5, 12))
    row = rng.normal(size=12)
    L = np.stack([row, 2.0 * row, rng.normal(size=12)])
    alpha = rng.normal(size=(2, 5))
    t = np.array([True, False, True, True, False])
    gamma = -(alpha * t) @ W + rng.normal(size=(2, 3)) @ L
    sol = solve_flips(alpha, gamma, W, 16, linear=L)
    assert sol.ok and np.array_equal(sol.flips, t)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), m=st.integers(2, 10), n_lin=st.integers(1, 3), k=st.integers(1, 3))
def test_rows_on_or_off_everywhere_are_signed_by_what_the_solved_rows_leave(
    seed: int, m: int, n_lin: int, k: int
) -> None:
    """A row on at every fit point adds ``a ŵ`` to the affine term when its sign is right and nothing
    when not; a row off at every point adds ``-a ŵ`` when its sign is wrong (``-ẑ`` is then on) and
    nothing when right. After the binary solve, what is left decides each such sign exactly."""
    rng = np.random.default_rng(seed)
    p = m + n_lin + 4
    W = rng.normal(size=(m, p))
    L = rng.normal(size=(n_lin, p))
    alpha = rng.normal(size=(k, m))
    a = rng.normal(size=(k, n_lin))  # the lin rows' true output weights, of the same scale as alpha
    t = rng.random(m) < 0.5
    on = rng.random(n_lin) < 0.5
    wrong = rng.random(n_lin) < 0.5
    e = np.where(on & ~wrong, 1.0, 0.0) - np.where(~on & wrong, 1.0, 0.0)
    gamma = -(alpha * t) @ W + (a * e) @ L
    sol = solve_flips(alpha, gamma, W, 16, linear=L)
    assert sol.ok and np.array_equal(sol.flips, t)
    ls = linear_row_signs(alpha, gamma, W, sol.flips, L, on)
    assert ls.reason == ""
    assert np.array_equal(ls.flips, wrong)
    # e is a normal-sized vector or exactly 0: both sit at least three decades from the 1e-6 threshold
    # unless a drawn output weight is tiny, which these draws make rare
    assert np.all(ls.confidence[np.abs(a).max(axis=0) > 1e-2] > 0.9)


def test_dependent_rows_on_everywhere_stay_open() -> None:
    """Two such rows with the same weights: their terms cannot be told apart, so no sign is decided."""
    rng = np.random.default_rng(4)
    W = rng.normal(size=(4, 10))
    row = rng.normal(size=10)
    L = np.stack([row, -3.0 * row])
    alpha = rng.normal(size=(2, 4))
    t = np.array([True, False, False, True])
    gamma = -(alpha * t) @ W + rng.normal(size=(2, 1)) * row[None, :]
    ls = linear_row_signs(alpha, gamma, W, t, L, np.array([True, False]))
    assert "dependent" in ls.reason
    assert not ls.flips.any() and not ls.confidence.any()
