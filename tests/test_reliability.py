"""Numerical honesty: an extraction through an inexact oracle (float32 outputs, Gaussian noise) either
succeeds with its self-check judged against the measured noise floor, or fails (exit status 1). It never
reports a passed self-check whose residual exceeds its tolerance, and the noise floor is shown in the
``relux extract`` summary and report.

The attack's rule (``relux.attack.checks.self_check``): the self-check passes when
``max|f - f'| / max|f| <= max(selfcheck_tol, 100 * noise_floor)`` on fresh queries.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relux.attack import ExtractionConfig, ExtractionResult, extract
from relux.attack.checks import STOP_MIN_POINTS, measure_noise_floor, self_check
from relux.attack.result import SelfCheck
from relux.cli import main
from relux.errors import BudgetExhausted, ExtractionFailed
from relux.model import MLP
from relux.oracle import BudgetOracle, Float32Oracle, MLPOracle, NoisyOracle
from relux.oracle.base import Oracle
from relux.zoo import random_mlp

ARCH = (12, 8, 2)

#: The self-check tolerance the CLI and ExtractionConfig use by default.
SELFCHECK_TOL = 1e-8

#: A guard on every run through an inexact oracle: about 100x the queries an exact extraction of ARCH
#: needs (about 2^11.4). A kink search that does not converge keeps doubling its batches; the budget
#: ends it as a failed run (BudgetExhausted, exit status 1) long before it could exhaust memory.
BUDGET = 200_000


def victim(seed: int = 0) -> MLP:
    return random_mlp(ARCH, np.random.default_rng(seed))


def float32_oracle(seed: int = 0) -> Oracle:
    return Float32Oracle(MLPOracle(victim(seed)))


def noisy_oracle(seed: int = 0) -> Oracle:
    return NoisyOracle(MLPOracle(victim(seed)), 1e-6, np.random.default_rng(100 + seed))


def assert_check_is_honest(check: SelfCheck, selfcheck_tol: float) -> None:
    """The verdict follows the rule: tolerance = max(T, 100 * noise floor), passed iff within it."""
    assert check.noise_floor >= 0.0 and np.isfinite(check.noise_floor)
    assert check.tolerance == max(selfcheck_tol, 100.0 * check.noise_floor)
    assert check.passed == (check.max_rel_error <= check.tolerance)


def assert_success_is_honest(result: ExtractionResult) -> None:
    """A successful run through an inexact oracle: it measured the inexactness and judged against it."""
    check = result.selfcheck
    assert_check_is_honest(check, SELFCHECK_TOL)
    assert check.passed and check.max_rel_error <= check.tolerance
    assert result.noise_floor == check.noise_floor > 0.0
    assert check.tolerance >= 100.0 * result.noise_floor


def extract_or_failure(oracle: Oracle, seed: int) -> ExtractionResult | Exception:
    try:
        return extract(BudgetOracle(oracle, BUDGET), ARCH, ExtractionConfig(seed=seed))
    except (ExtractionFailed, BudgetExhausted) as exc:
        return exc


def assert_outcome_is_honest(outcome: ExtractionResult | Exception) -> None:
    if isinstance(outcome, ExtractionResult):
        assert_success_is_honest(outcome)
        return
    partial = getattr(outcome, "partial", None)
    if isinstance(partial, ExtractionResult):  # a model was built and the self-check rejected it
        assert_check_is_honest(partial.selfcheck, SELFCHECK_TOL)
        assert not partial.selfcheck.passed
        assert partial.selfcheck.max_rel_error > partial.selfcheck.tolerance


# --------------------------------------------------------------------------- the library
@pytest.mark.parametrize("make", [float32_oracle, noisy_oracle], ids=["float32", "noise-1e-6"])
@pytest.mark.parametrize("seed", [0, 1])
def test_inexact_oracle_extraction_is_honest(make: Any, seed: int) -> None:
    assert_outcome_is_honest(extract_or_failure(make(seed), seed))


def test_exact_oracle_control() -> None:
    """The same victim answered exactly: a passed self-check far inside the default tolerance."""
    result = extract(MLPOracle(victim()), ARCH, ExtractionConfig(seed=0))
    assert_check_is_honest(result.selfcheck, SELFCHECK_TOL)
    assert result.selfcheck.passed
    # float64 rounding: the oracle disagrees with itself (BLAS kernels differ across batch sizes) by
    # a few ulps of max|f| at most, far below the default tolerance.
    assert result.noise_floor < 1e-13


def test_noise_floor_sees_gaussian_noise() -> None:
    rng = np.random.default_rng(0)
    oracle = noisy_oracle()
    floor = measure_noise_floor(oracle.query, ARCH[0], 1.0, rng)
    # Differences of two N(0, 1e-6^2) draws over 2 * 8 * 2 outputs, relative to max|f| (of order 1):
    # at least a few 1e-7 and at most a few 1e-5.
    assert 1e-8 < floor < 1e-4


def test_noise_floor_sees_float32_outputs() -> None:
    floor = measure_noise_floor(float32_oracle().query, ARCH[0], 1.0, np.random.default_rng(0))
    assert floor > 0.0


def test_float32_oracle_fails_or_succeeds_without_a_runaway() -> None:
    outcome = extract_or_failure(float32_oracle(0), 0)
    assert not isinstance(outcome, BudgetExhausted), outcome


# --------------------------------------------------------------------------- the self-check rule itself
@settings(max_examples=40, deadline=None)
@given(
    tol=st.floats(1e-12, 1e-3),
    floor=st.one_of(st.just(0.0), st.floats(1e-16, 1e-2)),
    error=st.floats(0.0, 1e-1),
)
def test_self_check_verdict_follows_the_noise_floor(tol: float, floor: float, error: float) -> None:
    """``self_check`` against an oracle that is off by ``error * max|f|``: passed iff within the rule."""
    model = victim()
    probe = np.random.default_rng(1).normal(size=(64, ARCH[0]))

    def oracle(X: np.ndarray) -> np.ndarray:
        # A constant offset of `error` times the largest output: the relative residual is ~ error.
        Y = model.forward(X)
        return Y + error * float(np.max(np.abs(model.forward(probe))))

    rng = np.random.default_rng(2)
    check = self_check(
        oracle, model, np.empty((0, ARCH[0])), np.empty((0, ARCH[0])), np.empty(0), 64, 1.0, tol, floor, rng
    )
    assert_check_is_honest(check, tol)
    if check.passed:
        assert check.max_rel_error <= max(tol, 100.0 * floor)


# --------------------------------------------------------------------------- the CLI
def run_cli(argv: Sequence[str]) -> int:
    try:
        return main(list(argv))
    except SystemExit as exc:
        return int(exc.code) if isinstance(exc.code, int) else 1


ORACLES = """\
import numpy as np

