"""Neuron-wiggle sign recovery (relux.attack.wiggle; CM24 §4)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relux.attack import wiggle
from relux.attack.active_lines import all_on_region
from relux.attack.wiggle import wiggle_signs
from relux.model import MLP
from relux.oracle import CountingOracle, MLPOracle
from relux.parallel import make_executor
from relux.zoo import random_mlp


def _layer_two(seed: int) -> tuple[object, list[tuple[np.ndarray, np.ndarray]], np.ndarray, np.ndarray, np.ndarray]:
    """A 10-6-6-1 network, its first layer, and its second layer's rows normalised with random signs
    (the signs to find)."""
    net = random_mlp((10, 6, 6, 1), np.random.default_rng(seed))
    W2, b2 = net.layers[1]
    s = np.where(np.random.default_rng(seed + 1).random(6) < 0.5, -1.0, 1.0)
    n = np.linalg.norm(np.concatenate([W2, b2[:, None]], axis=1), axis=1)
    return net, [net.layers[0]], W2 / n[:, None] * s[:, None], b2 / n * s, s


def test_the_wiggle_finds_the_signs_of_a_controllable_layer() -> None:
    net, prefix, W, b, s = _layer_two(0)
    ws = wiggle_signs(CountingOracle(MLPOracle(net)).query, prefix, W, b, 10, 1.0, np.random.default_rng(0))
    assert ws.controllable_points > 0
    # a clean verdict is exact: the output moves or it does not
    np.testing.assert_array_equal(ws.signs[ws.decided], s[ws.decided])
    assert ws.decided.all()


def test_the_probe_points_do_not_depend_on_the_workers() -> None:
    # the points that push each row to either side come from pure linear programs: split among two
    # loky workers they are the same points, bit for bit
    _, prefix, W, b, _ = _layer_two(0)
    region = wiggle.active_region(prefix, 10, 1.0)
    alone = wiggle._candidates(prefix, W, b, 10, 1.0, 4, np.random.default_rng(0), region=region)
    with make_executor("loky", 2) as ex:
        split = wiggle._candidates(prefix, W, b, 10, 1.0, 4, np.random.default_rng(0), ex, region=region)
    assert alone.shape[0] > 4 + 1  # random points, the centre, and pushed points
    np.testing.assert_array_equal(split, alone)


def test_without_controllable_points_it_falls_back_to_the_points_given(monkeypatch: pytest.MonkeyPatch) -> None:
    net, prefix, W, b, s = _layer_two(0)
    W1, b1 = prefix[0]

    def off_points(layers, W_hat, b_hat, d0, scale, n, rng, executor=None, pushes=None, region=None):  # type: ignore[no-untyped-def]
        # as when the linear programs fail: random points, each with first-layer neuron 0 off, where
        # the six rows of layer 2 see five directions at most
        X = rng.normal(0.0, scale, size=(n, d0))
        w = W1[0] / np.linalg.norm(W1[0])
        return X - ((X @ W1[0] + b1[0] + 1.0) / np.linalg.norm(W1[0]))[:, None] * w

    monkeypatch.setattr(wiggle, "_candidates", off_points)
    query = CountingOracle(MLPOracle(net)).query
    alone = wiggle_signs(query, prefix, W, b, 10, 1.0, np.random.default_rng(0))
    assert alone.controllable_points == 0
    region = all_on_region(prefix, 3.0)
    assert region is not None
    inside = region.centre + 0.01 * region.depth * np.random.default_rng(1).standard_normal((8, 10)) / np.sqrt(10)
    ws = wiggle_signs(query, prefix, W, b, 10, 1.0, np.random.default_rng(0), fallback=inside)
    assert ws.controllable_points > 0
    assert ws.decided.all()
    np.testing.assert_array_equal(ws.signs, s)


def test_when_its_centre_program_fails_the_centre_of_the_all_on_region_stands_in(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    net, prefix, W, b, s = _layer_two(0)
    lp = wiggle._lp

    def failing(cost, G, g, margin, box):  # type: ignore[no-untyped-def]
        return None if margin is None else lp(cost, G, g, margin, box)

    monkeypatch.setattr(wiggle, "_lp", failing)
    ws = wiggle_signs(CountingOracle(MLPOracle(net)).query, prefix, W, b, 10, 1.0, np.random.default_rng(0))
    assert ws.controllable_points > 0
    assert ws.decided.all()
    np.testing.assert_array_equal(ws.signs, s)


def _without_most_active(arch: tuple[int, ...], seed: int) -> tuple[MLP, np.ndarray, np.ndarray, np.ndarray]:
    """A random network, its second layer's rows without the most active neuron (on 4,000 Gaussian
    inputs), normalised with random signs, and those signs (the ones to find)."""
    net = random_mlp(arch, np.random.default_rng(seed))
    W2, b2 = net.layers[1]
    X = np.random.default_rng(5).normal(size=(4000, arch[0]))
    act = ((np.maximum(X @ net.layers[0][0].T + net.layers[0][1], 0) @ W2.T + b2) > 0).mean(0)
    m = arch[2]
    keep = np.arange(m) != int(np.argmax(act))
    s = np.where(np.random.default_rng(seed + 1).random(m) < 0.5, -1.0, 1.0)[keep]
    n = np.linalg.norm(np.concatenate([W2, b2[:, None]], axis=1), axis=1)[keep]
    return net, W2[keep] / n[:, None] * s[:, None], b2[keep] / n * s, s


@pytest.mark.parametrize("seed", [0, 2, 5, 7])
def test_a_missing_row_s_leak_is_projected_out(seed: int) -> None:
    # 10-8-6-4 networks whose layer 2 lacks its most active neuron: wherever that neuron is on, every
    # probe moves the output through it, on both sides of the probed hyperplane. Without the
    # projection the wiggle then gives wrong verdicts at full confidence on these seeds (measured:
    # 1-2 each); with it, every verdict it gives is right.
    net, W, b, s = _without_most_active((10, 8, 6, 4), seed)
    query = CountingOracle(MLPOracle(net)).query
    plain = wiggle_signs(query, [net.layers[0]], W, b, 10, 1.0, np.random.default_rng(0))
    ws = wiggle_signs(query, [net.layers[0]], W, b, 10, 1.0, np.random.default_rng(0), missing=1)
    assert (plain.signs[plain.decided] != s[plain.decided]).any()
    # where the layer's input has no direction the known rows leave alone, no probe can show the leak
    assert 0 < ws.projected_points <= ws.points
    assert ws.decided.any()
    np.testing.assert_array_equal(ws.signs[ws.decided], s[ws.decided])


def test_in_a_short_layer_a_verdict_needs_both_sides_probed() -> None:
    # the same network with nothing missing but declared short: the clean verdicts all came from
    # probes on both sides, and they are right
    net, prefix, W, b, s = _layer_two(0)
    ws = wiggle_signs(CountingOracle(MLPOracle(net)).query, prefix, W, b, 10, 1.0, np.random.default_rng(0),
                      missing=1)
    np.testing.assert_array_equal(ws.signs[ws.decided], s[ws.decided])
    assert (ws.confidence == 1.0).sum() > 0


def test_the_rows_error_leaking_into_a_silent_side_is_not_a_response(monkeypatch: pytest.MonkeyPatch) -> None:
    # Layer-2 neuron 3 is off at the first 24 controllable points and its row has the wrong sign, so
    # there it is believed on. Rows off by 1e-6 (as measured rows are) move the output on its silent
    # side by about that share of a real response: far above rounding, which once passed for a
    # response and gave a clean wrong verdict (112 of 256 signs behind the trained CIFAR layer 1).
    net = random_mlp((10, 10, 10, 3), np.random.default_rng(4))
    W1, b1 = net.layers[0]
    W2, b2 = (np.array(a, dtype=float) for a in net.layers[1])
    region = all_on_region([(W1, b1)], 4.0)
    assert region is not None
    rng = np.random.default_rng(0)
    X = region.centre + 0.5 * region.depth * rng.standard_normal((200, 10)) / np.sqrt(10)
    H = np.maximum(X @ W1.T + b1, 0)
    b2[3] = -float(np.median(H @ W2[3]))  # on at half of the points
    net = MLP([(W1, b1), (W2, b2), net.layers[2]])
    z = H @ W2[3] + b2[3]
    X = np.concatenate([X[z < 0][:24], X[z > 0][:24]])  # off first
    monkeypatch.setattr(wiggle, "_candidates", lambda *a, **k: X)
    n = np.linalg.norm(np.concatenate([W2, b2[:, None]], axis=1), axis=1)
    s = np.where(np.arange(10) == 3, -1.0, 1.0)
    noise = 1e-6 * np.random.default_rng(1).standard_normal((10, 11))
    W = (W2 / n[:, None] + noise[:, :-1]) * s[:, None]
    b = (b2 / n + noise[:, -1]) * s
    ws = wiggle_signs(CountingOracle(MLPOracle(net)).query, [(W1, b1)], W, b, 10, 1.0, np.random.default_rng(0))
    assert ws.controllable_points == ws.points
    # neuron 3 is found off where it was believed on: its sign flips, with a clean verdict from the
    # points where it is on; no verdict is wrong
    assert ws.signs[3] == -1.0 and ws.confidence[3] == 1.0
    np.testing.assert_array_equal(ws.signs[ws.decided], s[ws.decided])


@pytest.mark.parametrize("seed", [0, 3])
def test_a_weak_real_probe_is_not_read_as_the_silent_side(seed: int) -> None:
    # 40-20-10-10-1 networks whose layer 2 lacks its most active neuron, rows exact. One probe's real
    # response can be far below the layer's typical one; judged against LEAK of it, such a probe read
    # as silent and the two-sided rule gave one wrong verdict on each of these seeds (measured).
    # Silence is judged at the rounding level there: every verdict given is right.
    net, W, b, s = _without_most_active((40, 20, 10, 10, 1), seed)
    ws = wiggle_signs(CountingOracle(MLPOracle(net)).query, [net.layers[0]], W, b, 40, 1.0,
                      np.random.default_rng(0), missing=1)
    np.testing.assert_array_equal(ws.signs[ws.decided], s[ws.decided])


def _ill_conditioned(seed: int) -> tuple[MLP, np.ndarray, np.ndarray, np.ndarray]:
    """A 10-8-8-2 network whose layer-2 singular values span nine decades (as the unitary CIFAR layers'
    control maps do), its layer-2 rows normalised with random signs, and those signs."""
    net = random_mlp((10, 8, 8, 2), np.random.default_rng(seed))
    W2, b2 = net.layers[1]
    U, sv, Vt = np.linalg.svd(W2, full_matrices=False)
    W2 = (U * (sv[0] * np.logspace(0, -9, sv.size))) @ Vt
    net = MLP([net.layers[0], (W2, b2), net.layers[2]])
    s = np.where(np.random.default_rng(seed + 1).random(8) < 0.5, -1.0, 1.0)
    n = np.linalg.norm(np.concatenate([W2, b2[:, None]], axis=1), axis=1)
    return net, W2 / n[:, None] * s[:, None], b2 / n * s, s


@pytest.mark.parametrize("seed", range(6))
def test_an_ill_conditioned_layer_is_still_controlled(seed: int) -> None:
    # A control map with singular values down to 1e-9 of the largest still steers each row alone.
    # Judged rank-deficient (at 1e-8), such points were passed over for random ones, where the prefix
    # is partly off: on these seeds that gave 0-6 verdicts, up to 3 of them wrong (measured).
    net, W, b, s = _ill_conditioned(seed)
    ws = wiggle_signs(CountingOracle(MLPOracle(net)).query, [net.layers[0]], W, b, 10, 1.0,
                      np.random.default_rng(0))
    assert 0 < ws.controllable_points == ws.points
    np.testing.assert_array_equal(ws.signs[ws.decided], s[ws.decided])
    assert (ws.confidence == 1.0).sum() >= 4


def test_controllable_means_full_row_rank_at_the_numerical_tolerance() -> None:
    assert wiggle._controllable(np.array([3.0, 1.0, 3e-9]), 3)
    assert not wiggle._controllable(np.array([3.0, 1.0, 1e-16]), 3)
    assert not wiggle._controllable(np.array([3.0, 1.0]), 3)  # fewer directions than rows


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(4, 40),
    real=st.floats(-3.0, 2.0),
    decades=st.floats(1.5, 8.0),
    seed=st.integers(0, 2**16),
)
def test_the_leak_split_falls_between_the_silent_and_the_real_sides(
    n: int, real: float, decades: float, seed: int
) -> None:
    # each neuron probed on both sides: one real response (within a decade of 10**real) and one leak
    # at least `decades` below the smallest real one; the split lies strictly between the groups
    rng = np.random.default_rng(seed)
    on = 10.0 ** (real + rng.random(n))
    leak = 10.0 ** (real - decades - rng.random(n))
    side = rng.random(n) < 0.5
    pos, neg = np.where(side, on, leak), np.where(side, leak, on)
    q = np.ones(n, dtype=int)
    split = wiggle.leak_split(pos, neg, q, q)
    assert leak.max() < split < on.min()


def test_without_a_gap_there_is_no_leak_split() -> None:
    # responses spread evenly over four decades: no gap of a decade, no split
    v = np.logspace(-4, 0, 40)
    q = np.ones(20, dtype=int)
    assert wiggle.leak_split(v[::2], v[1::2], q, q) == 0.0
    # a gap, but the neurons do not straddle it (both sides of each above it): no split
    assert wiggle.leak_split(np.r_[np.full(18, 1.0), 1e-6, 1e-6], np.r_[np.full(18, 2.0), 1e-6, 1e-6],
                             np.ones(20, dtype=int), np.ones(20, dtype=int)) == 0.0


def _tally(pos: list[float], neg: list[float], pos_q: list[int], neg_q: list[int], floor: float) -> wiggle._Tally:
    """A tally whose smallest responses are its largest ones."""
    t = wiggle._Tally.empty(len(pos))
    t.pos, t.neg = np.array(pos), np.array(neg)
    t.pos_min, t.neg_min = np.array(pos), np.array(neg)
    t.pos_q, t.neg_q = np.array(pos_q), np.array(neg_q)
    t.floor = np.full(len(pos), floor)
    return t


def test_a_response_is_never_both_real_and_silent() -> None:
    # Probed twice on each side, 0.03 and 0.04, at a rounding level of 1e-5 per unit step: below the
    # silence level (ten thousand rounding levels), so not real either; no verdict (a lower level for
    # real responses once called one side silent and the other real, and gave -1 at 0.5)
    t = _tally([0.03, 1.0], [0.04, 1e-9], [2, 2], [2, 2], 1e-5)
    signs, decided, conf = wiggle._verdicts(t, missing=1)
    assert not decided[0] and conf[0] == 0.0


def test_a_side_probed_alone_below_the_leak_split_is_no_verdict() -> None:
    # Neurons 0-5, probed on both sides, leak 2e-3 of the typical response into their silent sides (as
    # behind the unitary CIFAR layers 1-3): a ratio of sides below 1e3, so only the split between the
    # leaks and the real responses decides them. Neuron 6 was probed on one side only, where it moved
    # the output by 2.5e-3: above LEAK, but below the split, so the leak and not a verdict
    pos = [1.0, 0.8, 2e-3, 0.9, 1.8e-3, 1.1, 0.0]
    neg = [2e-3, 2.2e-3, 0.7, 1.9e-3, 1.2, 2.1e-3, 2.5e-3]
    t = _tally(pos, neg, [3, 3, 3, 3, 3, 3, 0], [3, 3, 3, 3, 3, 3, 4], 1e-12)
    signs, decided, conf = wiggle._verdicts(t, missing=0)
    assert conf[6] < 1.0
    np.testing.assert_array_equal(conf[:6], 1.0)
    np.testing.assert_array_equal(signs[:6], [1, 1, -1, 1, -1, 1])


def test_no_pushed_points_still_ends() -> None:
    net, prefix, W, b, s = _layer_two(0)
    ws = wiggle_signs(CountingOracle(MLPOracle(net)).query, prefix, W, b, 10, 1.0, np.random.default_rng(0),
                      max_points=0, missing=1)
    np.testing.assert_array_equal(ws.signs[ws.decided], s[ws.decided])


def test_a_side_probed_alone_far_above_the_split_is_a_verdict() -> None:
    # As behind the unitary CIFAR layers 1-3: the rounding level per unit step is high (2e-4), so the
    # real responses (0.5-1) are only 2,500-5,000 rounding levels, below the ten thousand the other
    # rules ask. Neuron 6, probed on its positive side only, responds far above the split: it is on
    # there (sign +1, clean), not silent (which gave -1 at 0.5)
    pos = [1.0, 0.8, 2e-3, 0.9, 1.8e-3, 1.1, 0.5]
    neg = [2e-3, 2.2e-3, 0.7, 1.9e-3, 1.2, 2.1e-3, 0.0]
    t = _tally(pos, neg, [3, 3, 3, 3, 3, 3, 3], [3, 3, 3, 3, 3, 3, 0], 2e-4)
    signs, decided, conf = wiggle._verdicts(t, missing=0)
    np.testing.assert_array_equal(signs, [1, 1, -1, 1, -1, 1, 1])
    np.testing.assert_array_equal(conf, 1.0)


def _probed(responses: list[tuple[list[float], list[float]]], floor: float = 1e-12) -> wiggle._Tally:
    """A tally of probes: each ``(ẑ, r)`` pair gives every neuron's pre-activation sign and response."""
    m = len(responses[0][0])
    t = wiggle._Tally.empty(m)
    for z, r in responses:
        t.add(np.array(z), np.array(r), np.full(m, floor), np.ones(m, dtype=bool))
    return t


