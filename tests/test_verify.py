"""Verification of an extracted network against a reference (relux.verify, ``relux verify``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from symmetry_helpers import EPS, random_mlp, random_symmetry, replace_layer, symmetric_copy

from relux.cli import main
from relux.errors import InputError
from relux.model import MLP
from relux.verify import VerificationReport, VerifyConfig, kink_parameters, line_parameters, verify

MODELS = Path(__file__).resolve().parents[2] / "shared" / "models"
REQUIRED_KEYS = {
    "max_norm_weight_error",
    "log2_max_norm_weight_error",
    "max_rel_output_error",
    "argmax_agreement",
    "sign_errors",
    "unmatched",
    "layers",
    "functional",
}
FAST = {"n_random": 2000, "n_lines": 16}


def _abs_network_bound(model: MLP, X: np.ndarray) -> float:
    """max over X of the network run with |W|, |b| on |x| (bounds the sum of |terms| in every dot product)."""
    H = np.abs(X)
    for W, b in model.layers[:-1]:
        H = H @ np.abs(W).T + np.abs(b)
    W, b = model.layers[-1]
    return float((H @ np.abs(W).T + np.abs(b)).max())


# ----------------------------------------------------------------------------- exact and symmetric copies
def test_exact_copy_has_zero_error_everywhere() -> None:
    ref = random_mlp(np.random.default_rng(0), (6, 8, 8, 4))
    copy = MLP([(np.array(W), np.array(b)) for W, b in ref.layers])
    report = verify(ref, copy, rng=np.random.default_rng(1), **FAST)
    # same weights, same operations: bit-identical outputs and weights
    assert report.max_rel_output_error == 0.0
    assert report.log2_max_rel_output_error == -1074.0
    assert report.max_norm_weight_error == 0.0
    assert report.argmax_agreement == 1.0 and report.agreement_kind == "argmax"
    assert report.sign_errors == 0 and report.unmatched == 0 and report.complete
    assert [s.name for s in report.functional] == ["gaussian", "uniform", "lines"]
    assert report.source("gaussian").n_points == report.source("uniform").n_points == 2000


def test_symmetric_copy_has_rounding_level_output_error() -> None:
    rng = np.random.default_rng(2)
    arch = (6, 8, 8, 4)
    ref = random_mlp(rng, arch)
    perms, scales = random_symmetry(rng, arch[1:-1], powers_of_two=False)
    cand = symmetric_copy(ref, perms, scales)
    report = verify(ref, cand, rng=np.random.default_rng(3), **FAST)
    assert report.complete and report.sign_errors == 0 and report.argmax_agreement == 1.0
    # Each network's output has a forward error <= (L + 1)(n + 2) eps * F_abs(x) (n = widest dot product,
    # F_abs the network with absolute weights on |x|); the copy's weights add 3 eps relative per entry
    # per layer. Over inputs like those verify draws, F_abs / max|f| stays below 50 for this network
    # (checked below), so 2 * (L + 1)(n + 5) eps * 50 ~ 5e-13 bounds the relative output error.
    X = np.random.default_rng(4).standard_normal((2000, arch[0]))
    ratio = _abs_network_bound(ref, X) / float(np.abs(ref.forward(X)).max())
    assert ratio < 50
    assert report.max_rel_output_error <= 2 * 3 * (8 + 5) * EPS * 50
    assert report.max_norm_weight_error <= 1e-14  # see test_align for the entrywise bound


def test_report_is_reproducible_from_the_rng() -> None:
    rng = np.random.default_rng(5)
    ref = random_mlp(rng, (4, 5, 3))
    W, b = (np.array(x) for x in ref.layers[0])
    W[0, 0] += 1e-6
    cand = replace_layer(ref, 0, W, b)
    a = verify(ref, cand, rng=np.random.default_rng(9), **FAST).to_json()
    b2 = verify(ref, cand, rng=np.random.default_rng(9), **FAST).to_json()
    assert a == b2
    assert verify(ref, cand, **FAST).to_json() == verify(ref, cand, **FAST).to_json()  # default seed


# ----------------------------------------------------------------------------- errors are detected
def test_perturbed_weight_shows_in_weights_and_outputs() -> None:
    rng = np.random.default_rng(6)
    ref = random_mlp(rng, (5, 6, 3))
    W, b = (np.array(x) for x in ref.layers[0])
    W[2, 1] += 1e-5
    cand = replace_layer(ref, 0, W, b)
    report = verify(ref, cand, rng=np.random.default_rng(0), **FAST)
    assert report.complete and report.sign_errors == 0
    assert report.layers[0].neuron_errors[2] == report.max_norm_weight_error
    assert 0.1 * 1e-5 / np.linalg.norm(ref.layers[0][0][2]) < report.max_norm_weight_error < 2e-5
    assert 1e-9 < report.max_rel_output_error < 1e-3


def test_sign_error_is_reported_and_changes_outputs() -> None:
    rng = np.random.default_rng(7)
    ref = random_mlp(rng, (5, 6, 6, 3))
    W, b = (np.array(x) for x in ref.layers[1])
    W[4], b[4] = -W[4], -b[4]
    report = verify(ref, replace_layer(ref, 1, W, b), rng=np.random.default_rng(0), **FAST)
    assert report.sign_errors == 1 and report.layers[1].sign_error_neurons == (4,)
    assert report.complete
    assert report.max_rel_output_error > 1e-3
    assert report.max_norm_weight_error > 0.5
    assert report.alignment.max_direction_error < 1e-15
    table = report.to_table()
    assert "sign errors at reference neurons [4]" in table


def test_missing_dead_neuron_is_unmatched_but_function_is_exact() -> None:
    rng = np.random.default_rng(8)
    ref = random_mlp(rng, (5, 6, 4, 2))
    W, b = (np.array(x) for x in ref.layers[0])
    b[3] = -1e6  # dead on every input verify draws (|w.x| < 1e3 there)
    ref = replace_layer(ref, 0, W, b)
    W2, b2 = ref.layers[1]
    cand = MLP([(np.delete(W, 3, axis=0), np.delete(b, 3)), (np.delete(W2, 3, axis=1), b2), ref.layers[2]])
    report = verify(ref, cand, rng=np.random.default_rng(0), **FAST)
    assert report.layers[0].unmatched_reference == (3,)
    assert report.unmatched == 1 and report.unmatched_reference == 1 and report.unmatched_extracted == 0
    assert not report.complete
    assert report.max_norm_weight_error == 0.0  # matched neurons are exact; the dead one is just missing
    # The dead neuron's ReLU outputs exact zeros, so dropping it changes at most the summation order
    # in the next layer: rounding-level (bounded as in the symmetric-copy test).
    assert report.max_rel_output_error <= 1e-13
    doc = report.to_json()
    assert doc["layers"][0]["unmatched_reference"] == [3] and doc["layers"][0]["unmatched_extracted"] == []
    assert "unmatched reference neurons [3]" in report.to_table()


def test_single_output_reports_sign_agreement() -> None:
    rng = np.random.default_rng(9)
    ref = random_mlp(rng, (4, 6, 1))
    same = verify(ref, ref, rng=np.random.default_rng(0), **FAST)
    assert same.agreement_kind == "sign" and same.argmax_agreement == 1.0
    W, b = ref.layers[-1]
    flipped = replace_layer(ref, 1, -W, -b)  # f' = -f: every nonzero output changes sign
    report = verify(ref, flipped, rng=np.random.default_rng(0), **FAST)
    assert report.argmax_agreement < 0.05
    assert report.max_rel_output_error == pytest.approx(2.0)


# ----------------------------------------------------------------------------- lines across kinks
def test_lines_cross_most_first_layer_hyperplanes() -> None:
    rng = np.random.default_rng(10)
    ref = random_mlp(rng, (10, 64, 8, 3))
    W, b = ref.layers[0]
    for _ in range(10):
        x0, u = rng.standard_normal(10), rng.standard_normal(10)
        u /= np.linalg.norm(u)
        kinks = kink_parameters(W, b, x0, u)
        np.testing.assert_allclose((W @ x0 + b) + kinks * (W @ u), 0.0, atol=1e-12)
        t = line_parameters(kinks, np.zeros(0), points_per_line=256, coverage=0.9)
        assert np.all(np.diff(t) > 0)
        pattern = ref.activation_patterns(x0 + t[:, None] * u)[0]
        flipped = np.count_nonzero(pattern.any(axis=0) & ~pattern.all(axis=0))
        # The segment spans the 5%..95% interpolated quantiles of the 64 crossings (sorted indices
        # 3.15..59.85, so >= 56 of them) plus 5% margins, with grid points beyond both ends.
        assert flipped >= 0.9 * (64 - 1) - 1
        inside = kinks[(kinks >= t[0]) & (kinks <= t[-1])]
        assert np.isin(inside, t).all()  # every kink in the segment is evaluated exactly


def test_line_source_finds_an_error_confined_near_one_kink() -> None:
    # The extracted network differs from the reference only where one first-layer neuron is active,
    # in a thin slab: the error is zero at almost every random input but the lines cross the slab.
    rng = np.random.default_rng(11)
    ref = random_mlp(rng, (3, 5, 1))
    W, b = (np.array(x) for x in ref.layers[0])
    W[0] = np.array([1.0, 0.0, 0.0])
    b[0] = -8.0  # active only for x_0 > 8: never for U[0,1] inputs, with probability ~1e-15 for N(0,1)
    ref = replace_layer(ref, 0, W, b)
    W2, b2 = (np.array(x) for x in ref.layers[1])
    W2[0, 0] = 1.0
    cand = replace_layer(ref, 1, W2 * np.array([[2.0, 1, 1, 1, 1]]), b2)
    # With 64 lines (the default) the slab was crossed for 200 of 200 seeds tried; 16 lines miss ~7%.
    report = verify(ref, cand, rng=np.random.default_rng(0), n_random=2000, n_lines=64)
    assert report.source("gaussian").max_abs_error == 0.0
    assert report.source("uniform").max_abs_error == 0.0
    assert report.source("lines").max_abs_error > 0.0


# ----------------------------------------------------------------------------- output and inputs
def test_json_and_table_and_repr() -> None:
    rng = np.random.default_rng(12)
    ref = random_mlp(rng, (4, 5, 5, 3))
    perms, scales = random_symmetry(rng, (5, 5), powers_of_two=True)
    report = verify(ref, symmetric_copy(ref, perms, scales), rng=np.random.default_rng(0), **FAST)
    assert isinstance(report, VerificationReport)
    doc = report.to_json()
    assert REQUIRED_KEYS <= doc.keys()
    text = json.dumps(doc, allow_nan=False)
    assert json.loads(text) == doc
    assert len(doc["layers"]) == 3 and doc["layers"][-1]["kind"] == "output"
    assert set(doc["functional"]) == {"gaussian", "uniform", "lines"}
    assert {"n_points", "max_rel_error", "log2_max_rel_error", "agreement"} <= doc["functional"]["lines"].keys()
    table = report.to_table()
    for word in ("layer", "hidden", "output", "gaussian", "uniform", "lines", "argmax agreement", "4-5x2-3"):
        assert word in table
    assert repr(report).startswith("VerificationReport(4-5x2-3 vs 4-5x2-3")


def test_bad_inputs_raise_input_error() -> None:
    rng = np.random.default_rng(13)
    ref = random_mlp(rng, (4, 5, 3))
    for other in [(5, 5, 3), (4, 5, 2), (4, 5, 5, 3)]:
        with pytest.raises(InputError):
            verify(ref, random_mlp(rng, other), **FAST)
    with pytest.raises(InputError):
        verify(ref, ref, n_random=0, n_lines=0)
    with pytest.raises(InputError):
        verify(ref, ref, n_random=-1)
    with pytest.raises(InputError):
        verify(ref, [(1, 2)])  # type: ignore[arg-type]
    for bad in [{"match_threshold": -1.0}, {"points_per_line": 1}, {"line_coverage": 0.0}, {"batch_size": 0}]:
        with pytest.raises(InputError):
            VerifyConfig(**bad)  # type: ignore[arg-type]
    only_lines = verify(ref, ref, n_random=0, n_lines=4)
    assert [s.name for s in only_lines.functional] == ["lines"]


# ----------------------------------------------------------------------------- CLI
def _save(model: MLP, path: Path) -> str:
    formats = pytest.importorskip("relux.formats")
    if not hasattr(formats, "save_model"):
        pytest.skip("relux.formats.save_model is not available yet")
    formats.save_model(model, path)
    return str(path)


def test_cli_json_is_one_object(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(14)
    ref = random_mlp(rng, (4, 6, 2))
    perms, scales = random_symmetry(rng, (6,), powers_of_two=False)
    a = _save(ref, tmp_path / "ref.npz")
    b = _save(symmetric_copy(ref, perms, scales), tmp_path / "ext.npz")
    args = ["verify", "--reference", a, "--extracted", b, "--samples", "500", "--lines", "4"]
    assert main([*args, "--json", "--seed", "3"]) == 0
    doc = json.loads(capsys.readouterr().out)  # exactly one JSON document on stdout
    assert REQUIRED_KEYS <= doc.keys() and doc["complete"] and doc["seed"] == 3
    assert doc["functional"]["gaussian"]["n_points"] == 500
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "max norm weight error" in out and "gaussian" in out


def test_cli_bad_inputs_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(15)
    a = _save(random_mlp(rng, (4, 6, 2)), tmp_path / "a.npz")
    b = _save(random_mlp(rng, (5, 6, 2)), tmp_path / "b.npz")
    assert main(["verify", "--reference", a, "--extracted", b]) == 2
    assert main(["verify", "--reference", a, "--extracted", str(tmp_path / "missing.npz")]) == 2
    assert main(["verify", "--reference", a, "--extracted", a, "--samples", "0", "--lines", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("relux: error:") == 3 and capsys.readouterr().out == ""
    with pytest.raises(SystemExit) as exc:
        main(["verify", "--reference", a, "--extracted", a, "--samples", "-3"])
    assert exc.value.code == 2


# ----------------------------------------------------------------------------- real victim weights
@pytest.mark.parametrize(
    "name", ["random-cjm20-style/10_5x2_1_Carlini.keras", "unitary-cm24/unitary_100_200x3_10.keras"]
)
def test_real_model_against_its_symmetric_copy(name: str) -> None:
    path = MODELS / name
    if not path.is_file():
        pytest.skip(f"{path} not present")
    formats = pytest.importorskip("relux.formats")
    ref = formats.load_model(path)
    rng = np.random.default_rng(16)
    perms, scales = random_symmetry(rng, ref.hidden_widths, powers_of_two=False)
    report = verify(ref, symmetric_copy(ref, perms, scales), rng=rng, n_random=2000, n_lines=8)
    assert report.complete and report.sign_errors == 0 and report.argmax_agreement == 1.0
    # rounding only: see test_align (entrywise (2m + 16) eps) and the symmetric-copy test above;
    # these networks' outputs come out below 2^-45 relative (observed ~2^-49).
    assert report.max_norm_weight_error < 2.0**-45
    assert report.max_rel_output_error < 2.0**-45


def test_unmatched_reference_neurons_report_how_often_they_are_on() -> None:
    """A reference neuron the extraction lacks is listed with the fraction of N(0, I) inputs where it
    is on: exactly 0 for a neuron whose weights and bias are all negative (its input is a ReLU
    output, so it is never on), about one half for an ordinary one."""
    rng = np.random.default_rng(0)
    W1, b1 = rng.normal(size=(6, 4)), rng.normal(size=6)
    W2, b2 = rng.normal(size=(5, 6)), rng.normal(size=5)
    W2[4], b2[4] = -np.abs(W2[4]), -1.0  # dead: never on
    W3, b3 = rng.normal(size=(2, 5)), rng.normal(size=2)
    ref = MLP([(W1, b1), (W2, b2), (W3, b3)])
    ext = MLP([(W1, b1), (W2[:3], b2[:3]), (W3[:, :3], b3)])  # neurons 3 and 4 of layer 2 missing
    rep = verify(ref, ext, n_random=200, n_lines=0, config=VerifyConfig(activity_points=20000))
    act = {(li, j): (f, n) for li, j, f, n in rep.unmatched_activity}
    assert set(act) == {(1, 3), (1, 4)}
    assert act[(1, 4)] == (0.0, 20000)
    assert 0.0 < act[(1, 3)][0] < 1.0
    assert rep.to_json()["unmatched_activity"][0]["inputs"] == 20000
    assert "N(0, I) inputs where each is on: 3: " in rep.to_table()