from relux.oracle import Float32Oracle, MLPOracle, NoisyOracle
from relux.zoo import random_mlp

_model = random_mlp((12, 8, 2), np.random.default_rng(0))
_f32 = Float32Oracle(MLPOracle(_model))
_noisy = NoisyOracle(MLPOracle(_model), 1e-6, np.random.default_rng(100))


def f32(X):
    return _f32.query(X)


def noisy(X):
    return _noisy.query(X)
"""


@pytest.mark.parametrize("name", ["f32", "noisy"])
def test_cli_inexact_oracle_exit_status_matches_the_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    (tmp_path / "oracles.py").write_text(ORACLES)
    out, rep = tmp_path / "x.npz", tmp_path / "r.json"
    argv = ["extract", "--oracle", f"{tmp_path / 'oracles.py'}:{name}", "--arch", "12-8-2"]
    code = run_cli([*argv, "--budget", str(BUDGET), "--out", str(out), "--report", str(rep)])
    captured = capsys.readouterr()
    report: dict[str, Any] = json.loads(rep.read_text())
    assert code in (0, 1), captured.err
    assert out.exists() == (code == 0) == report["ok"] == (not report["failed"])
    if code == 0:
        check = report["selfcheck"]
        assert report["noise_floor"] == check["noise_floor"] > 0.0
        assert check["tolerance"] >= 100.0 * report["noise_floor"]
        assert check["passed"] and check["max_rel_error"] <= check["tolerance"]
        assert "noise floor" in captured.out
    else:
        assert "failed" in captured.err and len(captured.err.strip().splitlines()) == 1
        if "selfcheck" in report:  # the self-check ran and rejected the model
            assert report["selfcheck"]["passed"] is False
            assert report["selfcheck"]["max_rel_error"] > report["selfcheck"]["tolerance"]


def test_cli_summary_and_report_show_the_noise_floor(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from relux.formats import save_model

    save_model(victim(), tmp_path / "v.npz")
    out, rep = tmp_path / "x.npz", tmp_path / "r.json"
    tol = 1e-10
    argv = ["extract", "--model", str(tmp_path / "v.npz"), "--out", str(out), "--report", str(rep)]
    assert run_cli([*argv, "--selfcheck-tol", str(tol)]) == 0
    stdout = capsys.readouterr().out
    report = json.loads(rep.read_text())
    floor = report["noise_floor"]
    assert floor == report["selfcheck"]["noise_floor"] >= 0.0
    assert report["selfcheck"]["tolerance"] == max(tol, 100.0 * floor)
    line = next(line for line in stdout.splitlines() if line.startswith("noise floor"))
    assert f"{floor:.3g}" in line


def test_self_check_keeps_the_inputs_it_disagrees_at_and_bounds_what_it_missed() -> None:
    """The oracle differs from the model only where ``x_0 > 2`` (2.3% of N(0, I) inputs): every kept
    disagreement lies there, at most 16; a check that passes gives the rule-of-three bound."""
    model = victim()

    def oracle(X: np.ndarray) -> np.ndarray:
        return np.asarray(model.forward(X) + (X[:, :1] > 2.0))

    empty = np.empty((0, ARCH[0]))
    check = self_check(oracle, model, empty, empty, np.empty(0), 5000, 1.0, 1e-8, 0.0, np.random.default_rng(3))
    assert not check.passed and check.random_points == 5000 and check.points == 5000
    assert 1 <= len(check.disagreements) <= 16
    assert all(x[0] > 2.0 for x in check.disagreements)
    # a failed check bounds nothing
    assert check.disagreement_bound == 1.0
    report = check.to_json()
    assert "disagreements" not in report and report["disagreement_bound"] is None
    json.dumps(report)
    clean = self_check(model.forward, model, empty, empty, np.empty(0), 5000, 1.0, 1e-8, 0.0, np.random.default_rng(3))
    assert clean.passed and clean.disagreements == ()
    assert clean.to_json()["disagreement_bound"] == pytest.approx(3.0 / 5000)


def test_self_check_queries_the_suspects_again() -> None:
    """A model wrong on one input in 10^6 passes 64 random points; handed that input as a suspect
    (where an earlier stage saw it miss), the check queries it and fails. (Random 30-20-20-12-4
    victim 8: the network refinement's held-out points showed a misfit of 2e-2 that 5,431 random
    points missed, and the model was reported.)"""
    model = victim()

    def oracle(X: np.ndarray) -> np.ndarray:
        return np.asarray(model.forward(X) + (X[:, :1] > 4.75))

    empty = np.empty((0, ARCH[0]))
    rng = np.random.default_rng(3)
    assert self_check(oracle, model, empty, empty, np.empty(0), 64, 1.0, 1e-8, 0.0, rng).passed
    suspect = np.zeros((1, ARCH[0]))
    suspect[0, 0] = 5.0
    check = self_check(oracle, model, empty, empty, np.empty(0), 64, 1.0, 1e-8, 0.0, rng, suspect)
    assert not check.passed and check.points == 65 and check.disagreements == ((5.0,) + (0.0,) * (ARCH[0] - 1),)


def test_self_check_counts_a_nan_answer_as_a_disagreement() -> None:
    model = victim()

    def oracle(X: np.ndarray) -> np.ndarray:
        Y = model.forward(X)
        Y[0, 0] = np.nan
        return np.asarray(Y)

    empty = np.empty((0, ARCH[0]))
    check = self_check(oracle, model, empty, empty, np.empty(0), 64, 1.0, 1e-8, 0.0, np.random.default_rng(3))
    assert not check.passed and len(check.disagreements) == 1


def test_self_check_lines_see_a_neuron_that_random_points_miss() -> None:
    """A model whose only error is the output weight of a neuron on at about 3e-6 of N(0, I) inputs (its
    hyperplane 4.5 from the origin): 2,000 random points miss it; lines across the first-layer
    hyperplanes cross that one too, and the check fails there."""
    rng = np.random.default_rng(0)
    W1 = rng.normal(size=(8, 2))
    W1 /= np.linalg.norm(W1, axis=1, keepdims=True)
    b1 = rng.normal(size=8)
    b1[0] = -4.5
    W2, b2 = rng.normal(size=(1, 8)), np.zeros(1)
    true = MLP([(W1, b1), (W2, b2)])
    W2m = W2.copy()
    W2m[0, 0] += 0.5
    model = MLP([(W1, b1), (W2m, b2)])
    empty = np.zeros((0, 2))
    plain = self_check(MLPOracle(true).query, model, empty, empty, np.zeros(0), 2000, 1.0, 1e-8, 0.0,
                       np.random.default_rng(1))
    assert plain.passed
    lined = self_check(MLPOracle(true).query, model, empty, empty, np.zeros(0), 2000, 1.0, 1e-8, 0.0,
                       np.random.default_rng(1), n_lines=32)
    assert not lined.passed and lined.disagreeing == 0 and lined.disagreements


def test_a_nan_answer_on_a_self_check_line_is_a_disagreement() -> None:
    """An oracle that answers NaN (or inf) on some line points: the check fails there, never passes."""
    m = random_mlp("4-6-2", np.random.default_rng(3))
    empty = np.zeros((0, 4))
    for bad in (np.nan, np.inf):
        def query(X: np.ndarray, bad: float = bad) -> np.ndarray:
            Y = MLPOracle(m).query(X)
            far = np.linalg.norm(X, axis=1) > 4.0  # these random points stay nearer; some line points do not
            Y[far] = bad
            return Y
        plain = self_check(query, m, empty, empty, np.zeros(0), 50, 1.0, 1e-8, 0.0, np.random.default_rng(4))
        assert plain.passed
        check = self_check(query, m, empty, empty, np.zeros(0), 50, 1.0, 1e-8, 0.0, np.random.default_rng(4),
                           n_lines=16)
        assert not check.passed and check.max_rel_error == np.inf and check.disagreements


def test_a_self_check_that_has_failed_stops_early() -> None:
    """``stop_early``: a model wrong on 2.3% of inputs fails on the first eighth of the random points and
    asks no more (nor its lines); a right model is asked every point, the same ones as without it."""
    model = victim()

    def oracle(X: np.ndarray) -> np.ndarray:
        return np.asarray(model.forward(X) + (X[:, :1] > 2.0))

    empty = np.empty((0, ARCH[0]))
    asked: list[int] = []

    def counted(X: np.ndarray) -> np.ndarray:
        asked.append(X.shape[0])
        return oracle(X)

    check = self_check(counted, model, empty, empty, np.empty(0), 40_000, 1.0, 1e-8, 0.0, np.random.default_rng(3),
                       n_lines=8, stop_early=True)
    # 2.3% of 5,000 points: some fail in the first eighth (chance of none about 1e-50)
    assert not check.passed and asked == [5000] and check.random_points == check.points == 5000
    assert 1 <= check.disagreeing <= 5000 and check.disagreements
    full = self_check(oracle, model, empty, empty, np.empty(0), 40_000, 1.0, 1e-8, 0.0, np.random.default_rng(3),
                      n_lines=8)
    assert not full.passed and full.random_points == 40_000 and full.points > 40_000
    ok = self_check(model.forward, model, empty, empty, np.empty(0), 40_000, 1.0, 1e-8, 0.0, np.random.default_rng(3),
                    n_lines=8, stop_early=True)
    same = self_check(model.forward, model, empty, empty, np.empty(0), 40_000, 1.0, 1e-8, 0.0,
                      np.random.default_rng(3), n_lines=8)
    assert ok.passed and same.passed and ok.points == same.points and ok.random_points == 40_000
    # a small check stops after STOP_MIN_POINTS at the earliest: here, not at all
    small = self_check(oracle, model, empty, empty, np.empty(0), STOP_MIN_POINTS, 1.0, 1e-8, 0.0,
                       np.random.default_rng(3), n_lines=8, stop_early=True)
    assert not small.passed and small.random_points == STOP_MIN_POINTS and small.points > STOP_MIN_POINTS
