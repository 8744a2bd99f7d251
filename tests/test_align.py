"""Alignment of a candidate network to a reference up to the ReLU symmetries (relux.align)."""

from __future__ import annotations

import json
import math
from decimal import Decimal, localcontext

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from symmetry_helpers import EPS, random_mlp, random_symmetry, replace_layer, symmetric_copy

from relux.align import LOG2_ZERO, align, always_on_rows, assign, pairwise_maxabs, safe_log2
from relux.errors import InputError
from relux.model import MLP

SETTINGS = settings(max_examples=60, deadline=None)


@st.composite
def nets(draw: st.DrawFn) -> tuple[tuple[int, ...], int]:
    """An architecture (input 2..6, 1..3 hidden layers of width 1..6, 1..3 outputs) and a seed."""
    d0 = draw(st.integers(2, 6))
    hidden = draw(st.lists(st.integers(1, 6), min_size=1, max_size=3))
    k = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**32 - 1))
    return (d0, *hidden, k), seed


# ----------------------------------------------------------------------------- exact symmetries
@SETTINGS
@given(nets())
def test_power_of_two_symmetric_copy_aligns_bit_exactly(case: tuple[tuple[int, ...], int]) -> None:
    # Scaling by a power of two is exact in floating point, and so are the norms of scaled rows and
    # their ratio, so the alignment must give the reference back bit for bit (tolerance 0).
    arch, seed = case
    rng = np.random.default_rng(seed)
    ref = random_mlp(rng, arch)
    perms, scales = random_symmetry(rng, arch[1:-1], powers_of_two=True)
    cand = symmetric_copy(ref, perms, scales)
    a = align(ref, cand)
    assert a.aligned == ref
    assert a.complete and a.sign_errors == 0
    assert a.max_norm_weight_error == 0.0
    assert a.log2_max_norm_weight_error == LOG2_ZERO
    for i, layer in enumerate(a.layers[:-1]):
        # candidate neuron k is reference neuron perms[i][k]
        assert [layer.permutation[p] for p in perms[i]] == list(range(arch[i + 1]))
        np.testing.assert_array_equal(np.array(layer.scales)[perms[i]], 1.0 / scales[i])


@SETTINGS
@given(nets())
def test_symmetric_copy_aligns_to_rounding(case: tuple[tuple[int, ...], int]) -> None:
    arch, seed = case
    rng = np.random.default_rng(seed)
    ref = random_mlp(rng, arch)
    perms, scales = random_symmetry(rng, arch[1:-1], powers_of_two=False)
    cand = symmetric_copy(ref, perms, scales)
    a = align(ref, cand)
    assert a.complete and a.sign_errors == 0
    # Every aligned entry is the reference entry through products and quotients only: 2 roundings to
    # build the copy, 2 to align it, and two scales (this row's and the previous column's), each a ratio
    # of 2-norms of rows of m <= max(arch)+1 entries, relative error <= (m + 4) eps each (sum of m
    # squares ~ m eps, halved by sqrt, for both norms, plus the copy's own 3 eps). Hence an entrywise
    # relative bound (2m + 16) eps, i.e. <= 1e-14 here (observed: a few eps).
    m = max(arch) + 1
    tol = (2 * m + 16) * EPS
    for (Wa, ba), (Wr, br) in zip(a.aligned.layers, ref.layers, strict=True):
        assert np.all(np.abs(Wa - Wr) <= tol * np.abs(Wr))
        assert np.all(np.abs(ba - br) <= tol * np.abs(br))
    # The normalised error divides by ||w||, so the bias entry counts |b| / ||w|| times its relative error.
    rows = [np.abs(np.column_stack([W, b])).max(axis=1) / np.linalg.norm(W, axis=1) for W, b in ref.layers[:-1]]
    Wo, bo = ref.layers[-1]
    worst = max(float(np.max(np.concatenate(rows))), float(np.abs(bo).max() / np.abs(Wo).max()))
    assert a.max_norm_weight_error <= tol * max(1.0, worst)


