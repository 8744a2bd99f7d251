"""Weights a network's function does not determine (:mod:`relux.identifiability`), and how alignment and
verification leave them out."""

from __future__ import annotations

import numpy as np
import pytest

from relux.align import align
from relux.errors import InputError
from relux.identifiability import undetermined_weights
from relux.model import MLP
from relux.verify import VerifyConfig, verify


def _net(a: float = 0.7, b: float = 0.4, off: float = 0.9) -> MLP:
    """2-2-4-2. Layer-1 neuron 0 is ``ReLU(x1 - 4)``, on at 3e-5 of N(0, I) inputs and none of U[0, 1]^2;
    neuron 1 is ``ReLU(x2 + 100)``, on everywhere near the inputs. Layer 2: neurons 0 and 1 take ``a`` and
    ``b`` of neuron 0 and feed output 0 alike (only ``a + b`` shows), neuron 2 is off everywhere near the
    inputs (its weight ``off`` shows nowhere), neuron 3 takes 0.3 of it and feeds output 1 alone."""
    W1, b1 = np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([-4.0, 100.0])
    W2 = np.array([[a, 1.0], [b, 1.0], [off, 1.0], [0.3, 1.0]])
    b2 = np.array([0.0, 0.0, -300.0, 0.0])
    W3 = np.array([[1.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
    return MLP([(W1, b1), (W2, b2), (W3, np.zeros(2))])


def test_the_undetermined_weights_of_a_rare_neuron() -> None:
    masks = undetermined_weights(_net())
    assert [m.shape for m in masks] == [(2, 2), (4, 2), (2, 4)]
    assert not masks[0].any() and not masks[2].any()
    # a and b only in their sum, the off neuron's not at all; neuron 3's alone; neuron 1 of layer 1 is on
    # nearly everywhere, so its weights are not examined
    assert masks[1][:, 0].tolist() == [True, True, True, False]
    assert not masks[1][:, 1].any()


def test_alignment_and_verification_leave_them_out() -> None:
    """Moving a and b with their sum kept, and the off neuron's weight anyhow, leaves the function as it was:
    the weight error leaving them out is zero, counting them it is not."""
    ref, cand = _net(), _net(a=0.2, b=0.9, off=-5.0)
    X = np.random.default_rng(0).normal(size=(1000, 2)) * 3 + np.array([4.0, 0.0])
    np.testing.assert_allclose(ref(X), cand(X), rtol=0, atol=1e-12)  # the same function where neuron 0 is on
    masks = undetermined_weights(ref)
    exempt = align(ref, cand, undetermined=masks)
    assert exempt.max_norm_weight_error == 0.0 and exempt.layers[1].undetermined == 3
    assert not align(ref, cand).complete  # counted, the moved rows are too far off to match at all
    report = verify(ref, cand, n_random=2000, n_lines=4)
    assert report.max_norm_weight_error == 0.0 and report.to_json()["undetermined_weights"] == 3
    plain = verify(ref, cand, n_random=2000, n_lines=4, config=VerifyConfig(undetermined_neurons=0))
    assert plain.unmatched > 0 and plain.to_json()["undetermined_weights"] == 0


def test_a_determined_weight_still_counts() -> None:
    """Neuron 3's weight on the rare neuron is determined: changing it is an error even with the masks."""
    ref = _net()
    layers = [(W.copy(), b.copy()) for W, b in ref.layers]
    layers[1][0][3, 0] += 1e-3
    report = verify(ref, MLP(layers), n_random=2000, n_lines=4)
    # over the row's norm on the columns kept for matching (the rare neuron's column is not: it holds
    # undetermined weights), which is the other weight, 1
    assert report.max_norm_weight_error == pytest.approx(1e-3, rel=1e-9)


def test_masks_of_the_wrong_shape_are_refused() -> None:
    with pytest.raises(InputError, match="one mask per layer"):
        align(_net(), _net(), undetermined=[np.zeros((2, 2), dtype=bool)])
    with pytest.raises(InputError, match="undetermined_neurons"):
        VerifyConfig(undetermined_neurons=-1)
