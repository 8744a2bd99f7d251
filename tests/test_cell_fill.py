"""The weights a pieced-together row lacks, read in cells where they are on (relux.attack.cell_fill)."""

from __future__ import annotations

import numpy as np
from test_pattern_layer import _victim

from relux.attack import prefix as pfx
from relux.attack.active_lines import pattern_region
from relux.attack.cell_fill import _crossing_ball, _span, fill_in_cells
from relux.attack.config import ExtractionConfig
from relux.oracle import CountingOracle, MLPOracle


def _kinks_where_off(prefix: list[tuple[np.ndarray, np.ndarray]], row: np.ndarray, off: np.ndarray,
                     rng: np.random.Generator, n: int = 6) -> np.ndarray:
    """Points on the boundary of the layer-3 neuron ``row`` (unit, bias last) where the layer-2
    neurons ``off`` are off: bisection on its pre-activation along random lines (the test knows the
    row; the attack is given only these points)."""
    def z(X: np.ndarray) -> np.ndarray:
        _, H = pfx.forward(prefix, X)
        return np.asarray(H @ row[:-1] + row[-1])

    out: list[np.ndarray] = []
    while len(out) < n:
        x0, u = rng.normal(size=20), rng.normal(size=20)
        t = np.linspace(-3, 3, 601)
        zs = z(x0 + t[:, None] * u)
        for i in np.flatnonzero(np.sign(zs[:-1]) != np.sign(zs[1:])):
            lo, hi = t[i], t[i + 1]
            for _ in range(80):
                mid = 0.5 * (lo + hi)
                lo, hi = (mid, hi) if np.sign(z((x0 + mid * u)[None])[0]) == np.sign(zs[i]) else (lo, mid)
            x = x0 + 0.5 * (lo + hi) * u
            _, H = pfx.forward(prefix, x[None])
            if not (H[0, off] > 0).any():
                out.append(x)
    return np.stack(out[:n])


def test_the_lacked_weights_are_read_exactly_in_a_cell_where_they_are_on() -> None:
    net, prefix, true = _victim(0)
    rng = np.random.default_rng(1)
    j, lacked = 2, np.array([1, 4, 9])
    seen = np.ones(16, dtype=bool)
    seen[lacked] = False
    w = np.where(seen, true[j, :-1], 0.0)
    points = _kinks_where_off(prefix, true[j], lacked, rng)
    oracle = CountingOracle(MLPOracle(net))
    f = fill_in_cells(oracle.query, prefix, w, float(true[j, -1]), seen, points, 20, ExtractionConfig(seed=0),
                      rng, 1e-9)
    assert f.seen.all(), f.reasons
    got = np.append(f.w, f.b)
    # one finite-difference gradient at an exact kink, scaled onto the weights known: exact to
    # rounding here (pattern_rows' pieces come within 1e-8, test_pattern_layer); 1e-9 leaves room
    assert 1.0 - abs(got @ true[j]) / np.linalg.norm(got) <= 1e-9
    assert np.array_equal(f.w[seen], w[seen]) and f.b == true[j, -1]  # the known weights stay as they were
    assert f.points and f.lines >= 1 and f.measured >= 1 and oracle.queries > 0


def test_a_whole_row_costs_nothing_and_a_false_one_is_not_filled() -> None:
    net, prefix, true = _victim(0)
    rng = np.random.default_rng(2)
    oracle = CountingOracle(MLPOracle(net))
    whole = fill_in_cells(oracle.query, prefix, true[0, :-1], float(true[0, -1]), np.ones(16, dtype=bool),
                          np.zeros((1, 20)), 20, ExtractionConfig(seed=0), rng, 1e-9)
    assert whole.seen.all() and oracle.queries == 0 and not whole.points
    # no kink to start from: nothing to do, and why
    none = fill_in_cells(oracle.query, prefix, np.where(np.arange(16) < 10, true[0, :-1], 0.0), float(true[0, -1]),
                         np.arange(16) < 10, np.zeros((0, 20)), 20, ExtractionConfig(seed=0), rng, 1e-9)
    assert not none.seen.all() and none.reasons == ("no kink of the row to start from",) and oracle.queries == 0
    # a row no neuron has: no kink's signature agrees with it on the weights it saw
    seen = np.arange(16) < 10
    w = np.where(seen, rng.normal(size=16), 0.0)
    pts = rng.normal(size=(3, 20))
    false = fill_in_cells(oracle.query, prefix, w, 0.1, seen, pts, 20, ExtractionConfig(seed=0), rng, 1e-9, tries=3)
    assert np.array_equal(false.seen, seen) and np.array_equal(false.w, w)
    assert len(false.reasons) == 3 and not false.points


