"""Kinks the known prefix puts on a line, computed without a query (relux.attack.prefix.line_crossings), and
the kink search that takes them as located (relux.attack.critical.find_kinks with ``predicted``)."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from relux.attack import prefix as pfx
from relux.attack.critical import find_kinks
from relux.oracle import CountingOracle, MLPOracle
from relux.zoo import random_mlp


def _sign_changes(layers: list[tuple[np.ndarray, np.ndarray]], x0: np.ndarray, u: np.ndarray,
                  t: np.ndarray) -> int:
    """Switches of every prefix neuron between consecutive points of a fine grid (a brute-force count)."""
    Zs, _ = pfx.forward(layers, x0[None, :] + t[:, None] * u[None, :])
    Z = np.concatenate(Zs, axis=1)
    return int(np.count_nonzero(np.sign(Z[1:]) != np.sign(Z[:-1])))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), depth=st.integers(1, 3))
def test_line_crossings_are_the_prefix_neurons_zeros(seed: int, depth: int) -> None:
    rng = np.random.default_rng(seed)
    d0 = int(rng.integers(2, 8))
    arch = (d0, *[int(rng.integers(2, 7)) for _ in range(depth)], 1)
    layers = list(random_mlp(arch, rng).layers[:-1])
    x0, u = rng.normal(size=(3, d0)), rng.normal(size=(3, d0))
    got = pfx.line_crossings(layers, x0, u, -3.0, 3.0)
    grid = np.linspace(-3.0, 3.0, 20001)
    for i, t in enumerate(got):
        assert np.all(np.diff(t) > 0) and np.all((t > -3.0) & (t < 3.0))
        # each is a zero of some prefix neuron's pre-activation (relative to its scale: float rounding)
        Zs, _ = pfx.forward(layers, x0[i][None, :] + t[:, None] * u[i][None, :])
        Z = np.concatenate(Zs, axis=1)
        scale = 1.0 + np.max(np.abs(Z), axis=1)
        assert np.all(np.min(np.abs(Z), axis=1) <= 1e-9 * scale)
        # and none is left out: the grid (spacing 3e-4) sees the switches it separates; two zeros closer
        # than that may share a grid interval and cancel there, so the count is at least the grid's
        assert t.size >= _sign_changes(layers, x0[i], u[i], grid)


def test_predicted_kinks_are_located_with_fewer_queries() -> None:
    """The same kinks (to 1e-9 of the span: the search locates each to about 1e-12), for fewer queries, when
    the first two layers' kinks are predicted; the third layer's are found as before."""
    rng = np.random.default_rng(4)
    net = random_mlp((8, 12, 10, 6, 1), rng)
    x0, u = rng.normal(size=(6, 8)), rng.normal(size=(6, 8))
    counts = []
    found = []
    for predicted in (None, pfx.line_crossings(list(net.layers[:2]), x0, u, -4.0, 4.0)):
        oracle = CountingOracle(MLPOracle(net))
        lines, _ = find_kinks(oracle.query, x0, u, -4.0, 4.0, 120, 1e-10, predicted=predicted)
        counts.append(oracle.queries)
        found.append(lines)
    for a, b in zip(*found, strict=True):
        assert a.t.size == b.t.size
        np.testing.assert_allclose(a.t, b.t, rtol=0, atol=8e-9)
    assert counts[1] < 0.9 * counts[0]