def test_the_medians_decide_where_the_largest_leak_is_too_close() -> None:
    # Neuron 0: on while ẑ > 0 (responses 0.02-0.04), a leak of 5e-4 to 8e-3 while ẑ < 0, as behind
    # the unitary CIFAR layers 1-2 with layer-3 rows off by 1e-6 (largest sides 5x apart, no split).
    # Neuron 1 the same, on while ẑ < 0. Neuron 2: both sides alike (medians 1.25x apart): no verdict.
    t = _probed([
        ([1.0, 1.0, 1.0], [0.03, 2e-3, 0.010]),
        ([1.0, 1.0, -1.0], [0.02, 1e-3, 0.012]),
        ([-1.0, -1.0, 1.0], [1e-3, 0.04, 0.011]),
        ([-1.0, -1.0, -1.0], [8e-3, 0.025, 0.009]),
        ([-1.0, 1.0, 1.0], [5e-4, 8e-3, 0.010]),
    ])
    signs, decided, conf = wiggle._verdicts(t, missing=0)
    np.testing.assert_array_equal(decided, [True, True, False])
    np.testing.assert_array_equal(signs[:2], [1.0, -1.0])
    # the medians' verdicts are not clean: the next layer's rows or walks still check them
    np.testing.assert_array_equal(conf[:2], 0.5)
    # a short layer's missing rows move the output on both sides: no median verdicts there
    assert not wiggle._verdicts(t, missing=1)[1][:2].any()


@given(st.floats(1.0, 3.99), st.integers(1, 6))
def test_medians_closer_than_the_ratio_are_no_verdict(ratio: float, n: int) -> None:
    # every probe of the positive side responds `ratio` times the negative side's: below MEDIAN_RATIO
    t = _probed([([1.0], [ratio * 1e-2])] * n + [([-1.0], [1e-2])] * n)
    assert not wiggle._median_verdicts(t, np.ones(1, dtype=bool))[0].any()
    t = _probed([([1.0], [wiggle.MEDIAN_RATIO * 1e-2])] * n + [([-1.0], [1e-2])] * n)
    assert wiggle._median_verdicts(t, np.ones(1, dtype=bool))[0].all()
