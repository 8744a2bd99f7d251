"""Row completion (:mod:`relux.attack.complete`) behind prefixes wider than the earlier tests' ones."""

from __future__ import annotations

import numpy as np
from test_boundary_points import _boundary_point

from relux.attack import prefix as pfx
from relux.attack.complete import _prefix_kink, _walk, complete_row
from relux.model import MLP
from relux.oracle import MLPOracle
from relux.zoo import random_mlp


def _half_seen_row(victim: MLP, j: int) -> tuple[list[pfx.Layer], np.ndarray, float, np.ndarray, np.ndarray]:
    """The last hidden layer's row ``j`` behind the layers before it, seen at one boundary point only:
    its weights on the coordinates off there (about half) are unknown. Returns the prefix, the true
    row and bias, which weights were seen, and the point."""
    layers = list(victim.layers[:-2])
    W, b = victim.layers[-2]
    a = _boundary_point(layers, W[j], float(b[j]), np.random.default_rng(1 + j), layers[0][0].shape[1])
    _, H = pfx.forward(layers, a[None, :])
    return layers, W[j], float(b[j]), H[0] > 0, a


def test_walks_behind_256_known_neurons_reach_their_level() -> None:
    """Behind 128 + 128 known neurons some walks need more than 64 steps (the old cap); with one step
    per known neuron allowed every one of these arrives: the row's estimated pre-activation still
    zero, the coordinate on, every other unknown coordinate still off."""
    layers, w_true, b, cov, a = _half_seen_row(random_mlp((60, 128, 128, 32, 1), np.random.default_rng(0)), 0)
    w = np.where(cov, w_true, 0.0)
    Z, _ = pfx.forward(layers, a[None, :])
    level = 0.1 * float(np.median(Z[-1][0][Z[-1][0] > 0]))
    scale = float(np.sqrt(60))
    capped = reached = 0
    for m in (int(k) for k in np.flatnonzero(~cov)):
        hold = [int(k) for k in np.flatnonzero(~cov) if k != m]
        capped += _walk(layers, a, w, m, hold, scale, level, max_steps=64) is None
        got = _walk(layers, a, w, m, hold, scale, level)
        assert got is not None
        Zp, Hp = pfx.forward(layers, got[0][None, :])
        # each step is exact prefix arithmetic; 200-odd steps of rounding stay far below 1e-9
        assert abs(float(w @ Hp[0] + b)) <= 1e-9 * float(np.linalg.norm(w) * np.linalg.norm(Hp[0]))
        assert Zp[-1][0, m] > 0
        assert not np.any(Hp[0][np.asarray(hold, dtype=int)] > 0)
        # at the level (to rounding), or short of it where another unknown coordinate would switch on
        reached += Zp[-1][0, m] >= level * (1.0 - 1e-9)
    assert capped >= 1
    assert reached >= 1


def test_completion_fills_half_a_row_behind_two_wide_layers() -> None:
    """A row of a 40-64-64-16-1 network seen at one point lacks about half of its weights; the walks
    along its boundary fill at least nine in ten of them (all, when measured), each to 1e-8."""
    for j in (0, 1):
        victim = random_mlp((40, 64, 64, 16, 1), np.random.default_rng(0))
        layers, w_true, b, cov, a = _half_seen_row(victim, j)
        c = complete_row(MLPOracle(victim).query, layers, np.where(cov, w_true, 0.0), b, cov, a[None, :], 40,
                         float(np.sqrt(40)), 200, 2.0**-36)
        missing = int((~cov).sum())
        assert len(c.filled) >= 0.9 * missing, c.reasons
        # each weight is read at a kink where h_m is a tenth of the typical layer input (or just past
        # the switch, 1e-3 of the scale), from an exact oracle: measured at most 4e-10 of the row's norm
        for m in c.filled:
            assert abs(c.w[m] - w_true[m]) <= 1e-8 * float(np.linalg.norm(w_true))
        assert c.queries > 0


def test_walks_in_the_first_layers_row_space_end_where_full_ones_do() -> None:
    """Behind a first layer narrower than the input, the walk runs in the first layer's row space
    (``prefix.input_space``); lifted back, its end points are the full-space walk's."""
    victim = random_mlp((100, 40, 40, 8, 1), np.random.default_rng(0))
    layers, w_true, b, cov, a = _half_seen_row(victim, 0)
    w = np.where(cov, w_true, 0.0)
    red = pfx.input_space(layers)
    assert red is not None
    scale = float(np.sqrt(100))
    compared = 0
    for m in (int(k) for k in np.flatnonzero(~cov)):
        hold = [int(k) for k in np.flatnonzero(~cov) if k != m]
        full = _walk(layers, a, w, m, hold, scale, 0.1)
        reduced = _walk(layers, a, w, m, hold, scale, 0.1, red=red)
        assert (full is None) == (reduced is None)
        if full is not None and reduced is not None:
            # the same steps in other coordinates: rounding of some tens of steps, measured 7e-14
            assert np.max(np.abs(full[0] - reduced[0])) <= 1e-9 * scale
            compared += 1
    assert compared >= 1


def test_a_kink_is_a_known_neurons_only_where_one_crosses_the_line_there() -> None:
    """A line through a point of a known boundary that runs nearly inside it (at an angle of 1e-6):
    the point itself is that neuron's kink, but a point 1e-2 along is 1e-8 from the boundary across
    and 1e-2 from where the neuron crosses the line, so a kink there is not that neuron's."""
    rng = np.random.default_rng(0)
    W, b = rng.normal(size=(4, 6)), rng.normal(size=4)
    layers = [(W, b)]
    x = rng.normal(size=6)
    x = x - (W[0] @ x + b[0]) / float(W[0] @ W[0]) * W[0]  # on neuron 0's boundary
    g = W[0] / np.linalg.norm(W[0])
    t = rng.normal(size=6)
    t -= (t @ g) * g
    n = t / np.linalg.norm(t) + 1e-6 * g
    n /= np.linalg.norm(n)
    assert _prefix_kink(layers, x, n)
    y = x + 1e-2 * n
    assert not _prefix_kink(layers, y, n)
    # across the boundary the point is within 1e-7 (|y| + 1) of it: the test across would flag it
    assert abs(W[0] @ y + b[0]) <= 1e-7 * (np.linalg.norm(y) + 1.0) * np.linalg.norm(W[0])


def test_a_kink_of_a_slightly_wrong_known_neuron_is_still_its_own() -> None:
    """The known row off by 1e-9 (as extracted rows are), the line crossing its boundary at an angle of
    1e-4: the true kink, on the true boundary, is 1e-5 along the line from the extracted boundary's
    crossing, yet it is still taken for that neuron's (it lies within the extraction's precision of
    the extracted boundary, across)."""
    rng = np.random.default_rng(1)
    W, b = rng.normal(size=(4, 6)), rng.normal(size=4)
    x = rng.normal(size=6)
    x = x - (W[0] @ x + b[0]) / float(W[0] @ W[0]) * W[0]  # on the true boundary of neuron 0
    g = W[0] / np.linalg.norm(W[0])
    t = rng.normal(size=6)
    t -= (t @ g) * g
    n = t / np.linalg.norm(t) + 1e-4 * g
    n /= np.linalg.norm(n)
    W_ext = W.copy()
    W_ext[0] += 1e-9 * np.linalg.norm(W[0]) * rng.normal(size=6) / np.sqrt(6)
    assert _prefix_kink([(W_ext, b)], x, n)
