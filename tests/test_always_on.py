"""An always-on last-hidden-layer neuron: the solve, the alignment gauge, and an end-to-end victim."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import relux
from relux.align import align, always_on_rows
from relux.attack.always_on import solve_always_on
from relux.model import MLP
from relux.oracle import MLPOracle
from relux.verify import verify
from relux.zoo import random_mlp


def _with_always_on(seed: int, arch: tuple[int, ...], j: int = 0) -> MLP:
    """A random net whose last hidden layer's neuron ``j`` has positive weights and bias: always on."""
    net = random_mlp(arch, np.random.default_rng(seed))
    layers = [(np.array(W), np.array(b)) for W, b in net.layers]
    W, b = layers[-2]
    W[j] = np.abs(W[j]) + 0.05
    b[j] = 0.1
    return net.with_layers(layers)


def test_solve_recovers_flips_and_row_from_an_exact_affine_part() -> None:
    rng = np.random.default_rng(3)
    m, p = 6, 8
    W = rng.normal(size=(m, p))
    W /= np.linalg.norm(W, axis=1, keepdims=True)
    alpha = rng.normal(size=(1, m))
    r = np.abs(rng.normal(size=p))
    r /= np.linalg.norm(r)
    flips = np.array([True, False, False, True, False, False])
    # γ = Σ β_j ŵ_j + a r with β_j = -α_j for the flipped rows (signs.py's convention)
    gamma = (-(alpha[0] * flips) @ W + 0.2 * r)[None, :]
    R = np.abs(rng.normal(size=(500, p)))  # a non-negative layer input: its recession cone is the orthant
    got = solve_always_on(alpha, gamma, W, R, R)
    assert got.ok, got.reason
    # exact data: the smallest always-on term is the true one here (checked by the fixed seed), so
    # the flips are exact and the row equals r to rounding (1e-12: a few float64 operations)
    np.testing.assert_array_equal(got.flips, flips)
    np.testing.assert_allclose(got.w, r, atol=1e-12)
    np.testing.assert_allclose(got.out, [0.2], atol=1e-12)
    assert got.b == 0.0  # a non-negative row on a non-negative input is on everywhere with bias 0


def test_solve_refuses_a_term_outside_every_dual_cone() -> None:
    rng = np.random.default_rng(4)
    W = np.eye(2)
    alpha = np.array([[1.0, 1.0]])
    R = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])  # the whole plane: no cone
    got = solve_always_on(alpha, np.array([[0.3, 0.7]]), W, R, rng.normal(size=(10, 2)))
    assert not got.ok and "dual cone" in got.reason


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**16), j=st.integers(0, 4), bias=st.floats(0.0, 2.0))
def test_alignment_reexpresses_an_always_on_bias_in_the_candidates_gauge(seed: int, j: int, bias: float) -> None:
    net = _with_always_on(seed, (6, 7, 5, 2), j)
    assert always_on_rows(*net.layers[1])[j]
    layers = [(np.array(W), np.array(b)) for W, b in net.layers]
    W, b = layers[-2]
    Wn, bn = layers[-1]
    bn += Wn[:, j] * (b[j] - bias)  # another bias for the always-on neuron, the output bias compensating
    b[j] = bias
    other = net.with_layers(layers)
    X = np.random.default_rng(seed).normal(size=(200, 6)) * 3
    # the same function (rounding of the moved bias only)
    np.testing.assert_allclose(other(X), net(X), rtol=0, atol=1e-12 * float(np.abs(net(X)).max() + 1))
    al = align(net, other)
    assert al.complete and al.sign_errors == 0
    # identical once the reference takes the candidate's bias: rounding only (a few float64 operations)
    assert al.max_norm_weight_error < 1e-12


def test_extracts_a_victim_with_an_always_on_neuron() -> None:
    victim = _with_always_on(1, (8, 8, 6, 1), 3)
    result = relux.extract(MLPOracle(victim), victim.arch, relux.ExtractionConfig(seed=0))
    assert result.selfcheck.passed
    layer = result.layers[-1]
    assert layer.recovered == 6
    assert any(n.get("always_on") for n in layer.neurons)
    report = verify(victim, result.model).to_json()
    # issue-4 bounds: 2^-25 on weights, 1e-8 relative output error
    assert report["unmatched"] == 0
    assert report["max_norm_weight_error"] <= 2.0**-25
    assert report["max_rel_output_error"] <= 1e-8
