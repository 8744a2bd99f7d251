"""A kink from four samples and its two-query check (:func:`relux.attack.polish.side_kink`,
:func:`relux.attack.polish.single_kink`)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relux.attack import prefix as pfx
from relux.attack.polish import (
    KINK_CHECK,
    SIDE_OFFSETS,
    boundary_points,
    estimated_boundary_points,
    kink_checks,
    side_kink,
    single_kink,
)
from relux.oracle import MLPOracle
from relux.zoo import random_mlp

HALF = 1.0  # the bracket's half-width: the samples sit at HALF * SIDE_OFFSETS


def _f(t: np.ndarray, base: np.ndarray, slope: np.ndarray, kinks: list[tuple[float, np.ndarray]]) -> np.ndarray:
    """A piecewise-linear function of ``t`` with vector values: ``base + slope t + sum_k j_k relu(t - a_k)``."""
    t = np.atleast_1d(np.asarray(t, dtype=float))
    y = base[None, :] + t[:, None] * slope[None, :]
    for a, j in kinks:
        y = y + np.maximum(t - a, 0.0)[:, None] * j[None, :]
    return y


def _vec(draw: st.DrawFn, k: int, lo: float, hi: float) -> np.ndarray:
    """A vector of ``k`` entries of magnitude in ``[lo, hi]`` with random signs."""
    mags = draw(st.lists(st.floats(lo, hi), min_size=k, max_size=k))
    signs = draw(st.lists(st.sampled_from([-1.0, 1.0]), min_size=k, max_size=k))
    return np.array(mags) * np.array(signs)


@st.composite
def _pieces(draw: st.DrawFn, n_kinks: int) -> tuple[np.ndarray, np.ndarray, list[tuple[float, np.ndarray]]]:
    k = draw(st.integers(1, 4))
    base, slope = _vec(draw, k, 0.1, 10.0), _vec(draw, k, 0.0, 10.0)
    # the first kink inside the middle interval (-0.3, 0.3), the others anywhere in the bracket
    kinks = [(draw(st.floats(-0.29, 0.29) if i == 0 else st.floats(-0.99, 0.99)), _vec(draw, k, 1e-2, 10.0))
             for i in range(n_kinks)]
    return base, slope, kinks


@settings(max_examples=200, deadline=None)
@given(_pieces(1))
def test_one_kink_is_accepted_where_it_is(case: tuple[np.ndarray, np.ndarray, list[tuple[float, np.ndarray]]]) -> None:
    base, slope, kinks = case
    T = HALF * np.asarray(SIDE_OFFSETS)
    t = side_kink(T, _f(T, base, slope, kinks))
    assert t is not None
    # the two side lines meet at the kink up to rounding: jumps of at least 1e-2 against values of at
    # most about 50 place it to well within 1e-9 of the bracket
    assert abs(t - kinks[0][0]) <= 1e-9 * HALF
    assert single_kink(T, _f(T, base, slope, kinks), t, _f(kink_checks(T, t), base, slope, kinks))


@settings(max_examples=300, deadline=None)
@given(_pieces(2))
def test_second_kink_is_rejected_or_the_point_is_on_one(
    case: tuple[np.ndarray, np.ndarray, list[tuple[float, np.ndarray]]],
) -> None:
    """Accepted only where the point found lies within about ``KINK_CHECK`` of the bracket of one of
    the kinks, wherever the second one is (single_kink's docstring gives the three cases)."""
    base, slope, kinks = case
    T = HALF * np.asarray(SIDE_OFFSETS)
    Y = _f(T, base, slope, kinks)
    t = side_kink(T, Y)
    if t is None:
        return
    rel = 1e-7
    if single_kink(T, Y, t, _f(kink_checks(T, t), base, slope, kinks), rel=rel):
        near = min(abs(t - a) for a, _ in kinks)
        # twice the check points' gap (a kink between the point and a check point is not seen), and 4 rel
        # (the vector case reads the distance through the jumps' angle); 1e-12: rounding of values up
        # to about 50
        assert near <= (2 * KINK_CHECK + 4 * rel) * HALF + 1e-12


def test_two_kinks_apart_are_rejected() -> None:
    """The case seen behind the CIFAR victim's first layer: two kinks inside the middle interval, about
    a tenth of the bracket apart."""
    T = HALF * np.asarray(SIDE_OFFSETS)
    base, slope = np.array([1.0, -2.0]), np.array([0.5, 0.25])
    kinks = [(-0.19, np.array([0.3, -0.1])), (0.02, np.array([-0.2, 0.4]))]
    Y = _f(T, base, slope, kinks)
    t = side_kink(T, Y)
    assert t is not None
    assert not single_kink(T, Y, t, _f(kink_checks(T, t), base, slope, kinks))


@pytest.mark.parametrize("seed", range(5))
def test_a_single_kink_in_a_narrow_bracket_where_f_nearly_cancels_is_accepted(seed: int) -> None:
    """A bracket of half-width 1e-9 where ``f`` (two outputs of a small affine map plus one ReLU, of
    inputs of size about 10) nearly cancels: rounding in the map's sums moves ``f`` by about 1e-15,
    while ``rel`` times the half-width times the slope change is about 1e-16. The floor must go with
    the size of the sums (``f_scale``, which :func:`boundary_points` takes over all its brackets),
    not with ``|f|`` in this bracket."""
    rng = np.random.default_rng(seed)
    d, half = 8, 1e-9
    p, n = 3.0 * rng.normal(size=d), rng.normal(size=d)
    n /= np.linalg.norm(n)
    w, v = rng.normal(size=(2, d)), rng.normal(size=d)
    a = 0.1 * half
    e, c0 = -float(v @ (p + a * n)), -(w @ p)  # the kink at t = a, f = 0 at t = 0

    def f(t: np.ndarray) -> np.ndarray:
        X = p[None, :] + np.asarray(t)[:, None] * n[None, :]
        out: np.ndarray = X @ w.T + c0 + 1.3 * np.maximum(X @ v + e, 0.0)[:, None] * np.array([1.0, -0.5])
        return out

    T = half * np.asarray(SIDE_OFFSETS)
    Y = f(T)
    t = side_kink(T, Y)
    assert t is not None
    yc = f(kink_checks(T, t))
    assert single_kink(T, Y, t, yc, f_scale=float(np.max(np.abs(w @ p))))
    # the floor taken from |f| in this bracket alone is below the rounding (why f_scale exists)
    assert not single_kink(T, Y, t, yc)


def test_boundary_points_lie_on_the_boundary_among_many_kinks() -> None:
    """Second-layer rows' boundary points behind a first layer of 16, with brackets wide enough that
    deeper neurons' kinks often fall inside them: every point returned is on the row's true boundary.
    (Six samples and no check, session 30's code, left 48 of 219 points off it.)"""
    victim = random_mlp((10, 16, 40, 200, 200, 1), np.random.default_rng(3))
    layers = [victim.layers[0]]
    W2, b2 = victim.layers[1]
    rng = np.random.default_rng(0)
    total = 0
    for j in range(4):
        anchors = estimated_boundary_points(layers, W2[j], float(b2[j]), 10, 1.0, rng)
        pts, _ = boundary_points(MLPOracle(victim).query, layers, W2[j], float(b2[j]), anchors, 100,
                                 float(np.sqrt(10)), rng, bracket=0.01)
        total += pts.shape[0]
        _, H = pfx.forward(layers, pts)
        z = np.abs(H @ W2[j] + b2[j]) / (np.linalg.norm(H, axis=1) * np.linalg.norm(W2[j]) + abs(b2[j]))
        # exact kinks from float64 pieces: a relative residual of a few eps times the conditioning; a
        # point placed by two kinks in one bracket is off by a fraction of the bracket (1e-3 and more)
        assert float(np.max(z, initial=0.0)) < 1e-10
    assert total >= 100  # measured: 170 of 400
