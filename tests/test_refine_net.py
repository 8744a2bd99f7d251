"""Joint Gauss-Newton refinement of a whole network on its outputs (relux.attack.refine_net)."""

from __future__ import annotations

import numpy as np

from relux.align import align
from relux.attack.refine_net import refine_network
from relux.model import MLP
from relux.oracle import MLPOracle
from relux.zoo import random_mlp


def test_refinement_recovers_weights_perturbed_by_extraction_error() -> None:
    m = random_mlp("8-10-6-3", np.random.default_rng(0))
    rng = np.random.default_rng(1)
    noisy = [(W * (1 + 1e-7 * rng.normal(size=W.shape)), b + 1e-7 * rng.normal(size=b.shape)) for W, b in m.layers]
    layers, info = refine_network(MLPOracle(m).query, noisy, 8, 1.0, np.random.default_rng(2))
    assert info.steps >= 1 and info.misfit_after < 1e-3 * info.misfit_before
    # the patterns are fixed at points far from every boundary, so the model is multilinear there and
    # Gauss-Newton converges to the exact weights up to the per-neuron scale (a symmetry the step leaves
    # alone): compared after alignment, the 2^-23 perturbation falls to float64 rounding (2^-40 is far
    # below one step's quadratic error, 2^-46, plus rounding through 3 layers)
    al = align(m, MLP(layers))
    assert al.complete and al.sign_errors == 0
    assert al.log2_max_norm_weight_error < -40
    assert MLP(layers).equivalent(m, rtol=1e-10)


def test_refinement_keeps_a_model_it_cannot_improve() -> None:
    m = random_mlp("6-5-2", np.random.default_rng(3))
    layers, info = refine_network(MLPOracle(m).query, list(m.layers), 6, 1.0, np.random.default_rng(4))
    assert info.misfit_after <= info.misfit_before
    assert MLP(layers).equivalent(m, rtol=1e-12)


def test_over_budget_only_the_tail_moves() -> None:
    m = random_mlp("8-10-6-3", np.random.default_rng(0))
    rng = np.random.default_rng(1)
    noisy = [m.layers[0]] + [(W * (1 + 1e-7 * rng.normal(size=W.shape)), b + 1e-7 * rng.normal(size=b.shape))
                             for W, b in m.layers[1:]]
    # layer 1 has 90 parameters, layers 2 and 3 have 66 + 21: a budget of 100 refines layers 2-3 only
    layers, info = refine_network(MLPOracle(m).query, noisy, 8, 1.0, np.random.default_rng(2), max_params=100)
    assert info.fixed_layers == 1
    np.testing.assert_array_equal(layers[0][0], noisy[0][0])
    # an exact first layer: the tail converges as the whole network does (see above)
    assert align(m, MLP(layers)).log2_max_norm_weight_error < -40


def test_a_structural_misfit_is_left_alone() -> None:
    """A neuron negated (a sign error) leaves a misfit of order one that no step at fixed patterns
    repairs: the model comes back unchanged, with the reason, and no step is tried."""
    m = random_mlp("8-10-6-3", np.random.default_rng(0))
    (W1, b1), *rest = m.layers
    wrong = [(W1 * np.where(np.arange(10) == 3, -1.0, 1.0)[:, None], b1 * np.where(np.arange(10) == 3, -1.0, 1.0)),
             *rest]
    layers, info = refine_network(MLPOracle(m).query, wrong, 8, 1.0, np.random.default_rng(2))
    assert info.misfit_before > 1e-2 and info.steps == 0 and "structural" in info.reason
    assert all(np.array_equal(W, W0) and np.array_equal(b, b0) for (W, b), (W0, b0) in zip(layers, wrong, strict=True))


def test_an_exact_model_is_not_stepped() -> None:
    m = random_mlp("8-10-6-3", np.random.default_rng(0))
    layers, info = refine_network(MLPOracle(m).query, list(m.layers), 8, 1.0, np.random.default_rng(2))
    # the model is the oracle's own: its misfit is float64 rounding (far below 64 eps)
    assert info.steps == 0 and "rounding" in info.reason


Layer = tuple[np.ndarray, np.ndarray]


def _missing_neuron(share: float, out_scale: float) -> tuple[np.ndarray, np.ndarray, MLP, list[Layer]]:
    """Random 8-10-6-3 whose layer-1 neuron 3 is on at about ``share`` of N(0, I) inputs, its output
    weights scaled by ``out_scale``: its first layer's neuron 3 (``W1``, ``b1``), the network, and the
    model without that neuron."""
    m = random_mlp("8-10-6-3", np.random.default_rng(0))
    (W1, b1), (W2, b2), out = m.layers
    X = np.random.default_rng(5).normal(size=(100000, 8))
    b1 = b1.copy()
    b1[3] -= np.quantile(X @ W1[3] + b1[3], 1.0 - share)
    W2 = W2.copy()
    W2[:, 3] *= out_scale
    keep = np.arange(10) != 3
    return W1, b1, MLP([(W1, b1), (W2, b2), out]), [(W1[keep], b1[keep]), (W2[:, keep], b2), out]


def test_a_rarely_active_missing_neuron_bends_no_weight() -> None:
    """A layer-1 neuron on at about 5% of inputs, left out of the model: the misfit it leaves is under
    the structural cut (1e-2), so steps are tried, but they cannot bring it near rounding (they only
    bend the other weights around the missing neuron), so they are undone."""
    W1, b1, truth, model = _missing_neuron(0.05, 0.1)  # its misfit under the structural cut
    layers, info = refine_network(MLPOracle(truth).query, model, 8, 1.0, np.random.default_rng(2))
    assert 1e-12 < info.misfit_before <= 1e-2, info
    assert info.steps == 0 and "undone" in info.reason and info.misfit_after == info.misfit_before
    assert all(np.array_equal(W, W0) and np.array_equal(b, b0) for (W, b), (W0, b0) in zip(layers, model, strict=True))
    # the held-out inputs where the model misses f are handed on (the self-check queries them again):
    # there the missing neuron is on
    assert 1 <= info.misses.shape[0] <= 16
    assert np.all(info.misses @ W1[3] + b1[3] > 0)


def test_steps_that_cannot_reach_rounding_are_undone() -> None:
    """A missing neuron on at about 60% of inputs, its misfit at most points and under the structural
    cut: steps are tried, they end far above rounding and are undone."""
    _, _, truth, model = _missing_neuron(0.6, 1e-3)  # its misfit under the structural cut
    layers, info = refine_network(MLPOracle(truth).query, model, 8, 1.0, np.random.default_rng(2))
    assert 1e-12 < info.misfit_before <= 1e-2, info
    assert info.steps == 0 and "undone" in info.reason and info.misfit_after == info.misfit_before
