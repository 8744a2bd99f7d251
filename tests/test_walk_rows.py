"""Rows of a layer behind one wider than its space of control, from signed walks
(relux.attack.walk_rows), and the signed walk system (relux.attack.walk_system)."""

from __future__ import annotations

import numpy as np
import pytest

from relux.attack.config import ExtractionConfig
from relux.attack.critical import LineKinks
from relux.attack.walk_rows import walk_rows
from relux.attack.walk_system import WalkSystem
from relux.model import MLP
from relux.oracle import CountingOracle, MLPOracle
from relux.zoo import random_mlp


@pytest.fixture(scope="module")
def expansive() -> MLP:
    # layer 1 (16 neurons) is twice as wide as the input (8): a witness sees only part of a layer-2 row
    return random_mlp((8, 16, 6, 1), np.random.default_rng(1))


def _unit(W: np.ndarray, b: np.ndarray) -> np.ndarray:
    T = np.concatenate([W, b[:, None]], axis=1)
    return np.asarray(T / np.linalg.norm(T, axis=1, keepdims=True))


def test_signed_walks_give_every_row_exactly(expansive: MLP) -> None:
    W1, b1 = expansive.layers[0]
    n1 = np.linalg.norm(np.concatenate([W1, b1[:, None]], axis=1), axis=1)
    layer = (W1 / n1[:, None], b1 / n1)  # the known first layer, signs right, rows unit
    oracle = CountingOracle(MLPOracle(expansive))
    out = walk_rows(oracle.query, [layer], 6, 8, ExtractionConfig(seed=0), np.random.default_rng(0), 1e-9)
    assert out.W.shape == (6, 16), out.reason
    W2, b2 = expansive.layers[1]
    cos = np.abs(_unit(out.W, out.b) @ _unit(W2 * n1[None, :], b2).T)
    # exact kinks through one known layer: float64 rounding (~1e-13) far below 1e-9
    assert np.all(1.0 - cos.max(axis=1) <= 1e-9)
    assert sorted(cos.argmax(axis=1).tolist()) == list(range(6))
    assert out.walks >= 6 and oracle.queries > 0


def test_a_degenerate_known_row_is_ignored(expansive: MLP) -> None:
    """A known row of zeros (a walk fit with no term on the layer's outputs) is no row: it used to
    stop the extraction with a ZeroDivisionError (random 10-10-10-10-1, seed 2)."""
    W1, b1 = expansive.layers[0]
    n1 = np.linalg.norm(np.concatenate([W1, b1[:, None]], axis=1), axis=1)
    layer = (W1 / n1[:, None], b1 / n1)
    known = [(np.zeros(16), 0.0, np.zeros((1, 8)), 0.0)]
    out = walk_rows(CountingOracle(MLPOracle(expansive)).query, [layer], 6, 8, ExtractionConfig(seed=0),
                    np.random.default_rng(0), 1e-9, known=known)
    assert out.W.shape == (6, 16) and np.all(np.isfinite(out.W)), out.reason


def test_signed_system_needs_no_columns_for_neurons_never_on() -> None:
    rng = np.random.default_rng(2)
    W1, b1 = rng.normal(size=(9, 4)), rng.normal(size=9)
    w2, b2 = rng.normal(size=9), 0.2
    # a point on the layer-2 boundary, and its exact normal
    for _ in range(1000):
        x = rng.normal(size=4)
        on = (W1 @ x + b1) > 0
        g = (on * w2) @ W1
        x = x - (np.maximum(W1 @ x + b1, 0) @ w2 + b2) / (g @ g) * g
        if np.array_equal((W1 @ x + b1) > 0, on) and 0 < on.sum() < 4:
            break
    ws = WalkSystem([(W1, b1)], x, g, signed=True)
    assert {j for k, j in ws.cols if k == "n"} == set(np.flatnonzero(on).tolist())
    assert ws.determined  # fewer neurons on than the input's dimension: the start's normal fixes them
    u, c = ws.row()
    ref = np.append(np.where(on, w2, 0.0), b2)
    est = np.append(u, c)
    # the start normal enters 1e-3 weaker than the start point, both exact here: rounding only
    assert abs(abs(est @ ref) / (np.linalg.norm(est) * np.linalg.norm(ref)) - 1.0) <= 1e-12