# ----------------------------------------------------------------------------- sign errors
@SETTINGS
@given(nets(), st.data())
def test_one_negated_row_is_one_sign_error_in_its_layer(case: tuple[tuple[int, ...], int], data: st.DataObject) -> None:
    arch, seed = case
    rng = np.random.default_rng(seed)
    ref = random_mlp(rng, arch)
    layer = data.draw(st.integers(0, len(arch) - 3), label="layer")
    j = data.draw(st.integers(0, arch[layer + 1] - 1), label="neuron")
    W, b = (np.array(x) for x in ref.layers[layer])
    W[j], b[j] = -W[j], -b[j]  # a negative scale, not compensated: not a symmetry
    perms, scales = random_symmetry(rng, arch[1:-1], powers_of_two=True)
    cand = symmetric_copy(replace_layer(ref, layer, W, b), perms, scales)
    a = align(ref, cand)
    assert a.complete
    assert a.sign_errors == 1
    assert [L.sign_errors for L in a.layers] == [int(i == layer) for i in range(len(a.layers))]
    assert a.layers[layer].sign_error_neurons == (j,)
    # The negated row stays negated (scale > 0): its error is max|2 (w, b)| / ||w|| >= 2 / sqrt(d)...
    assert a.layers[layer].max_norm_weight_error >= 2.0 / math.sqrt(arch[layer])
    # ...while the direction, sign aside, is exact (power-of-two scales: no rounding at all).
    assert a.max_direction_error == 0.0
    assert not ref.equivalent(cand)


# ----------------------------------------------------------------------------- perturbations
def _exact_row_error(wr: np.ndarray, br: float, wc: np.ndarray, bc: float) -> float:
    """max |s (wc, bc) - (wr, br)| / ||wr|| with s = ||wr|| / ||wc||, in 60-digit decimal arithmetic."""
    with localcontext() as ctx:
        ctx.prec = 60
        r = [Decimal(float(x)) for x in wr] + [Decimal(float(br))]
        c = [Decimal(float(x)) for x in wc] + [Decimal(float(bc))]
        nr = sum((x * x for x in r[:-1]), Decimal(0)).sqrt()
        nc = sum((x * x for x in c[:-1]), Decimal(0)).sqrt()
        s = nr / nc
        return float(max(abs(ci * s - ri) for ri, ci in zip(r, c, strict=True)) / nr)


@SETTINGS
@given(nets(), st.data(), st.integers(16, 40))
def test_weight_perturbation_error_matches_exact_value(
    case: tuple[tuple[int, ...], int], data: st.DataObject, log2_eps: int
) -> None:
    arch, seed = case
    rng = np.random.default_rng(seed)
    ref = random_mlp(rng, arch)
    layer = data.draw(st.integers(0, len(arch) - 3), label="layer")
    j = data.draw(st.integers(0, arch[layer + 1] - 1), label="row")
    k = data.draw(st.integers(0, arch[layer] - 1), label="column")
    eps = 2.0**-log2_eps
    W, b = (np.array(x) for x in ref.layers[layer])
    # an always-on row's bias is a gauge (test_always_on.py): its error is measured on the weights
    assume(layer == 0 or not always_on_rows(W, b)[j])
    W[j, k] += eps
    perms, scales = random_symmetry(rng, arch[1:-1], powers_of_two=True)  # leave the exact value unchanged
    cand = symmetric_copy(replace_layer(ref, layer, W, b), perms, scales)
    # no threshold: a large eps on a short row must be measured, not rejected
    L = align(ref, cand, match_threshold=math.inf).layers[layer]
    Wr, br = ref.layers[layer]
    exact = _exact_row_error(Wr[j], br[j], W[j], b[j])
    # The reported value rounds a ratio of norms ((m + 3) eps), a product and a quotient by a norm:
    # absolute error <= (2m + 8) eps times the largest normalised entry.
    m = arch[layer] + 1
    scale = max(1.0, float(np.abs(np.append(Wr[j], br[j])).max() / np.linalg.norm(Wr[j])))
    rounding = (2 * m + 8) * EPS * scale
    assert abs(L.neuron_errors[j] - exact) <= rounding
    assert L.max_norm_weight_error == L.neuron_errors[j]  # the other rows are untouched: error 0
    # To first order in eps the error is eps/||w|| * max(1 - w_k^2, max_{e != k} |w_k r_e|) (unit w).
    n = float(np.linalg.norm(Wr[j]))
    wk = Wr[j, k] / n
    r = np.append(Wr[j], br[j]) / n
    first = eps / n * max(1.0 - wk**2, float(np.abs(np.delete(r, k)).max(initial=0.0) * abs(wk)))
    # Expanding ||w + eps e_k||^-1 to second order, each entry's second-order term is at most
    # 1.5 |r_e| (eps/n)^2 + (eps/n)^2, so 3 (eps/n)^2 max(1, max|r|) bounds it; plus rounding.
    assert abs(L.neuron_errors[j] - first) <= 3 * (eps / n) ** 2 * scale + rounding


