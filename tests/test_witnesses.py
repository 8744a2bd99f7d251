"""Witness search and measurement behind a known prefix (attack-notes §3): the reduced coordinates of
the first layer's row space, candidates found without gradient queries, and measurement that does not
depend on how the work is split."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from relux.attack import prefix as pfx
from relux.attack.config import ExtractionConfig
from relux.attack.witnesses import find_candidates, measure_candidates
from relux.oracle import CountingOracle, MLPOracle
from relux.parallel import SerialExecutor
from relux.zoo import random_mlp


class _SplitSerial(SerialExecutor):
    """Runs in this process, but reports three workers, so work is cut into six tasks."""

    @property
    def jobs(self) -> int:
        return 3


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), d0=st.integers(6, 40), depth=st.integers(1, 3))
def test_reduced_jacobian_lifts_to_the_full_one(seed: int, d0: int, depth: int) -> None:
    rng = np.random.default_rng(seed)
    widths = [int(rng.integers(2, d0))] + [int(rng.integers(2, 12)) for _ in range(depth - 1)]
    arch = (d0, *widths, 1)
    layers = list(random_mlp(arch, rng).layers[:-1])
    red = pfx.input_space(layers)
    assert red is not None
    V, first = red
    assert V.shape == (widths[0], d0)
    x = rng.normal(size=d0)
    M, jacs = pfx.jacobian(layers, x)
    Mr, jacs_r = pfx.jacobian(layers, x, first)
    # V's rows span W1's rows up to rounding: products of a few well-scaled factors, so the lifted
    # Jacobians agree to a few hundred eps of the full ones' norms
    tol = 1e-12 * (1.0 + float(np.linalg.norm(M)))
    assert np.allclose(Mr @ V, M, rtol=0.0, atol=tol)
    for J, Jr in zip(jacs, jacs_r, strict=True):
        assert np.allclose(Jr @ V, J, rtol=0.0, atol=1e-12 * (1.0 + float(np.linalg.norm(J))))
    d_full = pfx.boundary_distance(layers, x)
    assert abs(pfx.boundary_distance(layers, x, first) - d_full) <= 1e-12 * d_full


def test_no_reduction_when_the_first_layer_spans_the_input() -> None:
    layers = list(random_mlp((5, 8, 1), np.random.default_rng(0)).layers[:-1])
    assert pfx.input_space(layers) is None
    assert pfx.input_space([]) is None


def _setting() -> tuple[CountingOracle, list[pfx.Layer], ExtractionConfig, np.ndarray]:
    victim = random_mlp((24, 8, 6, 2), np.random.default_rng(5))
    return CountingOracle(MLPOracle(victim)), [victim.layers[0]], ExtractionConfig(seed=0), victim.layers[1][0]


def test_candidates_cost_only_the_kink_search() -> None:
    oracle, layers, cfg, _ = _setting()
    cands, info = find_candidates(oracle.query, layers, 24, 2, 64, cfg, np.random.default_rng(0), 1.46e-11)
    assert cands and oracle.queries == info.search_queries
    assert info.kinks == info.prefix_kinks + info.known_kinks + len(cands)


def test_measurement_does_not_depend_on_the_split_and_finds_true_normals() -> None:
    oracle, layers, cfg, W2 = _setting()
    cands, _ = find_candidates(oracle.query, layers, 24, 2, 64, cfg, np.random.default_rng(0), 1.46e-11)
    serial, q1, rej1 = measure_candidates(oracle.query, layers, 24, cands, cfg)
    split, q2, rej2 = measure_candidates(oracle.query, layers, 24, cands, cfg, executor=_SplitSerial())
    assert (q1, rej1, len(serial)) == (q2, rej2, len(split))
    for a, b in zip(serial, split, strict=True):
        assert np.array_equal(a.normal, b.normal) and np.array_equal(a.w, b.w) and a.b == b.b
    # Each witness's normal is the input gradient of some layer-2 pre-activation there (the network
    # has no deeper hidden layer); finite differences over steps ~1e-3 of the segment keep ~1e-8.
    W1, b1 = layers[0]
    for wt in serial:
        G = (W2 * (W1 @ wt.x + b1 > 0)) @ W1
        G /= np.linalg.norm(G, axis=1, keepdims=True)
        assert float(np.max(np.abs(G @ wt.normal))) >= 1 - 1e-7


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_frame_is_the_same_network_with_fewer_inputs(seed: int) -> None:
    """``f(x) = f(V^T V x)``: the oracle in frame coordinates agrees with the network at the lifted
    points, and sign flips made in the frame come back exactly (not re-lifted)."""
    from relux.attack.frame import input_frame

    rng = np.random.default_rng(seed)
    d0 = int(rng.integers(8, 30))
    victim = random_mlp((d0, int(rng.integers(2, d0)), 5, 2), rng)
    layers = list(victim.layers[:-1])
    frame = input_frame(layers, layers[0][0].shape[0])
    assert frame is not None and frame.dim == layers[0][0].shape[0]
    assert input_frame(layers, layers[0][0].shape[0] + 1) is None  # a first-layer row still unseen
    X = rng.normal(size=(50, d0))
    Y = X @ frame.V.T
    # one projection and one lift: rounding of order eps * |x| * |W1|
    assert np.allclose(frame.query(victim.forward)(Y), victim.forward(X), rtol=1e-12, atol=1e-12)
    red = frame.down(layers)
    sgn = np.where(rng.random(red[0][0].shape[0]) < 0.5, -1.0, 1.0)
    changed = [(red[0][0] * sgn[:, None], red[0][1] * sgn), *red[1:]]
    up = frame.up(layers, red, changed)
    assert np.array_equal(up[0][0], layers[0][0] * sgn[:, None])
    assert np.array_equal(up[0][1], layers[0][1] * sgn)


def test_grouping_continued_equals_grouping_afresh() -> None:
    """A layer re-groups its witnesses after every round; continuing from the saved state as the list
    grows gives exactly the groups of a fresh pass, and a list that did not just grow starts over."""
    from relux.attack.unify import Grouping, group_witnesses

    victim = random_mlp((12, 6, 5, 2), np.random.default_rng(2))
    oracle = CountingOracle(MLPOracle(victim))
    cfg = ExtractionConfig(seed=0)
    cands, _ = find_candidates(oracle.query, [victim.layers[0]], 12, 12, 64, cfg, np.random.default_rng(0), 1.46e-11)
    ws, _, _ = measure_candidates(oracle.query, [victim.layers[0]], 12, cands, cfg)
    assert len(ws) >= 20
    grouping = Grouping()
    for k in range(0, len(ws) + 1, 5):
        assert grouping.update(ws[:k]) == group_witnesses(ws[:k])
    assert grouping.update(ws) == group_witnesses(ws)
    assert any(len(g) >= 2 for g in group_witnesses(ws))
    shuffled = ws[::-1]
    assert grouping.update(shuffled) == group_witnesses(shuffled)


def test_shared_pieces_are_queried_once() -> None:
    """Consecutive unknown kinks share the piece between them: measured together they cost fewer
    queries than one at a time, and give the same witnesses."""
    oracle, layers, cfg, _ = _setting()
    cands, _ = find_candidates(oracle.query, layers, 24, 2, 64, cfg, np.random.default_rng(0), 1.46e-11)
    together, q_all, _ = measure_candidates(oracle.query, layers, 24, cands, cfg)
    alone = [measure_candidates(oracle.query, layers, 24, [c], cfg) for c in cands]
    singles = [w for ws, _, _ in alone for w in ws]
    assert q_all < sum(q for _, q, _ in alone)
    assert len(together) == len(singles)
    for a, b in zip(together, singles, strict=True):
        # the same probe points; only the batch an output was computed in differs (BLAS rounding),
        # amplified by the 1/step of the finite differences (steps ~1e-3 of the segment)
        assert np.array_equal(a.x, b.x) and np.allclose(a.normal, b.normal, rtol=0, atol=1e-9)


def test_frame_lifts_a_first_layer_row_added_in_the_frame() -> None:
    from relux.attack.frame import input_frame

    victim = random_mlp((10, 4, 3, 1), np.random.default_rng(1))
    layers = list(victim.layers[:-1])
    frame = input_frame(layers, 4)
    assert frame is not None
    red = frame.down(layers)
    extra = np.random.default_rng(2).normal(size=(1, frame.dim))
    changed = [(np.concatenate([red[0][0], extra]), np.append(red[0][1], 0.5)), *red[1:]]
    up = frame.up(layers, red, changed)
    assert np.array_equal(up[0][0][:4], layers[0][0]) and up[0][1][-1] == 0.5
    # the lifted row acts on x as the frame row acts on V x (one product's rounding)
    x = np.random.default_rng(3).normal(size=10)
    assert abs(float(up[0][0][4] @ x) - float(extra[0] @ (frame.V @ x))) <= 1e-12 * float(np.linalg.norm(x))