def test_search_line_across_a_crossed_boundary_meets_the_next_piece() -> None:
    # The next piece of a boundary past neuron m's hyperplane is a hyperplane through the ridge, at a
    # tilt set by the unknown weight; a line parallel to m's hyperplane, a little past it, meets it.
    from relux.attack.prefix import forms as _forms
    from relux.attack.walk import _across, _Chain

    hits = tries = 0
    for seed in range(400):
        if tries == 40:
            break
        rng = np.random.default_rng(seed)
        W1, b1 = rng.normal(size=(12, 5)), rng.normal(size=12)
        w2, b2 = rng.normal(size=12), 0.1
        layers = [(W1, b1)]
        x = rng.normal(size=5)
        on = (W1 @ x + b1) > 0
        g = (on * w2) @ W1
        x = x - (np.maximum(W1 @ x + b1, 0) @ w2 + b2) / (g @ g) * g  # onto the boundary (same piece)
        if not np.array_equal((W1 @ x + b1) > 0, on):
            continue
        g /= np.linalg.norm(g)
        d = rng.normal(size=5)
        d -= (d @ g) * g
        d /= np.linalg.norm(d)
        z, G = _forms(layers, x)
        rate = G @ d
        with np.errstate(divide="ignore", invalid="ignore"):
            t = np.where(z * rate < 0, -z / rate, np.inf)
        m = int(np.argmin(t))
        ch = _Chain(x=x, g=g, points=[x], switched=np.zeros(12, dtype=bool),
                    system=WalkSystem(layers, x, g, signed=True))
        st = _across(layers, ch, x + t[m] * d, m, z, G, d, 10.0)
        if st is None:
            continue
        tries += 1
        # the short line that the walk searches first: a tenth of the region's span about p
        h = min(-st.lo, st.hi, 0.1 * (st.hi - st.lo))
        ends = np.maximum(np.stack([st.p - h * st.u, st.p + h * st.u]) @ W1.T + b1, 0) @ w2 + b2
        hits += bool(ends[0] * ends[1] < 0)
    # a piece nearly parallel to m's hyperplane meets the line beyond it: rare
    assert tries == 40 and hits >= 0.9 * tries


def test_bracket_about_a_predicted_kink_finds_it_exactly_or_not_at_all() -> None:
    from relux.attack.walk import _BRACKET, _predicted_kinks

    net = random_mlp((6, 4, 2), np.random.default_rng(5))
    W1, b1 = net.layers[0]
    w, b = W1[0], b1[0]
    rng = np.random.default_rng(0)
    X = rng.normal(size=(20, 6))
    on = X - ((X @ w + b) / (w @ w))[:, None] * w[None, :]  # on neuron 0's boundary
    U = rng.normal(size=(20, 6))
    U *= np.sign(U @ w)[:, None]  # across the boundary
    # predicted a tenth of the bracket's middle off: found, exactly (float64 rounding of a 2-layer net)
    got = _predicted_kinks(MLPOracle(net).query, on + 0.03 * _BRACKET * U, U)
    hit = [(i, y) for i, y in enumerate(got) if y is not None]
    assert len(hit) >= 18  # another neuron's kink within the bracket is rare
    for i, y in hit:
        assert abs(float(w @ y + b)) / float(np.linalg.norm(w)) <= 1e-12 * float(np.linalg.norm(U[i]))
    # predicted twice the bracket off: no kink in it
    assert all(y is None for y in _predicted_kinks(MLPOracle(net).query, on + 2 * _BRACKET * U, U))


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_signed_walks_behind_a_narrow_layer(seed: int) -> None:
    # 6 first-layer neurons: a walk's system has fewer columns than the end check's points (the QR
    # update's block size must stay within the columns)
    net = random_mlp((4, 6, 3, 1), np.random.default_rng(seed))
    W1, b1 = net.layers[0]
    n1 = np.linalg.norm(np.concatenate([W1, b1[:, None]], axis=1), axis=1)
    out = walk_rows(MLPOracle(net).query, [(W1 / n1[:, None], b1 / n1)], 3, 4, ExtractionConfig(seed=0),
                    np.random.default_rng(0), 1e-9)
    W2, b2 = net.layers[1]
    cos = np.abs(_unit(out.W, out.b) @ _unit(W2 * n1[None, :], b2).T) if out.W.shape[0] else np.zeros((0, 3))
    # every row found is exact to float64 rounding (~1e-13), and each is a different neuron
    assert np.all(1.0 - cos.max(axis=1) <= 1e-9)
    assert len(set(cos.argmax(axis=1).tolist())) == out.W.shape[0] == 3, out.reason


