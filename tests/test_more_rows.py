"""Rows the signed walks missed, from witnesses on more search lines (relux.attack.more_rows)."""

from __future__ import annotations

import numpy as np

from relux.attack.config import ExtractionConfig
from relux.attack.more_rows import more_rows
from relux.oracle import CountingOracle, MLPOracle
from relux.zoo import random_mlp


def _unit(W: np.ndarray, b: np.ndarray) -> np.ndarray:
    T = np.concatenate([W, b[:, None]], axis=1)
    return np.asarray(T / np.linalg.norm(T, axis=1, keepdims=True))


def test_the_rows_the_walks_missed_are_found_and_known_rows_are_not_repeated() -> None:
    # layer 1 (16) twice as wide as the input (8): witnesses of layer 2 are rank-deficient
    net = random_mlp((8, 16, 6, 1), np.random.default_rng(1))
    W1, b1 = net.layers[0]
    n1 = np.linalg.norm(np.concatenate([W1, b1[:, None]], axis=1), axis=1)
    prefix = [(W1 / n1[:, None], b1 / n1)]
    W2, b2 = net.layers[1]
    true = _unit(W2 * n1[None, :], b2)
    oracle = CountingOracle(MLPOracle(net))
    out = more_rows(oracle.query, prefix, true[2:, :-1], true[2:, -1], 6, 8, ExtractionConfig(seed=0),
                    np.random.default_rng(0), 1e-9)
    assert out.W.shape == (2, 16), out.reason
    cos = np.abs(_unit(out.W, out.b) @ true.T)
    assert sorted(cos.argmax(axis=1).tolist()) == [0, 1]
    # unified from finite-difference measurements through one known layer: 1e-6 is far above their
    # error (about 1e-9) and far below what a wrong row gives
    assert np.all(1.0 - cos.max(axis=1) <= 1e-6)
    assert len(out.points) == 2 and all(p.shape[1] == 8 for p in out.points)
    assert out.lines > 0 and oracle.queries > 0


def test_a_complete_layer_costs_nothing() -> None:
    net = random_mlp((8, 16, 6, 1), np.random.default_rng(1))
    oracle = CountingOracle(MLPOracle(net))
    W2, b2 = net.layers[1]
    out = more_rows(oracle.query, [net.layers[0]], W2, b2, 6, 8, ExtractionConfig(seed=0), np.random.default_rng(0),
                    1e-9)
    assert out.W.shape == (0, 16) and oracle.queries == 0


def test_a_row_short_of_a_never_seen_weight_is_kept_only_when_partial_rows_are_allowed() -> None:
    """A layer-1 neuron that is never on (zero weights, bias -1) hides every layer-2 weight on it: completion
    cannot switch it on. For the last hidden layer (``partial_ok``) the output fit gives such weights,
    so the confirmed row is kept with that coordinate marked unseen; otherwise it is not kept."""
    net = random_mlp((8, 16, 6, 1), np.random.default_rng(1))
    W1, b1 = net.layers[0]
    W1, b1 = W1.copy(), b1.copy()
    W1[5], b1[5] = 0.0, -1.0
    n1 = np.linalg.norm(np.concatenate([W1, b1[:, None]], axis=1), axis=1)
    prefix = [(W1 / n1[:, None], b1 / n1)]
    W2, b2 = net.layers[1]
    from relux.model import MLP

    net = MLP([(W1, b1), (W2, b2), net.layers[2]])
    true = _unit(W2 * n1[None, :], b2)
    args = (prefix, true[2:, :-1], true[2:, -1], 6, 8, ExtractionConfig(seed=0))
    out = more_rows(CountingOracle(MLPOracle(net)).query, *args, np.random.default_rng(0), 1e-9, partial_ok=True)
    assert out.W.shape == (2, 16), out.reason
    seen = np.ones(16, dtype=bool)
    seen[5] = False
    assert np.array_equal(out.coverage, np.stack([seen, seen]))
    got = _unit(out.W[:, seen], out.b)
    want = _unit(true[:, :-1][:, seen], true[:, -1])
    # the seen weights are exact (finite differences through one known layer: about 1e-9)
    assert np.all(1.0 - np.abs(got @ want.T).max(axis=1) <= 1e-6)
    strict = more_rows(CountingOracle(MLPOracle(net)).query, *args, np.random.default_rng(0), 1e-9,
                       max_lines=64, stall_lines=64)
    assert strict.W.shape == (0, 16)
