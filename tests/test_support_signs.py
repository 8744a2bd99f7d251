"""The signs read from the support of the output's Jacobian (relux.attack.support_signs)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from relux.attack import prefix as pfx
from relux.attack.support_signs import group_lasso, pattern_points, support_fit, support_signs


def _system(seed: int, n: int, r: int, k: int, outputs: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    V = rng.standard_normal((n, r))
    on = np.zeros(n, dtype=bool)
    on[rng.choice(n, size=k, replace=False)] = True
    G = rng.standard_normal((outputs, n)) * on
    return G @ V, V, on


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), r=st.integers(12, 40), share=st.floats(0.2, 0.5), outputs=st.integers(1, 6))
@example(seed=34, r=18, share=0.4375, outputs=1)
@example(seed=1280, r=12, share=0.21875, outputs=1)  # the residual reached 0.0 past the on set (session 37)
def test_support_fit_is_exact_or_refuses(seed: int, r: int, share: float, outputs: int) -> None:
    # A layer wider than the control rank (n = 1.4 r), with at most half the directions' worth of
    # neurons on: the on set is the only small set whose rows span J. The lasso's ranking can miss
    # it (one output and 7 of 18 on: seed 34), and then the fit refuses; it is never wrong.
    n, k = int(1.4 * r), max(1, int(share * r))
    J, V, on = _system(seed, n, r, k, outputs)
    fit = support_fit(J, V)
    if fit.on is not None:
        assert np.array_equal(fit.on, on)
        # the cut falls from the residual of a missing neuron to rounding (exact J)
        assert fit.drop >= 3.0 and fit.residual < 1e-10
    else:
        assert fit.reason


def test_support_fit_finds_the_on_set_with_ten_outputs() -> None:
    # As at CIFAR scale (10 outputs, about half the directions' worth on), every draw is certified.
    for seed in range(12):
        J, V, on = _system(seed, 56, 40, 20, 10)
        fit = support_fit(J, V)
        assert fit.on is not None, (seed, fit.reason)
        assert np.array_equal(fit.on, on)


def test_support_fit_with_noisy_jacobian() -> None:
    # J measured by forward differences is off by about eps |f| / step; 1e-9 relative per entry still
    # leaves the cut seven decades deep (the on set's gains are O(1)).
    J, V, on = _system(3, 60, 44, 26, 10)
    rng = np.random.default_rng(0)
    fit = support_fit(J + 1e-9 * np.linalg.norm(J) / np.sqrt(J.size) * rng.standard_normal(J.shape), V)
    assert fit.on is not None, fit.reason
    assert np.array_equal(fit.on, on)


def test_support_fit_refuses_a_full_on_set() -> None:
    # As many neurons on as directions: any J is explained, nothing is certified.
    J, V, _ = _system(1, 30, 20, 20, 3)
    fit = support_fit(J, V)
    assert fit.on is None and "decades" in fit.reason


def test_support_fit_every_neuron_fits() -> None:
    # A layer narrower than the rank: the least-squares gains alone tell on from off.
    J, V, on = _system(2, 10, 20, 4, 2)
    fit = support_fit(J, V)
    assert fit.on is not None and np.array_equal(fit.on, on)


def test_support_fit_zero_jacobian() -> None:
    fit = support_fit(np.zeros((2, 5)), np.ones((3, 5)))
    assert fit.on is None and "zero" in fit.reason


def test_group_lasso_ranks_the_support_first() -> None:
    J, V, on = _system(4, 50, 36, 18, 8)
    X = group_lasso(J, V / np.linalg.norm(V, axis=1, keepdims=True), 1e-5 * float(np.linalg.norm(J)))
    top = np.argsort(-np.linalg.norm(X, axis=0))[: on.sum()]
    assert on[top].all()


def _net(seed: int, widths: list[int]) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((b, a)) / np.sqrt(a), 0.3 * rng.standard_normal(b))
            for a, b in zip(widths[:-1], widths[1:], strict=True)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_support_signs_on_a_wide_layer(seed: int) -> None:
    # 40-30-30-40-8-3: the layer-3 rows (40) outnumber the control rank (30 where layers 1-2 are all
    # on), so no point controls each row alone; the support still reads every sign.
    net = _net(seed, [40, 30, 30, 40, 8, 3])
    rng = np.random.default_rng(seed + 100)
    calls = [0]

    def query(X: np.ndarray) -> np.ndarray:
        calls[0] += X.shape[0]
        _, H = pfx.forward(net[:-1], X)
        out: np.ndarray = H @ net[-1][0].T + net[-1][1]
        return out

    W, b = net[2]
    s = rng.choice([-1.0, 1.0], W.shape[0])
    lam = rng.uniform(0.5, 2.0, W.shape[0])
    got = support_signs(query, net[:2], (s * lam)[:, None] * W, s * lam * b, pattern_points(net[:2], 3.0, rng), rng)
    assert got.certified >= 1, got.reasons
    assert got.decided.all()
    assert np.array_equal(got.signs, s)
    assert got.queries == calls[0]


def test_support_signs_without_points() -> None:
    net = _net(0, [6, 5, 4, 2])
    got = support_signs(lambda X: X[:, :2], net[:1], net[1][0], net[1][1], lambda i: None,
                        np.random.default_rng(0))
    assert got.points == 0 and not got.decided.any() and got.queries == 0


def test_layer_signs_use_the_support_without_an_all_on_region() -> None:
    # Two layer-1 neurons are opposites (w and -w, both biases negative), so no input has every
    # layer-1 neuron on and the wiggle has no all-active region: deep._layer_signs reads the layer-2
    # signs from the Jacobian's support instead, and gets them all.
    from relux.attack.config import ExtractionConfig
    from relux.attack.deep import _layer_signs

    net = _net(7, [40, 30, 40, 8, 3])
    W1, b1 = net[0]
    W1[1], b1[0], b1[1] = -W1[0], -0.2, -0.2
    rng = np.random.default_rng(3)

    def query(X: np.ndarray) -> np.ndarray:
        _, H = pfx.forward(net[:-1], X)
        out: np.ndarray = H @ net[-1][0].T + net[-1][1]
        return out

    W, b = net[1]
    s = rng.choice([-1.0, 1.0], W.shape[0])
    sgn, conf, method, _ = _layer_signs(query, net[:1], s[:, None] * W, s * b, 40, False, 0, ExtractionConfig(), rng,
                                        rng.standard_normal((4, 40)))
    assert method.startswith("Jacobian support"), method
    assert np.array_equal(sgn, s) and np.all(conf == 1.0)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), r=st.integers(3, 20), outputs=st.integers(1, 4))
def test_tails_are_the_projection_residuals(seed: int, r: int, outputs: int) -> None:
    # _tails from one complete QR equals the residual of J on each leading span, computed directly
    # by least squares (both exact to rounding on O(1) data: 1e-9 leaves room for ill-conditioning).
    from relux.attack.support_signs import _tails

    rng = np.random.default_rng(seed)
    V = rng.standard_normal((r + 3, r))
    J = rng.standard_normal((outputs, r))
    order = rng.permutation(r + 3)
    kmax = r - 1
    tails = _tails(J, V, order, kmax)
    for k in range(kmax + 1):
        A = V[order[:k]]
        res = J - (J @ np.linalg.pinv(A)) @ A if k else J
        assert abs(tails[k] - np.linalg.norm(res) / np.linalg.norm(J)) < 1e-9


def test_support_fit_skips_rows_that_do_not_move() -> None:
    # A row with no component in the controllable directions can show nothing: it is not seen, and it
    # is never read as on.
    J, V, on = _system(5, 20, 16, 6, 3)
    V[np.flatnonzero(~on)[0]] = 0.0
    fit = support_fit(J, V)
    assert fit.on is not None and np.array_equal(fit.on, on)
    assert int((~fit.seen).sum()) == 1


def test_support_fit_never_reads_a_weak_on_neuron_as_off() -> None:
    # One on neuron's gain is 1e-6 of the others' and J is off by 1e-9: the residual collapses
    # twice. The fit refuses the point, or reads the weak neuron on; never off.
    J, V, on = _system(6, 40, 30, 12, 1)
    rng = np.random.default_rng(1)
    weak = int(np.flatnonzero(on)[0])
    G = rng.standard_normal((1, 40)) * on
    G[0, weak] *= 1e-6
    J = G @ V + 1e-9 * rng.standard_normal((1, 30))
    fit = support_fit(J, V)
    assert fit.on is None or fit.on[weak]


def test_support_fit_does_not_read_parallel_rows() -> None:
    # A row and a negated, scaled copy of it move J alike: neither is read; the others still are.
    J, V, on = _system(8, 30, 24, 8, 3)
    j = int(np.flatnonzero(on)[0])
    V[np.flatnonzero(~on)[0]] = -1.3 * V[j]
    fit = support_fit(J, V)
    assert fit.on is not None, fit.reason
    assert not fit.seen[j] and not fit.seen[np.flatnonzero(~on)[0]]
    assert np.array_equal(fit.on[fit.seen], on[fit.seen])


def test_support_signs_counts_a_repeated_point_once() -> None:
    net = _net(0, [40, 30, 30, 40, 8, 3])
    rng = np.random.default_rng(0)
    x = pattern_points(net[:2], 3.0, rng)(0)
    assert x is not None

    def query(X: np.ndarray) -> np.ndarray:
        _, H = pfx.forward(net[:-1], X)
        out: np.ndarray = H @ net[-1][0].T + net[-1][1]
        return out

    W, b = net[2]
    got = support_signs(query, net[:2], W, b, lambda i: x, rng, max_points=4)
    assert got.points == 1 and got.votes.max() <= 1
    assert np.all(got.confidence <= 0.5)
