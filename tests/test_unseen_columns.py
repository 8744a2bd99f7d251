"""Weights of the last hidden layer on an unseen coordinate, read from the output just inside its on-region
(:mod:`relux.attack.unseen_columns`)."""

from __future__ import annotations

import numpy as np
import pytest

from relux.attack.config import ExtractionConfig
from relux.attack.resume import boundary_points
from relux.attack.unseen_columns import read_unseen_columns, spread_boundary_points
from relux.model import MLP
from relux.oracle import MLPOracle
from relux.oracle.wrappers import CountingOracle
from relux.zoo import random_mlp


def _setup(seed: int) -> tuple[MLP, list[tuple[np.ndarray, np.ndarray]], np.ndarray, np.ndarray, int]:
    """Random 8-6-5-4-6: layer 3's weights on layer-2 neuron ``m`` zeroed and marked unseen, and exact
    points of neuron m's boundary (found with the known prefix, no query)."""
    true = random_mlp((8, 6, 5, 4, 6), np.random.default_rng(seed))
    m = seed % 5
    (W1, b1), (W2, b2), (W3, b3), _ = true.layers
    W3u = W3.copy()
    W3u[:, m] = 0.0
    cov = np.ones(W3.shape, dtype=bool)
    cov[:, m] = False
    rng = np.random.default_rng(seed + 100)
    P = boundary_points([(W1, b1)], W2[m], float(b2[m]), rng.normal(size=(4000, 8)), 12, rng)
    return true, [(W1, b1), (W2, b2), (W3u, b3)], cov, P, m


@pytest.mark.parametrize("seed", range(5))
def test_a_zeroed_column_is_read_again(seed: int) -> None:
    true, layers, cov, P, m = _setup(seed)
    oracle = CountingOracle(MLPOracle(true))
    got, cov2, info = read_unseen_columns(oracle.query, layers, cov, P, 8, ExtractionConfig(), np.random.default_rng(0))
    W3 = true.layers[2][0]
    read = cov2[:, m]
    assert info.filled == int(read.sum()) and info.points[m] > 0
    # rows on at some boundary point of neuron m and told apart by the six outputs: read. Each slope is a
    # difference quotient of float64 outputs over steps of a tenth of the distance to the nearest boundary;
    # 1e-9 of the row's norm leaves room for that rounding over the design's condition
    assert read.sum() >= 1
    err = np.abs(got[-1][0][read, m] - W3[read, m]) / np.linalg.norm(W3[read], axis=1)
    assert float(err.max()) <= 1e-9
    # everything else is untouched
    np.testing.assert_array_equal(np.delete(got[-1][0], m, axis=1), np.delete(W3, m, axis=1))
    if not read.all():
        assert m in info.reasons
    # one output fit, two queries per boundary point used (and possibly a shorter retry), and one per point
    # at each of the four depths inside
    assert oracle.queries <= 2 * (4 + 1) + 32 + 4 * 64 + 4 * 64


def test_no_boundary_point_and_a_wrong_row_are_named() -> None:
    true, layers, cov, P, m = _setup(0)
    q = MLPOracle(true).query
    _, cov2, info = read_unseen_columns(q, layers, cov, np.zeros((0, 8)), 8, ExtractionConfig(),
                                        np.random.default_rng(0))
    assert info.filled == 0 and "no exact point" in info.reasons[m] and not cov2[:, m].any()
    (W3, b3) = layers[-1]
    wrong = [*layers[:-1], (W3 + np.eye(4, 5)[::-1] * 0.5, b3)]
    _, _, info = read_unseen_columns(q, wrong, cov, P, 8, ExtractionConfig(), np.random.default_rng(0))
    assert info.filled == 0 and "a known row is wrong" in info.reasons[m]


def test_spread_boundary_points_lie_on_the_boundary() -> None:
    model = random_mlp((6, 8, 3), np.random.default_rng(3))
    (W1, b1), _ = model.layers
    rng = np.random.default_rng(4)
    w, b = rng.normal(size=8), 0.5
    seed_pts = boundary_points([(W1, b1)], w, b, rng.normal(size=(2000, 6)), 2, rng)
    S = spread_boundary_points([(W1, b1)], w, b, seed_pts, 20, 2.0, rng)
    assert S.shape == (20, 6)
    H = np.maximum(S @ W1.T + b1, 0.0)
    # 60 halvings leave each point within 2^-60 of a segment's length from the boundary: rounding level
    assert np.max(np.abs(H @ w + b)) <= 1e-12 * (np.abs(w) @ np.abs(H).max(axis=0) + abs(b))
    assert np.unique(np.round(S, 6), axis=0).shape[0] == 20


def test_a_column_already_right_is_confirmed() -> None:
    """Unseen weights that happen to be right already: the output moves by rounding only along every step, and
    the read keeps them (the checks' floors scale with f and the layer, not with that tiny move)."""
    true, layers, cov, P, m = _setup(1)
    right = [*layers[:-1], true.layers[2]]
    got, cov2, info = read_unseen_columns(MLPOracle(true).query, right, cov, P, 8, ExtractionConfig(),
                                          np.random.default_rng(0))
    assert info.filled >= 1 and cov2[:, m].sum() == info.filled
    # the least-squares update of rounding-level slopes: a few hundred ulps of the weights at most
    np.testing.assert_allclose(got[-1][0], true.layers[2][0], rtol=0, atol=1e-12)


def test_a_row_off_at_every_fit_input_is_not_judged() -> None:
    """A last-layer row that is never on gives the output fit nothing to read its output weights from: its
    weight on the column is left as it was, not called undetermined."""
    true, layers, cov, P, m = _setup(2)
    (W3, b3) = layers[-1]
    dead = b3.copy()
    dead[0] = -1e6
    off = [*layers[:-1], (W3, dead)]
    got, cov2, info = read_unseen_columns(MLPOracle(MLP([*true.layers[:2], (true.layers[2][0], dead),
                                                        true.layers[3]])).query, off, cov, P, 8, ExtractionConfig(),
                                          np.random.default_rng(0))
    assert (0, m) not in info.undetermined and not cov2[0, m]
    assert got[-1][0][0, m] == W3[0, m]
