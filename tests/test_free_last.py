"""The last hidden layer behind a layer with open signs: witnesses grouped by output direction,
augmented rows, flips decoded, signed rows (relux.attack.free_last)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relux.attack import prefix as pfx
from relux.attack.config import ExtractionConfig
from relux.attack.free_last import augment, decode_flips, free_last_layer, group_by_output
from relux.attack.unify import NeuronRow
from relux.attack.witnesses import Witness
from relux.model import MLP
from relux.oracle import CountingOracle, MLPOracle
from relux.zoo import random_mlp


def _unit_layers(victim: MLP) -> list[tuple[np.ndarray, np.ndarray]]:
    """The hidden layers with every row at unit norm (the next layer rescaled to match)."""
    out = []
    scale = None
    for W, b in victim.layers[:-1]:
        A = np.concatenate([W * (scale[None, :] if scale is not None else 1.0), b[:, None]], axis=1)
        n = np.linalg.norm(A, axis=1)
        out.append((A[:, :-1] / n[:, None], A[:, -1] / n))
        scale = n
    return out


def _witness(direction: np.ndarray, noise: float) -> Witness:
    z = np.zeros(1)
    return Witness(x=z, active=np.ones(1, dtype=bool), w=z, b=0.0, full_rank=False, A_ctrl=np.ones((1, 1)),
                   v_ctrl=np.ones(1), h=z, rank_ratio=noise, line=0, normal=z, out_dir=direction)


@settings(max_examples=30, deadline=None)
@given(st.integers(2, 12), st.integers(2, 8), st.integers(0, 2**32 - 1), st.sampled_from([1e-13, 1e-9]))
def test_groups_follow_output_columns(k: int, n: int, seed: int, noise: float) -> None:
    rng = np.random.default_rng(seed)
    cols = rng.normal(size=(n, k))
    cols /= np.linalg.norm(cols, axis=1, keepdims=True)
    cos = np.abs(cols @ cols.T) - np.eye(n)
    if cos.max() > 1.0 - 1e-4:
        return  # two columns this close are one direction for any finite-difference measurement
    labels = rng.integers(0, n, size=40)
    ws = []
    for j in labels:
        # a measured direction: the column, with either sign, off by about its noise (exact witnesses
        # leave 1e-13, whose angles 1 - cos cannot even resolve)
        d = cols[j] * rng.choice([-1.0, 1.0]) + noise * rng.normal(size=k)
        ws.append(_witness(d / np.linalg.norm(d), noise))
    groups = group_by_output(ws)
    assert sorted(len(set(labels[g].tolist())) for g in groups) == [1] * len(groups)
    assert len(groups) == len(set(labels.tolist()))


def test_augmented_prefix_outputs_both_layers() -> None:
    victim = random_mlp((5, 7, 6, 4, 2), np.random.default_rng(0))
    layers = _unit_layers(victim)[:2]
    X = np.random.default_rng(1).normal(size=(50, 5))
    _, H = pfx.forward(augment(layers), X)
    _, H1 = pfx.forward(layers[:1], X)
    _, H2 = pfx.forward(layers, X)
    assert np.array_equal(H, np.concatenate([H2, H1], axis=1))  # identity rows: exactly h, no rounding


def test_decode_recovers_flips_from_exact_rows() -> None:
    rng = np.random.default_rng(2)
    d_in, d_prev = 9, 7
    W_prev = rng.normal(size=(d_prev, d_in))
    t = rng.random(d_prev) < 0.5
    rows = []
    for _ in range(3):
        alpha = rng.normal(size=d_prev)
        switched = rng.random(d_prev) < 0.8
        # beta from every flipped neuron; an unswitched one adds its term with an unknown weight
        beta = -(W_prev.T @ (alpha * t))
        beta += W_prev[~switched].T @ rng.normal(size=int((~switched).sum()))
        alpha = np.where(switched, alpha, 0.0)
        cov = np.concatenate([switched, np.ones(d_in, dtype=bool)])
        rows.append((NeuronRow(w=np.concatenate([alpha, beta]), b=0.0, members=(0,), coverage=cov, residual=0.0,
                               gap=np.inf), switched))
    sol = decode_flips(rows, W_prev, 22)
    assert sol.ok and sol.solutions == 1
    assert np.array_equal(sol.flips[sol.relevant], t[sol.relevant])
    assert sol.relevant.sum() >= d_prev - 1


@pytest.mark.parametrize("seed", [0, 1])
def test_last_layer_and_open_signs_from_witness_groups(seed: int) -> None:
    victim = random_mlp((8, 12, 10, 6, 3), np.random.default_rng(seed))
    layers = _unit_layers(victim)
    truth = np.random.default_rng(10 + seed).random(10) < 0.5
    sgn = np.where(truth, -1.0, 1.0)
    known = [layers[0], (layers[1][0] * sgn[:, None], layers[1][1] * sgn)]
    oracle = CountingOracle(MLPOracle(victim))
    out = free_last_layer(oracle.query, known, 6, 8, 28, ExtractionConfig(seed=seed), np.random.default_rng(seed),
                          1e-9)
    assert out.ok, out.reason
    assert np.array_equal(out.flips[out.decided], truth[out.decided])
    assert out.decided.sum() >= 9
    assert out.W.shape == (6, 10)
    # rows over the corrected layer 2 are the true rows up to scale where their witnesses saw the
    # weight; finite differences over two layers leave ~1e-8 relative, 1e-6 is a safe margin
    T = np.concatenate([layers[2][0], layers[2][1][:, None]], axis=1)
    for w, b, cov in zip(out.W, out.b, out.coverage, strict=True):
        e = np.append(w, b)
        m = np.append(cov, True)
        cos = np.abs(T[:, m] @ e[m]) / (np.linalg.norm(T[:, m], axis=1) * np.linalg.norm(e[m]))
        assert 1.0 - cos.max() <= 1e-6
