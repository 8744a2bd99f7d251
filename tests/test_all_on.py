"""Rows of a hidden layer from chords of the region where every known neuron is on
(relux.attack.active_lines, relux.attack.all_on_layer)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relux.attack.active_lines import (
    END_TRIM,
    TIP_REACH,
    TIP_START,
    AllOnRegion,
    active_lines,
    all_on_region,
    corner_scores,
    facet_vertices,
    tip_lines,
)
from relux.attack.all_on_layer import (
    IMPRECISE,
    MIN_SWITCHED,
    AllOnRows,
    _apart,
    all_on_outcome,
    all_on_rows,
    corner_allowance,
)
from relux.attack.config import ExtractionConfig
from relux.attack.pipeline import _all_on_layer, _ready_for_chords
from relux.attack.result import LayerReport
from relux.attack.witnesses import Candidate
from relux.model import MLP
from relux.oracle import CountingOracle, MLPOracle
from relux.parallel import make_executor
from relux.zoo import random_mlp


def _unit(W: np.ndarray, b: np.ndarray) -> np.ndarray:
    T = np.concatenate([W, b[:, None]], axis=1)
    return np.asarray(T / np.linalg.norm(T, axis=1, keepdims=True))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), d=st.integers(3, 10), depth=st.integers(1, 2))
def test_every_point_of_every_chord_has_every_known_neuron_on(seed: int, d: int, depth: int) -> None:
    rng = np.random.default_rng(seed)
    widths = [d] + [int(rng.integers(2, d + 1)) for _ in range(depth)]
    layers = [(rng.normal(size=(o, i)), rng.normal(scale=0.3, size=o))
              for i, o in zip(widths[:-1], widths[1:], strict=True)]
    region = all_on_region(layers, 3.0)
    if region is None:
        return  # two layers need not have a common all-on point
    assert region.depth > 0
    lines = active_lines(region, 4, 2.0, rng)
    assert lines.x0.shape[0] == 4, lines.reason
    np.testing.assert_allclose(np.linalg.norm(lines.u, axis=1), 2.0)
    assert np.all(lines.half > 0)
    for x0, u, half in zip(lines.x0, lines.u, lines.half, strict=True):
        X = x0 + np.linspace(-half, half, 41)[:, None] * u
        H = X
        for W, b in layers:
            Z = H @ W.T + b
            assert np.all(Z > 0)  # the chord is strictly inside: every neuron on, no switching
            H = Z


def test_between_facets_chords_end_near_the_facets_of_the_neurons_named() -> None:
    rng = np.random.default_rng(5)
    layers = [(rng.normal(size=(6, 8)), rng.normal(scale=0.3, size=6))]
    region = all_on_region(layers, 3.0)
    assert region is not None
    lines = active_lines(region, 2, 1.0, rng, facets=[4, 1])
    assert lines.x0.shape[0] == 2, lines.reason
    # chord 1 (the second) joins the vertices where neurons 4 and 1 are lowest: on their facets, each
    # end pulled at most 3% of the way to the centre (the margin, 1e-6 of the range, is below that)
    W, b = layers[0]
    z_centre = W @ region.centre + b
    ends = [lines.x0[1] + s * lines.half[1] / (1.0 - 2 * END_TRIM) * lines.u[1] for s in (-1.0, 1.0)]
    for x, m in zip(ends, (4, 1), strict=True):
        assert 0.0 < W[m] @ x + b[m] <= 0.031 * z_centre[m]


def test_a_row_is_confirmed_only_on_kinks_of_two_lines_far_apart() -> None:
    def cand(line: int, x: list[float]) -> Candidate:
        return Candidate(line, np.array(x), np.zeros(2), np.zeros(2), 0.1, 0.1, 1.0)

    lengths = [10.0, 20.0, 10.0]
    assert not _apart([cand(0, [0.0, 0.0]), cand(0, [5.0, 0.0])], lengths)  # one line
    # a tenth of the shorter line (10) apart at least
    assert not _apart([cand(0, [0.0, 0.0]), cand(1, [0.9, 0.0])], lengths)
    assert _apart([cand(0, [0.0, 0.0]), cand(1, [1.1, 0.0])], lengths)
    assert _apart([cand(0, [0.0, 0.0]), cand(2, [0.0, 0.5]), cand(1, [0.0, 1.5])], lengths)


def test_kinks_of_tips_need_the_known_neurons_to_switch_between_them() -> None:
    def cand(line: int, x: list[float]) -> Candidate:
        return Candidate(line, np.array(x), np.zeros(2), np.zeros(2), 0.1, 0.1, 1.0)

    far = [cand(0, [0.0, 0.0]), cand(1, [100.0, 0.0])]
    # line 1 is a tip (no length): distance never counts, near a shared vertex a deeper neuron's
    # kinks agree in key
    assert not _apart(far, [10.0, np.inf])
    # per member, each known neuron clearly on (1), clearly off (-1) or too near its boundary (0)
    three = np.array([[1, -1, 1, -1, 1], [-1, 1, -1, -1, 1]])  # three known neurons switch between them
    four = np.array([[1, -1, 1, -1, 1], [-1, 1, -1, 1, 1]])
    near = np.array([[1, -1, 1, -1, 1], [-1, 1, -1, 0, 1]])  # the fourth may not have: too near its boundary
    assert MIN_SWITCHED == 4
    assert not _apart(far, [10.0, np.inf], three)
    assert _apart(far, [10.0, np.inf], four)
    assert not _apart(far, [10.0, np.inf], near)
    assert not _apart([cand(0, [0.0, 0.0]), cand(0, [1.0, 0.0])], [10.0], four)  # one line
    assert _apart([cand(0, [0.0, 0.0]), cand(1, [0.1, 0.0])], [10.0, 10.0], four)  # close chords, switched


def _one_layer_region(seed: int, d: int) -> tuple[np.random.Generator, np.ndarray, np.ndarray, AllOnRegion | None]:
    """A random square layer of width ``d`` (biases near 1, so that its all-on region is seldom
    empty), the generator that drew it, and that region inside ``[-3, 3]^d``."""
    rng = np.random.default_rng(seed)
    W, b = rng.normal(size=(d, d)), rng.normal(scale=0.3, size=d) + 1.0
    return rng, W, b, all_on_region([(W, b)], 3.0)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**16), d=st.integers(3, 10))
def test_facet_vertices_are_where_each_neuron_is_lowest_or_highest(seed: int, d: int) -> None:
    rng, W, b, region = _one_layer_region(seed, d)
    if region is None:
        return
    V = facet_vertices(region, d)
    assert 1 <= V.shape[0] <= 2 * d
    Z = V @ W.T + b
    assert np.all(Z >= region.margin - 1e-9)  # in the region
    # each neuron's lowest and highest value over the region is at one of them: no point of the
    # region (random points near the centre, here) is beyond
    grid = region.centre + rng.uniform(-1.0, 1.0, size=(200, d)) * 0.1
    inside = grid[np.all(grid @ W.T + b > region.margin, axis=1)]
    vals = inside @ W.T + b
    assert np.all(Z.min(axis=0) <= vals.min(axis=0, initial=np.inf) + 1e-9)
    assert np.all(Z.max(axis=0) >= vals.max(axis=0, initial=-np.inf) - 1e-9)


def test_vertices_do_not_depend_on_the_workers() -> None:
    # the linear programs are pure: split among two loky workers they give the same vertices and
    # chords, bit for bit
    for seed in range(40):
        _, _, _, region = _one_layer_region(seed, 9)
        if region is not None:
            break
    assert region is not None
    with make_executor("loky", 2) as ex:
        split = facet_vertices(region, 9, ex)
        chords = active_lines(region, 6, 2.0, np.random.default_rng(1), d_last=9, facets=[0, 1, 2, 3], executor=ex)
    np.testing.assert_array_equal(split, facet_vertices(region, 9))
    alone = active_lines(region, 6, 2.0, np.random.default_rng(1), d_last=9, facets=[0, 1, 2, 3])
    for a, b in ((chords.x0, alone.x0), (chords.u, alone.u), (chords.half, alone.half)):
        np.testing.assert_array_equal(a, b)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**16), d=st.integers(3, 10))
def test_tips_start_at_their_vertex_and_stay_inside(seed: int, d: int) -> None:
    _, W, b, region = _one_layer_region(seed, d)
    if region is None:
        return
    V = facet_vertices(region, d)[:3]
    tips = tip_lines(region, V, 2.0)
    assert V.shape[0] <= tips.x0.shape[0] <= 2 * V.shape[0]
    np.testing.assert_allclose(np.linalg.norm(tips.u, axis=1), 2.0)
    for x0, u, half in zip(tips.x0, tips.u, tips.half, strict=True):
        X = x0 + np.linspace(-half, half, 21)[:, None] * u
        assert np.all(X @ W.T + b > 0)  # every point of a tip is in the region
    # the first tip runs from TIP_START to TIP_REACH of the way from the first vertex to the centre
    full = 2 * tips.half[0] / (1.0 - 2 * END_TRIM) * tips.u[0]
    start = tips.x0[0] - 0.5 * full
    np.testing.assert_allclose(start, V[0] + TIP_START * (region.centre - V[0]), atol=1e-9)
    np.testing.assert_allclose(start + full, V[0] + TIP_REACH * (region.centre - V[0]), atol=1e-9)


def test_corners_score_by_the_neurons_rarely_of_their_sign_there() -> None:
    # values of four neurons (columns) at five vertices (rows): neuron 0 is negative at vertex 2 only,
    # neuron 1 at vertices 2 and 3, neuron 2 positive at vertex 0 only, neuron 3 never changes sign
    Z = np.array([[1, 1, -1, 1, 1], [1, 1, -1, -1, 1], [1, -1, -1, -1, -1], [1, 1, 1, 1, 1]], dtype=float).T
    np.testing.assert_allclose(corner_scores(Z), [1.0, 0.0, 1.0 + 0.5, 0.5, 0.0])


def test_a_region_that_cannot_exist_gives_no_lines() -> None:
    # x - 1 > 0 and -x - 1 > 0 at once: impossible
    layers = [(np.array([[1.0, 0.0], [-1.0, 0.0]]), np.array([-1.0, -1.0]))]
    assert all_on_region(layers, 10.0) is None


def _victim() -> tuple[object, list[tuple[np.ndarray, np.ndarray]], np.ndarray]:
    # layer 1 (10) narrower than the input (14): the all-on region of layer 1 is a cone, and one
    # witness there shows a whole layer-2 row
    net = random_mlp((14, 10, 8, 1), np.random.default_rng(2))  # every layer-2 boundary crosses the region
    W1, b1 = net.layers[0]
    n1 = np.linalg.norm(np.concatenate([W1, b1[:, None]], axis=1), axis=1)
    W2, b2 = net.layers[1]
    return net, [(W1 / n1[:, None], b1 / n1)], _unit(W2 * n1[None, :], b2)


def test_the_rows_of_layer_two_come_from_all_on_chords() -> None:
    net, prefix, true = _victim()
    oracle = CountingOracle(MLPOracle(net))
    out = all_on_rows(oracle.query, prefix, 8, 14, ExtractionConfig(seed=0), np.random.default_rng(0), 1e-9)
    assert out.W.shape == (8, 10), out.reason
    cos = np.abs(_unit(out.W, out.b) @ true.T)
    assert sorted(cos.argmax(axis=1).tolist()) == list(range(8))
    # one finite-difference gradient per row, steps of 1% of a piece over d: good to about 1e-8
    # here; 1e-5 is far above that and far below a wrong row
    assert np.all(1.0 - cos.max(axis=1) <= 1e-5)
    assert out.measured >= 8 and out.lines > 0 and oracle.queries > 0
    for p, w, b in zip(out.points, out.W, out.b, strict=True):
        H = np.maximum(p @ prefix[0][0].T + prefix[0][1], 0)
        assert p.shape[0] >= 2  # seen on two lines at least
        assert np.all(np.abs(H @ w + b) <= 1e-4 * (np.linalg.norm(H, axis=1) + 1))


def test_seeded_rows_cost_nothing_and_only_the_others_are_sought() -> None:
    net, prefix, true = _victim()
    free = CountingOracle(MLPOracle(net))
    all_on_rows(free.query, prefix, 8, 14, ExtractionConfig(seed=0), np.random.default_rng(0), 1e-9)
    seeded = CountingOracle(MLPOracle(net))
    # the exact rows of neurons 0-5 (layer inputs are layer 1's normalised outputs)
    out = all_on_rows(seeded.query, prefix, 8, 14, ExtractionConfig(seed=0), np.random.default_rng(0), 1e-9,
                      seed=(true[:6, :-1], true[:6, -1]))
    cos = np.abs(_unit(out.W, out.b) @ true.T)
    assert sorted(cos.argmax(axis=1).tolist()) == [6, 7]
    assert np.all(1.0 - cos.max(axis=1) <= 1e-5)  # one finite-difference gradient each, as above
    assert out.measured < 8 and seeded.queries < free.queries


def test_a_region_whose_first_rows_do_not_refine_stops_early() -> None:
    """The ``precise`` check sees the first rows once: when it fails, the search stops there with the
    reason; when it passes, the rows are exactly those of a search without it."""
    net, prefix, true = _victim()
    cfg, calls = ExtractionConfig(seed=0), []

    def check(ok: bool) -> Callable[[AllOnRows], bool]:
        def precise(first: AllOnRows) -> bool:
            calls.append(first.W.shape[0])
            return ok
        return precise

    plain = all_on_rows(MLPOracle(net).query, prefix, 8, 14, cfg, np.random.default_rng(0), 1e-9)
    passed = all_on_rows(MLPOracle(net).query, prefix, 8, 14, cfg, np.random.default_rng(0), 1e-9,
                         precise=check(True))
    assert len(calls) == 1 and np.array_equal(passed.W, plain.W) and passed.reason == plain.reason
    failed = all_on_rows(MLPOracle(net).query, prefix, 8, 14, cfg, np.random.default_rng(0), 1e-9,
                         precise=check(False))
    assert len(calls) == 2 and failed.reason == IMPRECISE
    # the rows found by then, as they were found (8 here: the layer's width is below the probe's 16)
    assert failed.W.shape[0] == calls[1] and 0 < calls[1] <= 8
    assert np.all(1.0 - np.abs(_unit(failed.W, failed.b) @ true.T).max(axis=1) <= 1e-5)  # as above


def test_an_imprecise_region_leaves_the_layer_to_pattern_regions(monkeypatch: pytest.MonkeyPatch) -> None:
    """When the first all-on rows do not refine (a region too thin for finite differences), the layer
    is read in pattern regions instead, behind a layer at least pattern_min_width wide."""
    import relux.attack.all_on_layer as aol

    net, prefix, true = _victim()

    def none_refine(*args: Any, **kwargs: Any) -> tuple[np.ndarray, ...]:
        return np.zeros((0, 10)), np.zeros(0), (), np.zeros(0)

    monkeypatch.setattr(aol, "_precise_seeds", none_refine)
    # layer 1 is 10 wide: pattern regions allowed at every width here
    out, why, zero = all_on_outcome(CountingOracle(MLPOracle(net)).query, prefix, 8, 14, False,
                                    ExtractionConfig(seed=0, pattern_min_width=0), np.random.default_rng(0), 1e-9)
    assert out is not None and why == "" and zero.size == 0
    assert _whole(out, true) and out.dead == 0
    assert all("pattern regions" in str(nr["rows_from"]) for nr in out.neurons)
    # behind a narrower layer the rows are not checked: the all-on rows stand
    out, why, _ = all_on_outcome(CountingOracle(MLPOracle(net)).query, prefix, 8, 14, False,
                                 ExtractionConfig(seed=0), np.random.default_rng(0), 1e-9)
    assert out is not None and _whole(out, true)
    assert all(nr["rows_from"] == "all-on lines" for nr in out.neurons)


def _flip(prefix: list[tuple[np.ndarray, np.ndarray]], j: int) -> list[tuple[np.ndarray, np.ndarray]]:
    W1, b1 = prefix[0]
    f = np.where(np.arange(W1.shape[0]) == j, -1.0, 1.0)
    return [(W1 * f[:, None], b1 * f)]


def test_a_wrong_sign_in_the_layer_before_is_caught() -> None:
    net, prefix, _ = _victim()
    oracle = CountingOracle(MLPOracle(net))
    out, why, zero = all_on_outcome(oracle.query, _flip(prefix, 4), 8, 14, False, ExtractionConfig(seed=0),
                                    np.random.default_rng(0), 1e-9)
    # the flipped neuron is off wherever it is believed on: every row the chords give weights it 0
    assert out is None
    assert zero.tolist() == [4] and "[4]" in why


def test_the_pipeline_flips_it_back_and_takes_the_layer() -> None:
    net, prefix, true = _victim()
    oracle = CountingOracle(MLPOracle(net))
    neurons = tuple({"index": j, "sign": 1, "sign_confidence": 1.0} for j in range(10))
    report = LayerReport(index=1, width=10, recovered=10, dead=0, witnesses=0, queries=0, seconds=0.0,
                         sign_method="wiggle", neurons=neurons)
    warnings: list[str] = []
    layers, reports, out = _all_on_layer(oracle.query, _flip(prefix, 4), [report], 8, 14, False,
                                         ExtractionConfig(seed=0), np.random.default_rng(0), 1e-9, None, warnings)
    assert out is not None
    np.testing.assert_array_equal(layers[0][0], prefix[0][0])  # neuron 4 flipped back exactly
    assert reports[0].neurons[4]["sign"] == -1 and reports[0].neurons[3]["sign"] == 1
    assert "flipped 1" in reports[0].sign_method
    assert len(warnings) == 1 and "[4]" in warnings[0]
    cos = np.abs(_unit(out.W, out.b) @ true.T)
    assert sorted(cos.argmax(axis=1).tolist()) == list(range(8))
    # rows polished on exact boundary points: far below the 1e-5 of a single measurement
    assert np.all(1.0 - cos.max(axis=1) <= 1e-9)


def _short_by(n: int) -> Callable[..., AllOnRows]:
    """all_on_rows that loses its last ``n`` rows, as when neurons switched only in corners of the region
    are never confirmed (or, for ``n = -1``, has its first row twice)."""

    def rows(*args: Any, **kwargs: Any) -> AllOnRows:
        out = all_on_rows(*args, **kwargs)
        if kwargs.get("seed") is not None:  # a pattern region's search for the rows missing: as it is
            return out
        keep = out.W.shape[0] - n
        if n < 0:  # one row too many: the first again
            return dataclasses.replace(out, W=np.concatenate([out.W, out.W[:1]]), b=np.append(out.b, out.b[0]),
                                       points=(*out.points, out.points[0]),
                                       residual=np.append(out.residual, out.residual[0]), reason="long")
        return dataclasses.replace(out, W=out.W[:keep], b=out.b[:keep], points=out.points[:keep],
                                   residual=out.residual[:keep], reason="short")

    return rows


def test_the_allowance_is_one_row_in_a_hundred() -> None:
    assert [corner_allowance(w) for w in (8, 64, 99, 100, 200, 256)] == [0, 0, 0, 1, 2, 2]


def test_an_inner_layer_a_few_rows_short_goes_on_without_them(monkeypatch: pytest.MonkeyPatch) -> None:
    import relux.attack.all_on_layer as aol

    net, prefix, true = _victim()
    # the victim's layer is 8 wide, below the hundred that allows a row: allowed one here
    monkeypatch.setattr(aol, "corner_allowance", lambda width: 1)
    monkeypatch.setattr(aol, "all_on_rows", _short_by(1))

    def outcome(is_last: bool) -> tuple[Any, str]:
        out, why, zero = all_on_outcome(CountingOracle(MLPOracle(net)).query, prefix, 8, 14, is_last,
                                        ExtractionConfig(seed=0), np.random.default_rng(0), 1e-9)
        assert zero.size == 0
        return out, why

    out, why = outcome(False)
    assert out is not None and why == ""
    assert out.W.shape == (7, 10) and out.dead == 1
    cos = np.abs(_unit(out.W, out.b) @ true.T)
    assert len(set(cos.argmax(axis=1).tolist())) == 7
    # more rows than the layer has (deeper neurons' rows kept): not the layer either
    monkeypatch.setattr(aol, "all_on_rows", _short_by(-1))
    out, why = outcome(False)
    assert out is None and "9 rows for a layer of 8" in why


def _whole(out: Any, true: np.ndarray) -> bool:
    """Whether the layer ``out`` has every row of ``true``, each to 1e-9 in ``1 - |cos|`` (the rows
    are refined on exact boundary points, good to about 1e-12 on this float64 victim)."""
    cos = np.abs(_unit(out.W, out.b) @ true.T)
    return out.W.shape[0] == true.shape[0] and bool(np.all(1.0 - cos.max(axis=1) <= 1e-9)) and \
        len(set(cos.argmax(axis=1).tolist())) == true.shape[0]


@pytest.mark.parametrize(("short", "is_last"), [(1, True), (2, False)])
def test_rows_the_all_on_lines_miss_come_from_pattern_regions(
    monkeypatch: pytest.MonkeyPatch, short: int, is_last: bool,
) -> None:
    """More rows missing than the allowance (none for the last hidden layer): pattern regions seeded
    with the rows found (pattern_layer.pattern_rows) find the rest."""
    import relux.attack.all_on_layer as aol
    import relux.attack.pattern_layer as pl

    net, prefix, true = _victim()
    monkeypatch.setattr(aol, "all_on_rows", _short_by(short))
    monkeypatch.setattr(pl, "all_on_rows", _short_by(short))
    # layer 1 is 10 wide: pattern regions allowed at every width here
    cfg = ExtractionConfig(seed=0, pattern_min_width=0)
    out, why, zero = all_on_outcome(CountingOracle(MLPOracle(net)).query, prefix, 8, 14, is_last, cfg,
                                    np.random.default_rng(0), 1e-9)
    assert out is not None and why == "" and zero.size == 0
    assert _whole(out, true) and out.dead == 0
    assert "pattern regions" in out.neurons[-1]["rows_from"]
    # behind a layer narrower than pattern_min_width (the default 128) the walks take the layer
    oracle = CountingOracle(MLPOracle(net))
    out, why, _ = all_on_outcome(oracle.query, prefix, 8, 14, is_last, ExtractionConfig(seed=0),
                                 np.random.default_rng(0), 1e-9)
    assert out is None and why == "short"


def test_rows_still_missing_after_the_pattern_regions_give_no_layer(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pattern regions that find nothing more leave the layer to the walks, with the reason."""
    import relux.attack.all_on_layer as aol
    import relux.attack.pattern_layer as pl

    net, prefix, _ = _victim()
    monkeypatch.setattr(aol, "all_on_rows", _short_by(2))

    def nothing(*args: Any, **kwargs: Any) -> AllOnRows:
        out = all_on_rows(*args, **kwargs)
        return dataclasses.replace(out, W=np.zeros((0, 10)), b=np.zeros(0), points=(), residual=np.zeros(0))

    monkeypatch.setattr(pl, "all_on_rows", nothing)
    out, why, _ = all_on_outcome(CountingOracle(MLPOracle(net)).query, prefix, 8, 14, False,
                                 ExtractionConfig(seed=0, pattern_min_width=0), np.random.default_rng(0), 1e-9)
    assert out is None and why.startswith("short; 6 rows after") and "pattern regions" in why


