"""End-to-end extraction of one-hidden-layer networks through the oracle protocol only.

Every victim is reached through an oracle (in-process or over HTTP); its true weights are used only
afterwards, by :func:`relux.verify.verify`, to check the result.

Tolerances (the project's targets for one hidden layer, see benchmarks/README.md):
- normalised weight error <= 2^-30: float64 carries 52 bits; the attack's finite differences and
  least-squares solves lose some of them, but an exact extraction keeps far more than 30 (typically
  2^-35 to 2^-45 here), while a wrong neuron or a wrong scale gives errors of order 1;
- max relative output error <= 1e-9: the same margin in function space, on N(0,I), U[0,1]^d and
  kink-crossing lines;
- 0 sign errors: a flipped neuron is a discrete error, never a rounding one.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import numpy as np
import pytest
from starlette.types import ASGIApp

from relux.attack import ExtractionConfig, ExtractionResult, extract
from relux.errors import BudgetExhausted, InputError
from relux.model import MLP
from relux.oracle import BudgetOracle, MLPOracle, Oracle
from relux.verify import verify
from relux.zoo import random_mlp

MAX_WEIGHT_ERROR = 2.0**-30
MAX_OUTPUT_ERROR = 1e-9

needs_sklearn = pytest.mark.skipif(
    importlib.util.find_spec("sklearn") is None, reason="scikit-learn (digits dataset) not installed"
)


def run_attack(oracle: Oracle, arch: tuple[int, ...], seed: int = 0) -> ExtractionResult:
    return extract(oracle, arch, ExtractionConfig(seed=seed))


def assert_exact(victim: MLP, result: ExtractionResult) -> None:
    """The extraction matches the victim up to the ReLU symmetries (permutation, positive scale)."""
    assert result.selfcheck.passed, result
    report = verify(victim, result.model, rng=np.random.default_rng(1), n_random=2000, n_lines=16)
    assert report.complete, report  # every neuron matched: none missed, none spurious
    assert report.sign_errors == 0, report
    assert report.max_norm_weight_error <= MAX_WEIGHT_ERROR, report
    assert report.max_rel_output_error <= MAX_OUTPUT_ERROR, report


def with_biases(model: MLP, b1: np.ndarray) -> MLP:
    (W1, _), out = model.layers
    return MLP([(W1, b1), out])


# --------------------------------------------------------------------------- random victims
@pytest.mark.parametrize(
    ("arch", "seed"),
    [
        ((10, 6, 1), 0),  # one output
        ((12, 8, 10), 1),  # ten outputs
        ((8, 14, 1), 2),  # expansive: more neurons than inputs, signs need the last-layer solve
        ((20, 40, 1), 3),  # expansive, twice as wide as the input
    ],
)
def test_random_victim(arch: tuple[int, ...], seed: int) -> None:
    victim = random_mlp(arch, np.random.default_rng(seed))
    result = run_attack(MLPOracle(victim), arch, seed=seed)
    assert result.model.arch == arch
    assert result.queries > 0 and result.seconds >= 0
    assert_exact(victim, result)


def test_zero_bias_neurons() -> None:
    """Neurons whose hyperplanes pass exactly through the origin (bias exactly 0)."""
    arch = (16, 10, 2)
    victim = random_mlp(arch, np.random.default_rng(4))
    b1 = victim.layers[0][1].copy()
    b1[::2] = 0.0
    victim = with_biases(victim, b1)
    assert np.count_nonzero(victim.layers[0][1] == 0.0) == 5
    assert_exact(victim, run_attack(MLPOracle(victim), arch, seed=4))


def test_all_biases_zero() -> None:
    """Every hyperplane through the origin: f is positively homogeneous."""
    arch = (12, 9, 3)
    victim = random_mlp(arch, np.random.default_rng(5), bias_std=0.0)
    assert not np.any(victim.layers[0][1])
    assert_exact(victim, run_attack(MLPOracle(victim), arch, seed=5))


def test_result_is_reported() -> None:
    victim = random_mlp((6, 4, 2), np.random.default_rng(6))
    result = run_attack(MLPOracle(victim), victim.arch)
    out = result.to_json()
    for key in ("queries", "seconds", "stages", "layers", "selfcheck"):
        assert key in out
    assert out["queries"] == result.queries == sum(s.queries for s in result.stages)
    assert out["layers"][0]["recovered"] == 4
    assert out["selfcheck"]["passed"] is True


# --------------------------------------------------------------------------- trained victims
@pytest.fixture(scope="module")
def digits_victim() -> MLP:
    from relux.zoo import trained_mlp

    model, report = trained_mlp((64, 16, 10), "digits", np.random.default_rng(0), epochs=10)
    assert report.test_accuracy is not None and report.test_accuracy > 0.8  # a real classifier, not noise
    return model


@needs_sklearn
def test_trained_digits_classifier(digits_victim: MLP) -> None:
    assert_exact(digits_victim, run_attack(MLPOracle(digits_victim), digits_victim.arch))


@needs_sklearn
def test_trained_digits_regressor() -> None:
    from relux.zoo import trained_mlp

    victim, _ = trained_mlp((64, 12, 1), "digits", np.random.default_rng(1), epochs=5)
    assert_exact(victim, run_attack(MLPOracle(victim), victim.arch, seed=1))


@needs_sklearn
def test_neurons_dead_on_the_data_but_alive_elsewhere(digits_victim: MLP) -> None:
    """Three neurons get a bias so negative that no digits sample activates them; their hyperplanes
    still cross the input space (a few units from the origin), where the attack finds them."""
    from relux.data import load_dataset

    data = load_dataset("digits")
    X = np.concatenate([data.X_train, data.X_test])
    W1, b1 = digits_victim.layers[0]
    b1 = b1.copy()
    dead = [0, 5, 11]
    for j in dead:
        norm = float(np.linalg.norm(W1[j]))
        b1[j] = -float(np.max(X @ W1[j])) - 0.25 * norm  # a margin of 0.25 input units past every sample
    victim = with_biases(digits_victim, b1)
    pre = victim.preactivations(X)[0]
    assert np.all(pre[:, dead] < 0.0)  # dead on every training and test sample
    distance = np.abs(b1[dead]) / np.linalg.norm(W1[dead], axis=1)
    assert np.all(distance < 8.0)  # but their hyperplanes lie within reach of the search lines
    result = run_attack(MLPOracle(victim), victim.arch, seed=2)
    assert result.layers[0].recovered == 16 and result.layers[0].dead == 0
    assert_exact(victim, result)


# --------------------------------------------------------------------------- over HTTP
@pytest.mark.parametrize("path", ["/v2/models/victim", "/v1/models/victim"])
def test_extract_over_http(live_server: Callable[[ASGIApp], str], path: str) -> None:
    from relux.oracle.http import oracle_from_url
    from relux.serve import create_app

    victim = random_mlp((12, 8, 3), np.random.default_rng(7))
    app = create_app(victim, name="victim")
    url = live_server(app) + path
    oracle = oracle_from_url(url)  # sizes come from the server's metadata
    try:
        result = run_attack(oracle, victim.arch)
    finally:
        close = getattr(oracle, "close", None)
        if callable(close):
            close()
    assert_exact(victim, result)
    assert app.state.stats.rows_served == result.queries  # every query went over the wire


# --------------------------------------------------------------------------- failures
def test_budget_too_small() -> None:
    victim = random_mlp((10, 6, 1), np.random.default_rng(8))
    oracle = BudgetOracle(MLPOracle(victim), 200)
    with pytest.raises(BudgetExhausted) as info:
        run_attack(oracle, victim.arch)
    assert info.value.budget == 200
    assert oracle.used <= 200


@pytest.mark.parametrize("arch", [(9, 6, 1), (10, 6, 2), (10, 6), "10-6-x"])
def test_wrong_arch(arch: tuple[int, ...] | str) -> None:
    victim = random_mlp((10, 6, 1), np.random.default_rng(9))
    with pytest.raises(InputError):
        extract(MLPOracle(victim), arch)
