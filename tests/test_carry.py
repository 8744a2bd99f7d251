"""The last hidden layer kept across a resume at the layer before it (:mod:`relux.attack.carry`)."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from resume_helpers import spoil_first_attempt

import relux
from relux.attack.carry import CarriedLayer, carried_outcome, orient_new, relabel
from relux.attack.result import LayerReport
from relux.model import MLP
from relux.oracle import MLPOracle
from relux.verify import verify
from relux.zoo import random_mlp


def _report(width: int, index: int = 3) -> LayerReport:
    return LayerReport(index=index, width=width, recovered=width, dead=0, witnesses=5, queries=0, seconds=0.0,
                       sign_method="walks", neurons=tuple({"sign_confidence": 1.0} for _ in range(width)))


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(2, 9), st.integers(0, 2))
def test_relabel_finds_each_old_row_and_its_scale(seed: int, n_old: int, n_new: int) -> None:
    """The resumed layer's rows are the old ones, permuted and rescaled by positive factors, with new ones
    among them: each old row is found with its factor, the new ones are marked -1."""
    rng = np.random.default_rng(seed)
    W, b = rng.normal(size=(n_old + n_new, 6)), rng.normal(size=n_old + n_new)
    perm = rng.permutation(n_old + n_new)
    scale = rng.uniform(0.1, 10.0, size=n_old + n_new)
    Wn, bn = W[perm] * scale[:, None], b[perm] * scale
    lab = relabel((W[:n_old], b[:n_old]), (Wn, bn))
    assert lab.ok
    for j, src in enumerate(perm):
        if src < n_old:
            assert lab.source[j] == src
            # the factor is a ratio of two norms: a few ulps of relative error
            assert abs(lab.scale[j] - scale[j]) <= 1e-12 * scale[j]
        else:
            assert lab.source[j] == -1


def test_relabel_refuses_a_flipped_or_lost_row() -> None:
    rng = np.random.default_rng(0)
    W, b = rng.normal(size=(4, 5)), rng.normal(size=4)
    flipped = W.copy(), b.copy()
    flipped[0][2], flipped[1][2] = -W[2], -b[2]
    assert "sign flipped" in relabel((W, b), flipped).reason
    assert "has no row" in relabel((W, b), (W[:3], b[:3])).reason
    # moved by more than a refinement moves a row
    moved = W.copy()
    moved[1] += 1e-2 * rng.normal(size=5)
    assert "old neuron 1 has no row" in relabel((W, b), (moved, b)).reason


def test_orient_new_turns_a_new_neuron_off_at_most_inputs() -> None:
    rng = np.random.default_rng(1)
    prefix = random_mlp((5, 6, 2), rng).layers[:1]
    W, b = rng.normal(size=(3, 6)), np.array([0.0, 5.0, -5.0])
    X = rng.normal(size=(2000, 5))
    W2, b2, flipped = orient_new(prefix, W, b, np.array([False, True, True]), X)
    assert flipped == [1]  # row 1 is on nearly everywhere (bias 5), row 2 off already
    np.testing.assert_array_equal(W2[1], -W[1])
    np.testing.assert_array_equal(W2[[0, 2]], W[[0, 2]])
    assert b2[1] == -5.0


def test_carried_outcome_relabels_columns_and_leaves_the_new_one_unseen() -> None:
    """Old layer 2 lacks neuron 1; the resumed one has every row, permuted and rescaled. The carried layer 3's
    columns follow their rows (divided by each factor), so the network computes the same function where the
    new neuron is off; its column is unseen (zero, coverage false)."""
    rng = np.random.default_rng(2)
    true = random_mlp((6, 5, 4, 3, 2), rng)
    (W1, b1), (W2, b2), (W3, b3), _ = true.layers
    b2 = b2.copy()
    X = rng.normal(size=(4000, 6))
    H1 = np.maximum(X @ W1.T + b1, 0.0)
    b2[1] -= float(np.quantile(H1 @ W2[1] + b2[1], 0.99))  # neuron 1 on at 1% of inputs
    old = (np.delete(W2, 1, axis=0), np.delete(b2, 1))
    perm = np.array([3, 1, 0, 2])
    scale = np.array([2.0, 0.5, 3.0, 1.5])
    new = (W2[perm] * scale[:, None], b2[perm] * scale)
    carried = CarriedLayer(np.delete(W3, 1, axis=1), b3.copy(), _report(3), np.zeros((2, 6)))
    got = carried_outcome(carried, old, [(W1, b1), new], np.random.default_rng(3), 1.0)
    assert got is not None
    layers, out = got
    np.testing.assert_array_equal(layers[-1][0], new[0])  # the new neuron was off at most inputs already
    assert out.coverage.shape == (3, 4) and not out.coverage[:, 1].any() and out.coverage[:, [0, 2, 3]].all()
    np.testing.assert_array_equal(out.W[:, 1], 0.0)
    # column j is the true column perm[j] over scale[j]: exact up to one division's rounding
    for j in (0, 2, 3):
        np.testing.assert_allclose(out.W[:, j], W3[:, perm[j]] / scale[j], rtol=1e-15)
    assert out.confidence.tolist() == [1.0] * 3 and "kept from the attempt resumed" in out.sign_method
    # no old row, no carry
    assert carried_outcome(carried, old, [(W1, b1), (new[0][:2], new[1][:2])], rng, 1.0) is None


def _rare_inner_victim(share: float) -> MLP:
    """Random 12-8-8-8-3 whose layer-2 neuron 0 is on at about ``share`` of N(0, I) inputs."""
    victim = random_mlp((12, 8, 8, 8, 3), np.random.default_rng(2))
    layers = list(victim.layers)
    (W1, b1), (W2, b2) = layers[0], layers[1]
    H = np.maximum(np.random.default_rng(5).normal(size=(50000, 12)) @ W1.T + b1, 0.0)
    b2 = b2.copy()
    b2[0] -= float(np.quantile(H @ W2[0] + b2[0], 1.0 - share))
    layers[1] = (W2, b2)
    return MLP(layers)


def _without_rarest_inner(model: MLP) -> MLP:
    """``model`` without the layer-2 neuron on least often, and layer 3's column for it."""
    H = np.maximum(np.random.default_rng(6).normal(size=(50000, model.input_dim)) @ model.layers[0][0].T
                   + model.layers[0][1], 0.0)
    (W2, b2), (W3, b3) = model.layers[1], model.layers[2]
    j = int(np.argmin(np.mean(H @ W2.T + b2 > 0, axis=0)))
    keep = np.arange(W2.shape[0]) != j
    return MLP([model.layers[0], (W2[keep], b2[keep]), (W3[:, keep], b3), *model.layers[3:]])