def test_bias_perturbation_error_is_eps_over_norm() -> None:
    rng = np.random.default_rng(7)
    ref = random_mlp(rng, (5, 4, 3, 2))
    eps = 2.0**-30
    W, b = (np.array(x) for x in ref.layers[1])
    b[2] += eps
    cand = replace_layer(ref, 1, W, b)
    a = align(ref, cand)
    Wr, br = ref.layers[1]
    # ||w|| is untouched, so the scale is exactly 1 and the only error is fl(b + eps) - b = eps (1 + d)
    # with |d| <= |b| eps_machine / eps ~ 2^-22; all other layers are bit-exact. Against the exact
    # value: the subtraction is exact (Sterbenz), the computed norm of 3 entries is off by <= 2.5 eps
    # and the division rounds once: rel 8 eps is safe.
    expected = _exact_row_error(Wr[2], br[2], W[2], b[2])
    assert a.max_norm_weight_error == pytest.approx(expected, rel=8 * EPS)
    assert a.max_norm_weight_error == pytest.approx(eps / np.linalg.norm(Wr[2]), rel=1e-6)
    assert [L.max_norm_weight_error for L in a.layers] == [0.0, a.max_norm_weight_error, 0.0]
    assert ref.equivalent(cand, rtol=1e-8) and not ref.equivalent(cand, rtol=1e-12)


def test_output_layer_error_is_relative_to_largest_output_weight() -> None:
    rng = np.random.default_rng(8)
    ref = random_mlp(rng, (4, 3, 5))
    W, b = (np.array(x) for x in ref.layers[-1])
    W[1, 2] += 1e-9
    b[4] -= 3e-9
    a = align(ref, replace_layer(ref, 1, W, b))
    Wr, br = ref.layers[-1]
    with localcontext() as ctx:
        ctx.prec = 60
        exact = max(abs(Decimal(W[1, 2]) - Decimal(Wr[1, 2])), abs(Decimal(b[4]) - Decimal(br[4])))
        exact /= Decimal(float(np.abs(Wr).max()))
    # one subtraction (exact by Sterbenz's lemma for close values) and one division: 1 rounding
    assert a.max_norm_weight_error == pytest.approx(float(exact), rel=2 * EPS)
    assert a.layers[0].max_norm_weight_error == 0.0


# ----------------------------------------------------------------------------- unmatched neurons
def _drop_neuron(model: MLP, layer: int, j: int) -> MLP:
    layers = [(np.array(W), np.array(b)) for W, b in model.layers]
    W, b = layers[layer]
    layers[layer] = (np.delete(W, j, axis=0), np.delete(b, j))
    layers[layer + 1] = (np.delete(layers[layer + 1][0], j, axis=1), layers[layer + 1][1])
    return model.with_layers(layers)


@SETTINGS
@given(nets(), st.data())
def test_missing_neuron_is_reported_unmatched(case: tuple[tuple[int, ...], int], data: st.DataObject) -> None:
    arch, seed = case
    rng = np.random.default_rng(seed)
    ref = random_mlp(rng, arch)
    layer = data.draw(st.integers(0, len(arch) - 3), label="layer")
    j = data.draw(st.integers(0, arch[layer + 1] - 1), label="neuron")
    cand = _drop_neuron(ref, layer, j)
    a = align(ref, cand)
    assert not a.complete
    assert a.layers[layer].unmatched_reference == (j,)
    assert a.layers[layer].unmatched_candidate == ()
    assert a.unmatched_reference == 1 and a.unmatched_candidate == 0
    assert a.sign_errors == 0
    assert a.aligned.arch == ref.arch
    Wa, ba = a.aligned.layers[layer]
    assert not Wa[j].any() and ba[j] == 0.0 and not a.aligned.layers[layer + 1][0][:, j].any()
    if arch[layer + 1] > 1:
        # The weights leaving the missing neuron are left out of the next layer's comparison, so the
        # matched neurons are still exact (no scale: no rounding).
        assert a.max_norm_weight_error == 0.0


def test_extra_candidate_neuron_is_reported_unmatched() -> None:
    rng = np.random.default_rng(3)
    ref = random_mlp(rng, (4, 3, 3, 2))
    W, b = (np.array(x) for x in ref.layers[0])
    W = np.insert(W, 1, rng.standard_normal(4), axis=0)
    b = np.insert(b, 1, 0.3)
    W2, b2 = ref.layers[1]
    W2 = np.insert(W2, 1, rng.standard_normal(3), axis=1)
    cand = MLP([(W, b), (W2, b2), ref.layers[2]])
    a = align(ref, cand)
    assert a.layers[0].unmatched_candidate == (1,)
    assert a.layers[0].unmatched_reference == ()
    assert a.layers[0].permutation == (0, 2, 3)
    assert not a.complete and a.unmatched_candidate == 1
    assert a.aligned.arch == ref.arch
    assert a.max_norm_weight_error == 0.0  # the extra neuron is reported, not blended into the others