def _report(width: int, rows: int, how: str, conf: float) -> LayerReport:
    neurons = tuple({"index": j, "sign": 1, "sign_confidence": conf, "rows_from": how} for j in range(rows))
    return LayerReport(index=3, width=width, recovered=rows, dead=width - rows, witnesses=0, queries=0,
                       seconds=0.0, sign_method="wiggle", neurons=neurons)


def test_the_next_layer_takes_chords_behind_a_layer_short_of_corner_neurons() -> None:
    def ready(rows: int, how: str = "all-on lines", conf: float = 0.5) -> bool:
        return _ready_for_chords(_report(256, rows, how, conf), rows)

    # complete: every sign settled; short by corner neurons: every sign decided (deep._layer_signs caps
    # a short layer's verdicts at 0.5)
    assert ready(256, conf=1.0) and not ready(256, conf=0.5)
    assert ready(254) and not ready(254, conf=0.0)
    assert not ready(253)
    # a short layer from walks may lack a neuron that is on in the region: not read through it
    assert not ready(255, "signed walks") and ready(256, "signed walks", 1.0)
    # complete, from pattern regions (an all-on region too thin or empty): every sign decided
    assert ready(256, "all-on lines and pattern regions") and ready(256, "pattern regions")
    assert not ready(256, "pattern regions", 0.0)


