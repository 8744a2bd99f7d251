"""The dense primal simplex of :mod:`relux.attack.simplex`, against HiGHS on the same linear programs."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import linprog

from relux.attack.active_lines import largest_ball, vertex
from relux.attack.simplex import FACE, dense_vertex


def _polytope(seed: int, d: int, m: int, box: float = 3.0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``A x + c ≥ margin`` with ``m`` random rows through a ball around a random point, its largest
    ball's centre (strictly inside), and the margin (zero)."""
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((m, d))
    x0 = rng.uniform(-0.5, 0.5, size=d) * box
    c = -A @ x0 + rng.uniform(0.05, 1.0, size=m) * np.linalg.norm(A, axis=1)
    margin = np.zeros(m)
    _, centre = largest_ball(A, c, margin, box)
    assert centre is not None
    return A, c, margin, centre


def _highs_value(A: np.ndarray, c: np.ndarray, margin: np.ndarray, box: float, g: np.ndarray) -> float:
    res = linprog(-g, A_ub=-A, b_ub=c - margin, bounds=[(-box, box)] * A.shape[1], method="highs")
    assert res.status == 0
    return float(-res.fun)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), d=st.integers(1, 12), extra=st.integers(0, 40))
def test_dense_vertex_reaches_highs_optimum(seed: int, d: int, extra: int) -> None:
    A, c, margin, centre = _polytope(seed, d, d + extra)
    g = np.random.default_rng(seed + 1).standard_normal(d)
    x, info = dense_vertex(A, c, margin, 3.0, g, centre)
    assert x is not None, info.reason
    res = linprog(-g, A_ub=-A, b_ub=c - margin, bounds=[(-3.0, 3.0)] * d, method="highs")
    # the unique optimum (every multiplier positive): HiGHS's point, to its 1e-7 feasibility tolerance
    np.testing.assert_allclose(x, res.x, atol=1e-6)
    # feasible, to rounding (1e-9 of the box's diagonal: simplex.FEAS_TOL)
    assert np.all(A @ x + c - margin >= -1e-9 * 6.0 * np.sqrt(d) * np.linalg.norm(A, axis=1))
    assert np.all(np.abs(x) <= 3.0 * (1 + 1e-12))


def test_dense_vertex_is_a_vertex() -> None:
    """``d`` constraints meet at the point returned (it solves its basis)."""
    A, c, margin, centre = _polytope(3, 8, 30)
    x, info = dense_vertex(A, c, margin, 3.0, np.arange(1.0, 9.0), centre)
    assert x is not None and info.reason == ""
    nrm = np.linalg.norm(A, axis=1)
    tight = int(np.sum(np.abs(A @ x + c - margin) <= 1e-9 * nrm)) + int(np.sum(np.abs(np.abs(x) - 3.0) <= 1e-9))
    assert tight >= 8
    assert info.crash_steps == 8


def test_a_face_is_left_to_highs() -> None:
    """Where the optimum is a face (``x_0`` at its bound: a facet of the box; or a neuron of the region
    lowest), which of its vertices a solver returns is its own choice: none is returned."""
    start = np.array([0.0, 0.1, -0.2, 0.3])
    x, info = dense_vertex(np.zeros((0, 4)), np.zeros(0), np.zeros(0), 1.0, np.eye(4)[0], start)
    assert x is None and info.reason == FACE
    A, c, margin, centre = _polytope(7, 6, 20)
    x, info = dense_vertex(A, c, margin, 3.0, -A[3], centre)
    assert x is None and info.reason == FACE


def test_start_outside_is_refused() -> None:
    A, c, margin, _ = _polytope(5, 3, 10)
    x, info = dense_vertex(A, c, margin, 3.0, np.ones(3), np.full(3, 50.0))
    assert x is None and "start" in info.reason
    x, info = dense_vertex(A, c, margin, 3.0, np.zeros(3), np.zeros(3))
    assert x is None and "zero" in info.reason


def test_vertex_falls_back_and_agrees() -> None:
    """:func:`vertex` with a start gives HiGHS's optimal value; with a start outside it still solves it."""
    A, c, margin, centre = _polytope(11, 10, 40)
    g = np.random.default_rng(0).standard_normal(10)
    best = _highs_value(A, c, margin, 3.0, g)
    for start in (centre, np.full(10, 99.0)):
        x = vertex(A, c, 3.0, margin, g, start=start)
        assert x is not None
        assert float(g @ x) == pytest.approx(best, rel=1e-6, abs=1e-6)


def test_degenerate_vertex_terminates() -> None:
    """Many constraints through one vertex (degenerate pivots): Bland's rule ends them."""
    d = 6
    rng = np.random.default_rng(2)
    # 30 planes through the point p, each decreasing along g (so p - 0.1 g is inside)
    p = np.full(d, 0.5)
    N = rng.standard_normal((30, d))
    g = np.ones(d)
    N = np.where((N @ g)[:, None] > 0, -N, N)
    c = -N @ p
    x, info = dense_vertex(N, c, np.zeros(30), 3.0, g, p - 0.1 * g)
    assert x is not None, info.reason
    # HiGHS's value, to its 1e-7 tolerance
    assert float(g @ x) == pytest.approx(_highs_value(N, c, np.zeros(30), 3.0, g), abs=1e-6)


@pytest.mark.parametrize("tilt", [1e-5, 1e-6, 1e-7, 1e-8])
def test_nearly_a_face_agrees_with_highs_or_is_left_to_it(tilt: float) -> None:
    """An objective a little off a facet's normal: its smallest multiplier may lie below HiGHS's own
    tolerance (1e-7), where HiGHS may stop at a neighbouring vertex (the session 37 review found them
    up to half the box apart). The dense simplex then answers only when HiGHS's point is its own."""
    A, c, margin, centre = _polytope(1, 20, 120)
    rng = np.random.default_rng(1)
    for _ in range(12):
        g = -A[int(rng.integers(120))]
        g = g / np.linalg.norm(g) + tilt * rng.standard_normal(20)
        x, info = dense_vertex(A, c, margin, 3.0, g, centre)
        if x is None:
            assert info.reason == FACE
            continue
        res = linprog(-g, A_ub=-A, b_ub=c - margin, bounds=[(-3.0, 3.0)] * 20, method="highs")
        np.testing.assert_allclose(x, res.x, atol=1e-6)  # HiGHS's 1e-7 tolerance, on a box of 3