def test_the_crossing_ball_is_centred_on_the_plane_and_inside_the_cell() -> None:
    _, prefix, _ = _victim(3)
    rng = np.random.default_rng(0)
    region = None
    while region is None:
        x = rng.normal(size=20)
        Z, _ = pfx.forward(prefix, x[None])
        region = pattern_region(prefix, 3.0, Z[1][0] > 0, (Z[0][0] > 0,))
    g = rng.normal(size=20)
    g0 = -float(g @ region.centre)  # a plane through the cell's deepest point
    r, c = _crossing_ball(region, g, g0)
    # a ball on the plane is no larger than the largest ball (up to the LP's relative tolerance)
    assert c is not None and 0 < r <= region.depth * (1 + 1e-9)
    # the LP's solution, to its feasibility tolerance (1e-7 for HiGHS) on these O(1) rows
    assert abs(g @ c + g0) <= 1e-7 * np.linalg.norm(g)
    assert np.all(region.A @ c + region.c - region.margin >= r * np.linalg.norm(region.A, axis=1) - 1e-7)
    lo, hi = _span(region, c, g / np.linalg.norm(g))
    # the ball fits along the line both ways (up to the LP's 1e-7 slack, relative to r of about 0.1-1)
    assert lo <= -r * (1 - 1e-6) and hi >= r * (1 - 1e-6)


def _partial(j: int, lacked: np.ndarray, noise: float, seed: int) -> tuple[object, list[tuple[np.ndarray, np.ndarray]],
                                                                         np.ndarray, np.ndarray, np.ndarray]:
    net, prefix, true = _victim(0)
    rng = np.random.default_rng(seed)
    seen = np.ones(16, dtype=bool)
    seen[lacked] = False
    w = np.where(seen, true[j, :-1] * (1.0 + noise * rng.standard_normal(16)), 0.0)
    return net, prefix, true, w, seen


def test_a_row_too_far_off_is_not_filled_and_a_slightly_off_one_says_so() -> None:
    lacked = np.array([1, 4, 9])
    # known weights 1e-2 off (1 - |cos| about 1e-4, above MATCH_TOL = 1e-5): kinks are measured, but
    # none is recognised as the row's, so nothing is filled
    net, prefix, true, w, seen = _partial(2, lacked, 1e-2, 5)
    points = _kinks_where_off(prefix, true[2], lacked, np.random.default_rng(1))
    far = fill_in_cells(MLPOracle(net).query, prefix, w, float(true[2, -1]), seen, points, 20,
                        ExtractionConfig(seed=0), np.random.default_rng(1), 1e-9)
    assert far.measured > 0 and np.array_equal(far.seen, seen) and np.array_equal(far.w, w)
    # 1e-4 off (1 - |cos| about 1e-8): recognised and filled, and the residual shows the error (7e-7
    # here; an exact row's is the finite differences' error, 4e-12 here, so 1e-7 tells them apart)
    net, prefix, true, w, seen = _partial(2, lacked, 1e-4, 5)
    near = fill_in_cells(MLPOracle(net).query, prefix, w, float(true[2, -1]), seen, points, 20,
                         ExtractionConfig(seed=0), np.random.default_rng(1), 1e-9)
    assert near.seen.all() and near.residual >= 1e-7
    net, prefix, true, w, seen = _partial(2, lacked, 0.0, 5)
    exact = fill_in_cells(MLPOracle(net).query, prefix, w, float(true[2, -1]), seen, points, 20,
                          ExtractionConfig(seed=0), np.random.default_rng(1), 1e-9)
    assert exact.seen.all() and exact.residual <= 1e-10  # 4e-12, with room