def test_a_resume_keeps_the_complete_last_hidden_layer(monkeypatch: pytest.MonkeyPatch,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    """The first attempt is made to miss a layer-2 neuron on at 0.5% of inputs (its model lacks it and
    layer 3's weights on it; layer 2's report is one row short, layer 3's complete). The resumed attempt
    finds the neuron on lines through the first model's disagreements, keeps layer 3's rows, reads their
    weights on the new neuron from kinks, and passes with every weight exact."""
    victim = _rare_inner_victim(0.005)

    def spoil(model: MLP, reports: Any) -> tuple[MLP, Any]:
        r2 = dataclasses.replace(reports[1], recovered=reports[1].width - 1)
        return _without_rarest_inner(model), (reports[0], r2, *reports[2:])

    calls = spoil_first_attempt(monkeypatch, spoil)
    with caplog.at_level("INFO", logger="relux.attack"):
        result = relux.extract(MLPOracle(victim), victim.arch, relux.ExtractionConfig(seed=0, restarts=0))
    assert result.selfcheck.passed
    assert len(calls) == 2 and calls[1] is not None and calls[1].layer == 2
    assert calls[1].carried is not None and calls[1].carried.W.shape == (8, 7)
    assert "layer 3: 8 rows kept from the attempt resumed; 1 new layer-2 neuron(s)" in caplog.text
    assert "kept from the attempt resumed" in result.layers[2].sign_method
    report = verify(victim, result.model).to_json()
    assert report["unmatched"] == 0 and report["sign_errors"] == 0
    # issue 4's bounds, as for every deep extraction in tests/test_extract_deep.py
    assert report["max_norm_weight_error"] <= 2.0**-25 and report["max_rel_output_error"] <= 1e-8