def test_a_short_layer_s_wrong_sign_is_flipped_back() -> None:
    # Layer 1 lacks neuron 9 (off everywhere near the region, so harmless) and neuron 4's sign is
    # wrong: the flip vector follows the 9 rows, not the layer's width of 10
    net, _, true = _victim()
    W1, b1 = (np.array(a, dtype=float) for a in net.layers[0])
    b1[9] = -1e3
    net = MLP([(W1, b1), net.layers[1], net.layers[2]])
    n1 = np.linalg.norm(np.concatenate([W1, b1[:, None]], axis=1), axis=1)
    prefix = [((W1 / n1[:, None])[:9], (b1 / n1)[:9])]
    report = _report(10, 9, "all-on lines", 0.5)
    warnings: list[str] = []
    layers, reports, out = _all_on_layer(CountingOracle(MLPOracle(net)).query, _flip(prefix, 4), [report], 8, 14,
                                         False, ExtractionConfig(seed=0), np.random.default_rng(0), 1e-9, None,
                                         warnings)
    assert out is not None and out.W.shape[0] == 8
    np.testing.assert_array_equal(layers[0][0], prefix[0][0])
    assert reports[0].neurons[4]["sign"] == -1 and len(warnings) == 1 and "[4]" in warnings[0]


def test_the_switch_is_validated() -> None:

    from relux.errors import InputError

    assert ExtractionConfig(all_on_min_width=0).all_on_min_width == 0
    for bad in (-1, 2.5, True):
        with pytest.raises(InputError, match="all_on_min_width"):
            ExtractionConfig(all_on_min_width=bad)  # type: ignore[arg-type]


def test_a_region_that_passes_the_check_gives_the_same_layer() -> None:
    """The check of the first rows (behind a layer at least pattern_min_width wide, here 0) polishes
    on a copy of the random stream: the layer comes out bit for bit as without it, for more queries."""
    net, prefix, _ = _victim()
    plain, checked = CountingOracle(MLPOracle(net)), CountingOracle(MLPOracle(net))
    a, _, _ = all_on_outcome(plain.query, prefix, 8, 14, False, ExtractionConfig(seed=0), np.random.default_rng(0),
                             1e-9)
    b, _, _ = all_on_outcome(checked.query, prefix, 8, 14, False, ExtractionConfig(seed=0, pattern_min_width=0),
                             np.random.default_rng(0), 1e-9)
    assert a is not None and b is not None
    assert np.array_equal(a.W, b.W) and np.array_equal(a.b, b.b) and checked.queries > plain.queries
