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
    assert c is not None and 0 < r <= region.depth * (1 + 1e-9)
    # the LP's solution, to its feasibility tolerance (1e-7 for HiGHS) on these O(1) rows
    assert abs(g @ c + g0) <= 1e-7 * np.linalg.norm(g)
    assert np.all(region.A @ c + region.c - region.margin >= r * np.linalg.norm(region.A, axis=1) - 1e-7)
    lo, hi = _span(region, c, g / np.linalg.norm(g))
    assert lo <= -r * (1 - 1e-6) and hi >= r * (1 - 1e-6)  # the ball fits along the line both ways
