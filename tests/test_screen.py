"""Telling a kink of the layer being extracted from a deeper one against the known rows' boundaries
(relux.attack.screen)."""

from __future__ import annotations

import numpy as np
import pytest

from relux.attack.screen import prescreen, screen_starts
from relux.attack.witnesses import Candidate
from relux.model import MLP
from relux.oracle import MLPOracle
from relux.zoo import random_mlp


@pytest.fixture(scope="module")
def net() -> MLP:
    return random_mlp((8, 16, 12, 12, 1), np.random.default_rng(3))


def _pre(net: MLP, X: np.ndarray, layer: int) -> np.ndarray:
    H = X
    for W, b in net.layers[:layer]:
        H = np.maximum(H @ W.T + b, 0.0)
    W, b = net.layers[layer]
    return np.asarray(H @ W.T + b)


def _kinks(net: MLP, layer: int, rng: np.random.Generator, count: int) -> list[tuple[Candidate, np.ndarray]]:
    """Exact kinks of neurons of ``layer`` (0-based) on random lines, as candidates with their true normal."""
    out: list[tuple[Candidate, np.ndarray]] = []
    while len(out) < count:
        x, u = rng.normal(size=8), rng.normal(size=8)
        u /= np.linalg.norm(u)
        t = np.linspace(-3, 3, 601)
        Z = _pre(net, x + t[:, None] * u, layer)
        where = np.argwhere(np.sign(Z[:-1]) != np.sign(Z[1:]))
        if not where.size:
            continue
        i, k = where[0]
        lo, hi = t[i], t[i + 1]
        for _ in range(80):  # bisection to the float64 root
            mid = 0.5 * (lo + hi)
            if np.sign(_pre(net, (x + mid * u)[None, :], layer)[0, k]) == np.sign(Z[i, k]):
                lo = mid
            else:
                hi = mid
        y = x + lo * u
        # no other kink in the segment about it (as the candidate search leaves it)
        h = 0.05
        ends = y + np.array([-h, h])[:, None] * u
        if sum(np.count_nonzero(np.sign(Z[0]) != np.sign(Z[1])) for Z in (_pre(net, ends, j) for j in range(3))) != 1:
            continue
        eps = 1e-7
        g = (_pre(net, (y + eps * np.eye(8)), layer)[:, k] - _pre(net, (y - eps * np.eye(8)), layer)[:, k]) / (2 * eps)
        out.append((Candidate(0, y, y - 0.5 * h * u, y + 0.5 * h * u, 0.5 * h, 0.5 * h, 1.0), g))
    return out


@pytest.mark.parametrize("measured", [False, True])
def test_screen_keeps_the_layers_kinks_and_sets_deeper_ones_aside(net: MLP, measured: bool) -> None:
    rng = np.random.default_rng(0)
    layer1 = net.layers[0]
    W2, b2 = net.layers[1]
    rows = [(W2[k], float(b2[k]), np.zeros((0, 8)), 0.0) for k in range(12)]  # every row of layer 2 known
    oracle = MLPOracle(net)
    kept = {}
    for layer in (1, 2):
        cands = _kinks(net, layer, rng, 30)
        if measured:
            keep = screen_starts(oracle.query, [layer1], rows, [(c.x, g) for c, g in cands], 10.0)
        else:
            keep = prescreen(oracle.query, [layer1], rows, [c for c, _g in cands], 10.0, 1e-9)
        kept[layer] = sum(keep)
    # a kink of layer 2 is on its plane past any other row's boundary: never set aside
    assert kept[1] == 30
    # a layer-3 kink is set aside wherever a layer-2 boundary it depends on lies well inside its region;
    # with 8 inputs and 16 first-layer neurons many regions are too small to test (here 7 and 16 of 30
    # stay, for the measured normal and for the plane found from one more kink)
    assert kept[2] <= (10 if measured else 20), kept
