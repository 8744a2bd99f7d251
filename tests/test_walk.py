"""Signs of a layer wider than its space of control, and the next layer's rows, from walks along
next-layer boundaries (relux.attack.walk)."""

from __future__ import annotations

import numpy as np
import pytest

import relux
from relux.attack.config import ExtractionConfig
from relux.attack.walk import fit_theta, walk_layer
from relux.model import MLP
from relux.oracle import CountingOracle, MLPOracle
from relux.verify import verify
from relux.zoo import random_mlp


def _unit_rows(W: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n = np.linalg.norm(np.concatenate([W, b[:, None]], axis=1), axis=1)
    return W / n[:, None], b / n, n


def _walk(victim: MLP, signs: np.ndarray, seed: int = 0) -> tuple[relux.attack.walk.WalkOutcome, np.ndarray]:
    W1, b1, n1 = _unit_rows(*victim.layers[0])
    layer = (W1 * signs[:, None], b1 * signs)
    oracle = CountingOracle(MLPOracle(victim))
    width = victim.layers[1][0].shape[0]
    out = walk_layer(oracle.query, [layer], width, victim.arch[0], ExtractionConfig(seed=seed),
                     np.random.default_rng(seed), 1e-9, rows_wanted=width)
    return out, n1


@pytest.fixture(scope="module")
def expansive() -> MLP:
    # layer 1 (12 neurons) is wider than the input (6): no point makes it controllable
    return random_mlp((6, 12, 5, 1), np.random.default_rng(3))


def test_walks_recover_hidden_signs_and_next_rows(expansive: MLP) -> None:
    truth_flips = np.random.default_rng(7).random(12) < 0.5
    out, n1 = _walk(expansive, np.where(truth_flips, -1.0, 1.0))
    assert out.solution is not None and out.solution.ok
    assert np.array_equal(out.flips, truth_flips)
    assert out.W_next.shape == (5, 12)
    # rows behind the corrected layer are the true rows up to scale; the points are exact kinks, so
    # only float64 rounding through two layers remains (1e-9 leaves a wide margin over ~1e-13)
    W2, b2 = expansive.layers[1]
    T = np.concatenate([W2 * n1[None, :], b2[:, None]], axis=1)
    T /= np.linalg.norm(T, axis=1, keepdims=True)
    E = np.concatenate([out.W_next, out.b_next[:, None]], axis=1)
    E /= np.linalg.norm(E, axis=1, keepdims=True)
    cos = np.abs(E @ T.T)
    assert np.all(1.0 - cos.max(axis=1) <= 1e-9)
    assert len(set(cos.argmax(axis=1).tolist())) == 5


def test_walks_catch_and_repair_one_flipped_inner_sign(expansive: MLP) -> None:
    signs = np.ones(12)
    signs[4] = -1.0  # one wrong sign in an otherwise correct inner layer
    out, _ = _walk(expansive, signs, seed=1)
    assert out.solution is not None and out.solution.ok
    assert np.flatnonzero(out.flips).tolist() == [4]


def test_a_check_stops_once_its_walks_settle_the_signs(expansive: MLP, monkeypatch: pytest.MonkeyPatch) -> None:
    import relux.attack.walk as walk_mod

    truth_flips = np.random.default_rng(11).random(12) < 0.5
    W1, b1, _ = _unit_rows(*expansive.layers[0])
    signs = np.where(truth_flips, -1.0, 1.0)

    def check() -> relux.attack.walk.WalkOutcome:
        oracle = CountingOracle(MLPOracle(expansive))
        # more rows wanted than exist: only the settled signs (or the search giving out) end the check
        return walk_layer(oracle.query, [(W1 * signs[:, None], b1 * signs)], 5, 6, ExtractionConfig(seed=0),
                          np.random.default_rng(0), 1e-9, rows_wanted=50, max_walks=64)

    out = check()
    assert out.solution is not None and out.solution.ok and out.decided.all()
    assert np.array_equal(out.flips, truth_flips)
    monkeypatch.setattr(walk_mod, "_SETTLE_FITS", 10**9)  # never settle early
    full = check()
    assert np.array_equal(full.flips, truth_flips)
    assert out.walks < full.walks


def test_theta_is_the_null_vector_of_exact_boundary_points() -> None:
    # points built exactly on u·ReLU(ẑ) + a·x + c = 0 (solved for their last coordinate on a piece)
    rng = np.random.default_rng(0)
    W = rng.normal(size=(7, 4))
    b = rng.normal(size=7)
    theta = rng.normal(size=7 + 4 + 1)
    pts = []
    while len(pts) < 40:
        x = rng.normal(size=4) * 2
        on = (W @ x + b) > 0
        g = theta[:7][on] @ W[on] + theta[7:11]
        x = x - (theta[:7][on] @ (W[on] @ x + b[on]) + theta[7:11] @ x + theta[-1]) / (g @ g) * g
        if np.array_equal((W @ x + b) > 0, on):
            pts.append(x)
    est, resid, gap = fit_theta([(W, b)], np.asarray(pts))
    # float64 rounding of 40 points in 12 unknowns: 1e-10 is far above it and far below any misfit
    assert resid <= 1e-10
    assert gap >= 1e3
    assert 1.0 - abs(float(est @ theta)) / float(np.linalg.norm(theta)) <= 1e-10


def test_expansive_inner_layer_end_to_end() -> None:
    victim = random_mlp((6, 10, 5, 1), np.random.default_rng(1))
    result = relux.extract(MLPOracle(victim), victim.arch, relux.ExtractionConfig(seed=0))
    assert result.selfcheck.passed
    report = verify(victim, result.model).to_json()
    assert report["sign_errors"] == 0
    assert report["unmatched"] == 0
    assert report["max_norm_weight_error"] <= 2.0**-25  # issue 4's bounds
    assert report["max_rel_output_error"] <= 1e-8
    assert "walks" in result.layers[0].sign_method