def test_threshold_separates_far_pairs_and_reports_them() -> None:
    rng = np.random.default_rng(4)
    ref = random_mlp(rng, (6, 4, 2))
    W, b = (np.array(x) for x in ref.layers[0])
    W[2] += 0.2 * rng.standard_normal(6)  # far beyond the default threshold 1e-2
    cand = replace_layer(ref, 0, W, b)
    a = align(ref, cand)
    L = a.layers[0]
    assert L.unmatched_reference == (2,) and L.unmatched_candidate == (2,)
    assert len(L.rejected) == 1 and L.rejected[0][:2] == (2, 2) and L.rejected[0][2] > 1e-2
    assert L.max_norm_weight_error == 0.0  # over matched neurons only
    loose = align(ref, cand, match_threshold=math.inf)
    assert loose.complete and loose.layers[0].max_norm_weight_error == pytest.approx(L.rejected[0][2])
    with pytest.raises(InputError):
        align(ref, cand, match_threshold=0.0)
    with pytest.raises(InputError):
        align(ref, cand, match_threshold=float("nan"))


def test_no_match_in_a_layer_reports_infinite_error_and_valid_json() -> None:
    rng = np.random.default_rng(5)
    ref = random_mlp(rng, (3, 2, 1))
    cand = random_mlp(np.random.default_rng(6), (3, 2, 1))
    a = align(ref, cand, match_threshold=1e-12)
    assert a.layers[0].matched == 0 and math.isinf(a.max_norm_weight_error)
    doc = a.to_json()
    json.dumps(doc, allow_nan=False)
    assert doc["max_norm_weight_error"] is None and doc["layers"][0]["scales"] == [None, None]


# ----------------------------------------------------------------------------- kernels and errors
def test_assign_prefers_more_matches_over_smaller_total() -> None:
    # Plain minimum-sum assignment picks the diagonal (0 + 0.011 < 0.009 + 0.009), whose second pair is
    # beyond the threshold 0.01; both anti-diagonal pairs are within it, so with the threshold they win.
    D = np.array([[0.0, 0.009], [0.009, 0.011]])
    rows, cols = assign(D, 0.01)
    assert sorted(zip(rows.tolist(), cols.tolist(), strict=True)) == [(0, 1), (1, 0)]
    rows, cols = assign(D, math.inf)
    assert sorted(zip(rows.tolist(), cols.tolist(), strict=True)) == [(0, 0), (1, 1)]


def test_pairwise_maxabs_matches_direct_computation() -> None:
    rng = np.random.default_rng(9)
    A, B = rng.standard_normal((7, 5)), rng.standard_normal((4, 5))
    plus, minus = pairwise_maxabs(A, B)
    for i in range(7):
        for j in range(4):
            assert plus[i, j] == np.abs(A[i] - B[j]).max() and minus[i, j] == np.abs(A[i] + B[j]).max()


def test_incompatible_networks_raise_input_error() -> None:
    rng = np.random.default_rng(10)
    ref = random_mlp(rng, (4, 3, 2))
    for other in [(5, 3, 2), (4, 3, 3), (4, 3, 3, 2)]:
        with pytest.raises(InputError):
            align(ref, random_mlp(rng, other))
    with pytest.raises(InputError):
        align(ref, "not a model")  # type: ignore[arg-type]
    assert not ref.equivalent(random_mlp(rng, (4, 5, 2)))


def test_equivalent_and_readable_output() -> None:
    rng = np.random.default_rng(11)
    ref = random_mlp(rng, (5, 4, 4, 3))
    perms, scales = random_symmetry(rng, (4, 4), powers_of_two=False)
    cand = symmetric_copy(ref, perms, scales)
    assert ref.equivalent(cand) and cand.equivalent(ref)
    a = align(ref, cand)
    text = repr(a)
    assert "complete=True" in text and "5-4x2-3" in text and "sign_errors=0" in text
    assert "hidden" in repr(a.layers[0])
    doc = a.to_json()
    json.dumps(doc, allow_nan=False)
    assert doc["complete"] is True and doc["sign_errors"] == 0 and len(doc["layers"]) == 3
    assert safe_log2(0.0) == -1074.0 and safe_log2(0.25) == -2.0