def test_relocation_lands_exactly_on_the_row_boundary_without_a_query() -> None:
    from relux.attack.walk import _Chain, _relocate

    rng = np.random.default_rng(3)
    W1, b1 = rng.normal(size=(9, 4)), rng.normal(size=9)
    w2, b2 = rng.normal(size=9), 0.2

    def value(x: np.ndarray) -> float:
        return float(np.maximum(W1 @ x + b1, 0) @ w2 + b2)

    for _ in range(1000):  # a start on the boundary where fewer neurons are on than inputs
        x = rng.normal(size=4)
        on = (W1 @ x + b1) > 0
        g = (on * w2) @ W1
        x = x - value(x) / (g @ g) * g
        if np.array_equal((W1 @ x + b1) > 0, on) and 0 < on.sum() < 4:
            break
    ws = WalkSystem([(W1, b1)], x, g, signed=True)
    assert ws.determined
    ch = _Chain(x=x.copy(), g=g / np.linalg.norm(g), points=[x.copy()], switched=on.copy(), system=ws)
    moved = 0
    for _ in range(20):
        if not _relocate(ch, [(W1, b1)], np.arange(9), 2.0, rng):
            continue
        moved += 1
        here = (W1 @ ch.x + b1) > 0
        assert not np.any(here & ~on)  # only neurons whose weights the row holds are on there
        gt = (here * w2) @ W1
        # the predicted boundary is the true one there: an interpolation inside one region, exact to
        # rounding (~1e-15 of the terms), and the normal is the row's
        assert abs(value(ch.x)) <= 1e-12 * (np.abs(W1 @ ch.x + b1) @ np.abs(w2) + 1.0)
        assert abs(abs(float(ch.g @ gt)) / np.linalg.norm(gt) - 1.0) <= 1e-12
        assert ch.virtual and np.array_equal(ch.virtual[-1], ch.x)
    assert moved >= 10


def _layer_rows_and_lines(expansive: MLP, n_lines: int) -> tuple[
        tuple[np.ndarray, np.ndarray], np.ndarray, list[LineKinks], np.random.Generator]:
    """The victim's first layer (unit rows), its second layer's unit rows over them, ``n_lines`` search lines
    with their kinks, and the generator that drew them (for what the test draws next)."""
    from relux.attack.critical import find_kinks

    W1, b1 = expansive.layers[0]
    n1 = np.linalg.norm(np.concatenate([W1, b1[:, None]], axis=1), axis=1)
    layer = (W1 / n1[:, None], b1 / n1)
    T = _unit(expansive.layers[1][0] * n1[None, :], expansive.layers[1][1])
    rng = np.random.default_rng(4)
    x0 = rng.normal(size=(n_lines, 8))
    U = rng.normal(size=(n_lines, 8))
    U *= (4.0 * np.sqrt(8) / np.linalg.norm(U, axis=1))[:, None]
    lines, _ = find_kinks(MLPOracle(expansive).query, x0, U, -1.0, 1.0, 512, 1e-9)
    return layer, T, lines, rng


def test_rows_the_search_lines_contradict_are_dropped(expansive: MLP) -> None:
    from relux.attack.walk_rows import _confirmed

    layer, T, lines, rng = _layer_rows_and_lines(expansive, 12)
    bogus = T[0] + 0.05 * rng.normal(size=T.shape[1])  # a row near a real one: its crossings are elsewhere
    bogus /= np.linalg.norm(bogus)
    rows = [(t[:-1], float(t[-1]), np.zeros((0, 8)), 0.0) for t in (*T, bogus)]
    kept = _confirmed([layer], rows, lines, 7)  # room for all seven: the misses drop the bogus row
    assert len(kept) == 6
    assert all(any(r is k for k in kept) for r in rows[:6])  # every real row kept, the bogus one dropped
    assert len(_confirmed([layer], rows[:6], lines, 4)) == 4  # never more than the layer's width


def test_a_row_its_lines_contradict_as_often_as_they_confirm_is_weak(expansive: MLP) -> None:
    # On one line, the real rows' crossings are kinks (hits only); a row one hit and two misses would pass
    # the confirmation rule on so little evidence, but counts as weak: the signed walks search more lines.
    from relux.attack.walk_rows import _weak

    layer, T, lines, rng = _layer_rows_and_lines(expansive, 2)
    real = [(t[:-1], float(t[-1]), np.zeros((0, 8)), 0.0) for t in T]
    assert not _weak([layer], real, lines)
    bogus = T[0] + 0.05 * rng.normal(size=T.shape[1])
    bogus /= np.linalg.norm(bogus)
    assert _weak([layer], [*real, (bogus[:-1], float(bogus[-1]), np.zeros((0, 8)), 0.0)], lines)
    assert not _weak([layer], [], lines) and not _weak([layer], real, [])
