"""Rows of a hidden layer pieced together from regions where the layer before follows a fixed pattern
(relux.attack.active_lines.pattern_region, relux.attack.pattern_layer)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relux.attack.active_lines import active_lines, all_on_region, cell_map, pattern_region
from relux.attack.config import ExtractionConfig
from relux.attack.pattern_layer import (
    LACKED_DEPTH,
    MIN_SHARED,
    _controls,
    _Entry,
    _lacked_on,
    _merged,
    _most_on,
    _without_fragments,
    choose_pattern,
    pattern_outcome,
    pattern_rows,
    random_pattern,
)
from relux.attack.pipeline import _all_on_layer
from relux.attack.result import LayerReport
from relux.errors import InputError
from relux.model import MLP
from relux.oracle import CountingOracle, MLPOracle
from relux.zoo import random_mlp


def _unit(W: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n = np.linalg.norm(np.concatenate([W, b[:, None]], axis=1), axis=1)
    return W / n[:, None], b / n, n


def _victim(seed: int) -> tuple[MLP, list[tuple[np.ndarray, np.ndarray]], np.ndarray]:
    """A 20-16-16-8-1 network whose layer-2 neurons 0-5 come in pairs of nearly opposite rows with
    negative biases: no input has both of a pair on, so no input has every layer-1 and layer-2 neuron
    on (the rows differ by a little noise, so layer 2 still controls 16 directions).
    Returns it, its first two layers as the attack knows them (unit rows) and the layer-3 rows in
    those coordinates (unit rows with their biases)."""
    rng = np.random.default_rng(seed)
    net = random_mlp((20, 16, 16, 8, 1), rng)
    L = [(W.copy(), b.copy()) for W, b in net.layers]
    W2, b2 = L[1]
    for k in range(0, 6, 2):
        W2[k + 1] = -W2[k] * rng.uniform(0.5, 2.0) + 1e-3 * rng.standard_normal(16)
        b2[k], b2[k + 1] = -abs(b2[k]) - 0.3, -abs(b2[k + 1]) - 0.3
    net = MLP(L)
    W1u, b1u, n1 = _unit(*L[0])
    W2u, b2u, n2 = _unit(L[1][0] * n1[None, :], L[1][1])
    W3u, b3u, _ = _unit(L[2][0] * n2[None, :], L[2][1])
    return net, [(W1u, b1u), (W2u, b2u)], np.concatenate([W3u, b3u[:, None]], axis=1)


def test_the_victim_has_no_all_on_region() -> None:
    _, prefix, _ = _victim(0)
    assert all_on_region(prefix, 3.0) is None


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_point_of_every_chord_follows_the_pattern(seed: int) -> None:
    _, prefix, _ = _victim(seed)
    pat = choose_pattern(prefix, 3.0, np.random.default_rng(seed).permutation(16).tolist())
    assert pat is not None
    region = pattern_region(prefix, 3.0, pat.on)
    assert region is not None
    al = active_lines(region, 6, 1.0, np.random.default_rng(seed), d_last=16)
    assert al.x0.shape[0] == 6
    t = np.linspace(-1.0, 1.0, 41)
    for x0, u, half in zip(al.x0, al.u, al.half, strict=True):
        X = x0[None, :] + (half * t)[:, None] * u[None, :]
        H1 = X @ prefix[0][0].T + prefix[0][1]
        Z2 = np.maximum(H1, 0.0) @ prefix[1][0].T + prefix[1][1]
        assert np.all(H1 > 0.0)
        assert np.all((Z2 > 0.0) == pat.on[None, :])


def test_the_chosen_pattern_has_most_of_its_neurons_on_and_a_pair_never_both() -> None:
    _, prefix, _ = _victim(0)
    pat = choose_pattern(prefix, 3.0, list(range(16)))
    assert pat is not None and pat.depth > 0.0
    # of each opposite pair at most one is on; the other ten can all be
    assert not (pat.on[0] and pat.on[1]) and not (pat.on[2] and pat.on[3]) and not (pat.on[4] and pat.on[5])
    assert pat.wanted >= 8 and pat.on.sum() >= pat.wanted
    rnd = random_pattern(prefix, 3.0, np.random.default_rng(0))
    assert rnd is not None and rnd.on.shape == (16,)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(2, 9), st.integers(1, 4))
def test_the_cell_map_is_the_prefix_where_its_patterns_hold(seed: int, d: int, depth: int) -> None:
    rng = np.random.default_rng(seed)
    widths = [d] + [int(rng.integers(2, 12)) for _ in range(depth)]
    layers = [(rng.normal(size=(o, i)), rng.normal(scale=0.3, size=o))
              for i, o in zip(widths[:-1], widths[1:], strict=True)]
    X = rng.normal(size=(5, d))
    for x in X:
        Z, h = [], x
        for W, b in layers:
            Z.append(W @ h + b)
            h = np.maximum(Z[-1], 0.0)
        A, c = cell_map(layers, [z > 0 for z in Z])
        # the same products in another order: equal to rounding (1e-12 of the terms' size)
        scale = np.abs(A) @ np.abs(x) + np.abs(c) + 1.0
        assert np.all(np.abs(A @ x + c - np.concatenate(Z)) <= 1e-12 * scale)
    # no masks: every neuron on
    A0, c0 = cell_map(layers, None)
    A1, c1 = cell_map(layers, [np.ones(W.shape[0], dtype=bool) for W, _ in layers])
    np.testing.assert_array_equal(A0, A1)
    np.testing.assert_array_equal(c0, c1)


def test_a_random_cell_behind_three_layers_holds_its_patterns_along_its_chords() -> None:
    # a 12-12-24-8 prefix (layer 1 square, as in the CIFAR frame): cells where layer 1 is on and
    # layers 2-3 follow patterns
    rng = np.random.default_rng(3)
    layers = [(rng.normal(size=(12, 12)), rng.normal(scale=0.3, size=12)),
              (rng.normal(size=(24, 12)), rng.normal(scale=0.3, size=24)),
              (rng.normal(size=(8, 24)), rng.normal(scale=0.3, size=8))]
    found = 0
    for _ in range(10):
        pat = random_pattern(layers, 3.0, rng)
        assert pat is not None and _controls(layers, pat)
        region = pattern_region(layers, 3.0, pat.on, pat.before)
        if pat.before is None or region is None:
            continue
        found += 1
        al = active_lines(region, 3, 1.0, rng)
        masks = [*pat.before, pat.on]
        assert masks[0].all()  # the first layer all on
        for x0, u, half in zip(al.x0, al.u, al.half, strict=True):
            for t in np.linspace(-1.0, 1.0, 21):
                h = x0 + t * half * u
                for (W, b), m in zip(layers, masks, strict=True):
                    z = W @ h + b
                    assert np.all((z > 0) == m)
                    h = np.maximum(z, 0.0)
    assert found >= 3


def test_asking_the_lacked_weights_on_keeps_a_share_of_the_cells_depth() -> None:
    rng = np.random.default_rng(4)
    layers = [(rng.normal(size=(12, 12)), rng.normal(scale=0.3, size=12)),
              (rng.normal(size=(16, 12)), rng.normal(scale=0.3, size=16))]
    asked = 0
    for _ in range(6):
        cell = random_pattern(layers, 3.0, rng)
        assert cell is not None
        base = pattern_region(layers, 3.0, cell.on, cell.before)
        off = np.flatnonzero(~cell.on).tolist()
        pat = _lacked_on(layers, 3.0, cell, off)
        if pat is cell or base is None:
            continue
        asked += 1
        region = pattern_region(layers, 3.0, pat.on, pat.before)
        assert region is not None and region.depth >= LACKED_DEPTH * base.depth
        assert pat.on[off].any()  # some neuron off in the cell is on in the region chosen
        assert _controls(layers, pat)
    assert asked >= 1


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(8, 20))
def test_the_blocks_stop_before_more_neurons_are_on_than_the_limit(seed: int, limit: int) -> None:
    # behind a 10-wide first layer most of the 24 neurons of the second can be on, but they control at
    # most 10 directions: asked all on, they stop at the limit unless the first block (always taken)
    # passed it
    rng = np.random.default_rng(seed)
    layers = [(rng.normal(size=(10, 10)), rng.normal(scale=0.3, size=10)),
              (rng.normal(size=(24, 10)), rng.normal(scale=0.3, size=24))]
    order = rng.permutation(24).tolist()
    first = choose_pattern(layers, 3.0, order[:1], block=1)
    pat = choose_pattern(layers, 3.0, order, limit=limit, block=1)
    if first is None:
        assert pat is None
        return
    assert pat is not None
    assert int(pat.on.sum()) <= max(limit, int(first.on.sum()))


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(2, 8), st.integers(4, 20))
def test_the_block_program_keeps_its_ball_inside_every_row_it_holds(seed: int, d: int, n: int) -> None:
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((n, d))
    c = rng.standard_normal(n)
    margin = np.zeros(n)
    hard = np.zeros(n, dtype=bool)
    hard[: n // 4] = True
    soft = ~hard
    need = 0.05
    got = _most_on(A, c, margin, 3.0, need, hard, soft)
    if got is None:
        return  # the hard rows leave no ball of that radius
    held, x = got
    dist = (A @ x + c) / np.linalg.norm(A, axis=1)
    # HiGHS's feasibility tolerance (1e-7) on constraints of order one
    assert np.all(dist[hard] >= need - 1e-6)
    assert np.all(dist[np.flatnonzero(soft)[held]] >= need - 1e-6)
    assert np.all(np.abs(x) <= 3.0 - need + 1e-6)


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(6, 30), st.floats(0.05, 20.0), st.floats(-20.0, 20.0))
def test_pieces_of_one_row_merge_into_it(seed: int, d: int, s1: float, s2: float) -> None:
    rng = np.random.default_rng(seed)
    w, b = rng.standard_normal(d), float(rng.standard_normal())
    if abs(s2) < 0.05:
        s2 = 1.0
    # two pieces sharing MIN_SHARED weights, each scaled (and signed) anyhow, and a third row
    perm = rng.permutation(d)
    cut = (d + MIN_SHARED) // 2
    a = np.zeros(d, dtype=bool)
    a[perm[:cut]] = True
    c = np.zeros(d, dtype=bool)
    c[perm[cut - MIN_SHARED:]] = True
    other = rng.standard_normal(d)
    entries = [_Entry(np.where(a, s1 * w, 0.0), s1 * b, a, [np.zeros((1, 2))], 0.0),
               _Entry(other, 0.3, np.ones(d, dtype=bool), [np.zeros((1, 2))], 0.0),
               _Entry(np.where(c, s2 * w, 0.0), s2 * b, c, [np.zeros((1, 2))], 0.0)]
    out = _merged(entries)
    assert len(out) == 2
    assert out[0].seen.all() and len(out[0].points) == 2
    # scaled onto the first piece: exact up to rounding in the factor (a few ulps of the weights)
    np.testing.assert_allclose(out[0].w, s1 * w, rtol=1e-10, atol=1e-12 * abs(s1) * float(np.abs(w).max()))
    assert out[1].w is other


def _on_plane(w: np.ndarray, b: float, rng: np.random.Generator, n: int = 3) -> np.ndarray:
    """``n`` points of the plane ``w·x + b = 0`` (behind no layer the layer input is the input)."""
    X = rng.standard_normal((n, w.size))
    return X - ((X @ w + b) / (w @ w))[:, None] * w[None, :]


def test_a_small_piece_of_a_whole_row_is_dropped_and_only_that() -> None:
    rng = np.random.default_rng(1)
    d = 12
    w, b = rng.standard_normal(d), 0.4
    whole = _Entry(w.copy(), b, np.ones(d, dtype=bool), [_on_plane(w, b, rng)], 0.0)
    two = np.zeros(d, dtype=bool)
    two[[3, 7]] = True
    # a two-weight piece of it (scaled), its kinks on its boundary: dropped
    piece = _Entry(np.where(two, -2.0 * w, 0.0), -2.0 * b, two, [_on_plane(w, b, rng)], 0.0)
    assert _without_fragments([], [whole, piece]) == [whole]
    # the same weights, but its kinks are another neuron's: kept
    v = rng.standard_normal(d)
    stray = _Entry(np.where(two, -2.0 * w, 0.0), -2.0 * b, two, [_on_plane(v, -0.2, rng)], 0.0)
    assert _without_fragments([], [whole, stray]) == [whole, stray]
    # one weight and the bias say too little to tell: kept
    one = np.zeros(d, dtype=bool)
    one[5] = True
    single = _Entry(np.where(one, w, 0.0), b, one, [_on_plane(w, b, rng)], 0.0)
    assert _without_fragments([], [whole, single]) == [whole, single]


def test_a_seed_stays_first_and_unchanged_when_pieces_join_it() -> None:
    rng = np.random.default_rng(2)
    d = 16
    w, b = rng.standard_normal(d), -0.3
    seed = _Entry(w.copy(), b, np.ones(d, dtype=bool), [np.zeros((1, d))], 1e-15, seed=True)
    half = np.arange(d) < 9
    piece = _Entry(np.where(half, 4.0 * w, 0.0), 4.0 * b, half, [np.zeros((1, d))], 1e-9)
    other = _Entry(rng.standard_normal(d), 0.1, half, [np.zeros((1, d))], 0.0)
    out = _merged([seed, other, piece])
    assert len(out) == 2 and out[0] is seed and out[0].seed and not out[1].seed
    np.testing.assert_array_equal(out[0].w, w)  # a whole row gains no weight from a piece
    assert out[0].residual == 1e-15 and len(out[0].points) == 2


def test_two_pieces_that_share_too_few_weights_meet_through_a_third() -> None:
    rng = np.random.default_rng(0)
    w, b = rng.standard_normal(20), 0.7
    masks = [np.zeros(20, dtype=bool) for _ in range(3)]
    masks[0][:8] = True  # A and C share no weight; B shares 5 with each
    masks[2][12:] = True
    masks[1][3:17] = True
    pieces = [_Entry(np.where(m, s * w, 0.0), s * b, m, [np.zeros((1, 2))], 0.0)
              for m, s in zip(masks, (2.0, -0.5, 3.0), strict=True)]
    # A and C first: apart; B then joins A, and the grown A takes C on the second pass
    out = _merged([pieces[0], pieces[2], pieces[1]])
    assert len(out) == 1 and out[0].seen.all()
    np.testing.assert_allclose(out[0].w, 2.0 * w, rtol=1e-12)
    assert out[0].b == pytest.approx(2.0 * b)


def test_pieces_sharing_too_few_weights_stay_apart() -> None:
    w = np.arange(1.0, 11.0)
    a = np.zeros(10, dtype=bool)
    a[: 5 + MIN_SHARED - 1] = True
    c = ~a
    c[5 : 5 + MIN_SHARED - 1] = True  # MIN_SHARED - 1 weights in common
    out = _merged([_Entry(np.where(a, w, 0.0), 1.0, a, [], 0.0), _Entry(np.where(c, w, 0.0), 1.0, c, [], 0.0)])
    assert len(out) == 2


def test_the_rows_of_layer_three_are_pieced_together() -> None:
    net, prefix, true = _victim(0)
    oracle = CountingOracle(MLPOracle(net))
    pr = pattern_rows(oracle.query, prefix, 8, 20, ExtractionConfig(seed=0), np.random.default_rng(0), 1e-9)
    assert pr.W.shape == (8, 16) and pr.regions >= 2
    for w, b, seen in zip(pr.W, pr.b, pr.seen, strict=True):
        u = np.append(w[seen], b)
        T = np.concatenate([true[:, :-1][:, seen], true[:, -1:]], axis=1)
        cos = np.abs(T @ u) / (np.linalg.norm(T, axis=1) * np.linalg.norm(u))
        # one finite-difference gradient per piece, good to about 1e-8 here (test_all_on's note);
        # 1e-5 is far above that and far below a wrong row
        assert 1.0 - cos.max() <= 1e-5
    assert sorted(np.argmax(np.abs(pr.W @ true[:, :-1].T + np.outer(pr.b, true[:, -1])), axis=1).tolist()) == list(
        range(8))


def test_the_layer_is_completed_and_signed() -> None:
    net, prefix, true = _victim(0)
    oracle = CountingOracle(MLPOracle(net))
    out, why, zero = pattern_outcome(oracle.query, prefix, 8, 20, False, ExtractionConfig(seed=0),
                                     np.random.default_rng(0), 1e-9)
    assert out is not None, why
    assert zero.size == 0
    U, ub, _ = _unit(out.W, out.b)
    C = np.concatenate([U, ub[:, None]], axis=1) @ (true / np.linalg.norm(true, axis=1, keepdims=True)).T
    assert sorted(np.abs(C).argmax(axis=1).tolist()) == list(range(8))
    # refined on boundary points after completion: exact to rounding here; signs right
    assert np.all(C.max(axis=1) >= 1.0 - 1e-9)


def _report(width: int) -> LayerReport:
    return LayerReport(index=2, width=width, recovered=width, dead=0, witnesses=0, queries=0, seconds=0.0,
                       sign_method="wiggle", neurons=tuple({"index": j, "sign": 1, "sign_confidence": 1.0}
                                                           for j in range(width)), residual=0.0)


def test_the_pipeline_reads_the_layer_in_pattern_regions_when_none_has_all_on() -> None:
    net, prefix, true = _victim(0)
    reports = [_report(16), _report(16)]
    q = CountingOracle(MLPOracle(net)).query
    # behind a layer narrower than pattern_min_width: the walks take it
    _, _, out = _all_on_layer(q, list(prefix), reports, 8, 20, False, ExtractionConfig(seed=0),
                              np.random.default_rng(0), 1e-9, None, [])
    assert out is None
    _, reps, out = _all_on_layer(q, list(prefix), reports, 8, 20, False, ExtractionConfig(seed=0, pattern_min_width=16),
                                 np.random.default_rng(0), 1e-9, None, [])
    assert out is not None and out.W.shape == (8, 16)
    assert "pattern-region rows" in reps[-1].sign_method
    assert all(nr["rows_from"] == "pattern regions" for nr in out.neurons)


def test_the_width_and_the_region_count_are_validated() -> None:
    with pytest.raises(InputError, match="pattern_min_width"):
        ExtractionConfig(pattern_min_width=-1)
    with pytest.raises(InputError, match="pattern_max_regions"):
        ExtractionConfig(pattern_max_regions=0)


def test_the_fill_cost_counts_lines_by_the_weights_lacked() -> None:
    from relux.attack.pattern_layer import fill_cost

    _, prefix, true = _victim(0)
    cfg = ExtractionConfig(seed=0)
    whole = _Entry(true[0, :-1].copy(), float(true[0, -1]), np.ones(16, dtype=bool), [np.zeros((1, 20))], 0.0)
    assert fill_cost(prefix, [whole], cfg) == 0
    # a line costs a kink search (grid_per_neuron = 4 points per known neuron, and 16) and four
    # measurements of 2 (d_in + 1) queries; one line for up to 23 weights lacked, two from 23 to 47
    per_line = 4 * 32 + 16 + 4 * 2 * 17
    few = _Entry(true[1, :-1].copy(), float(true[1, -1]), np.arange(16) >= 3, [np.zeros((1, 20))], 0.0)
    assert fill_cost(prefix, [whole, few], cfg) == per_line
    assert fill_cost(prefix, [few, few], cfg) == 2 * per_line

