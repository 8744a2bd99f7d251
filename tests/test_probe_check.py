"""Probe segments across a hyperplane, checked for unseen boundaries (relux.attack.probe_check)."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from relux.attack.probe_check import OFFSETS, choose_radii, line_is_clean

OFF = np.asarray(OFFSETS)


def _two_pieces(t: np.ndarray, c: np.ndarray, a: np.ndarray, g: np.ndarray, t0: float) -> np.ndarray:
    """``f(t) = a + g t + c relu(t - t0)`` per output: one kink at ``t0``."""
    out: np.ndarray = a[None, :] + np.outer(t, g) + np.outer(np.maximum(t - t0, 0.0), c)
    return out


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), k=st.integers(1, 10))
def test_a_single_kink_near_the_middle_is_clean(seed: int, k: int) -> None:
    rng = np.random.default_rng(seed)
    r = float(rng.uniform(1e-3, 1.0))
    c, a, g = rng.normal(size=k), rng.normal(size=k), rng.normal(size=k)
    F = _two_pieces(OFF * r, c, a, g, float(rng.uniform(-0.05, 0.05)) * r)
    # rounding of a few float64 operations on values of order 1: 64 eps of the largest value covers it
    assert line_is_clean(F, r, 64 * np.finfo(float).eps * float(np.max(np.abs(F))))


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), k=st.integers(1, 10), where=st.sampled_from(["side", "middle"]))
def test_a_second_kink_on_the_segment_is_caught(seed: int, k: int, where: str) -> None:
    """Another neuron's kink, between two probe points on one side or in the middle gap, with a jump of
    at least 1e-3 of the first: the line is not two affine pieces meeting at the hyperplane.

    In the middle gap with one output, a small second jump only moves the apparent meeting point a
    little (by ``c2 t1 / (c + c2)``), which the check cannot tell from the estimate's own error: that
    case is left to the agreement of two measurements, and not asserted here."""
    if where == "middle" and k == 1:
        return
    rng = np.random.default_rng(seed)
    r = float(rng.uniform(1e-3, 1.0))  # the check must not weaken with the radius
    c, a, g = rng.normal(size=k), rng.normal(size=k), rng.normal(size=k)
    t1 = float(rng.uniform(0.55, 0.7) if where == "side" else rng.uniform(0.2, 0.45)) * float(rng.choice([-1, 1])) * r
    c2 = rng.normal(size=k)
    c2 *= float(rng.uniform(1e-3, 1.0)) * float(np.linalg.norm(c)) / float(np.linalg.norm(c2))
    t = OFF * r
    F = _two_pieces(t, c, a, g, 0.0) + np.outer(np.maximum(t - t1, 0.0), c2)
    assert not line_is_clean(F, r, 64 * np.finfo(float).eps * float(np.max(np.abs(F))))


def test_choose_radii_shrinks_past_a_nearby_boundary() -> None:
    """A hyperplane ``x_0 = 0`` and a second kink at ``x_0 = 0.3``: the radius 1 segment crosses it, the
    radius 1/4 one does not; a row far from any other kink keeps its full radius."""
    c, c2 = np.array([1.0, -2.0]), np.array([0.5, 1.5])

    def f(X: np.ndarray) -> np.ndarray:
        out: np.ndarray = np.outer(np.maximum(X[:, 0], 0.0), c) + np.outer(np.maximum(X[:, 0] - 0.3, 0.0), c2)
        return out + np.outer(X[:, 1], c2)

    bases = np.zeros((2, 2))
    normals = np.array([[1.0, 0.0], [1.0, 0.0]])
    got = choose_radii(f, bases, normals, np.array([1.0, 0.25]))
    assert got.clean.all()
    assert list(got.radii) == [0.25, 0.25]
    assert got.queries == 2 * 3 * 6
