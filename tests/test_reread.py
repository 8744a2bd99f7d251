"""Rows of rarely active last-layer neurons read again from the output (relux.attack.reread)."""

from __future__ import annotations

import numpy as np

from relux.align import align
from relux.attack import prefix as pfx
from relux.attack.reread import reread_rare_rows
from relux.model import MLP
from relux.oracle import CountingOracle, MLPOracle
from relux.zoo import random_mlp


def _rare_last_row(seed: int, share: float) -> MLP:
    """Random 8-10-6-3 whose last-layer neuron 0 is on at about ``share`` of N(0, I) inputs."""
    m = random_mlp("8-10-6-3", np.random.default_rng(seed))
    (W1, b1), (W2, b2), out = m.layers
    X = np.random.default_rng(seed + 100).normal(size=(200000, 8))
    z = pfx.forward([(W1, b1)], X)[1] @ W2[0]
    b2 = b2.copy()
    b2[0] = -float(np.quantile(z, 1.0 - share))
    return MLP([(W1, b1), (W2, b2), out])


def test_a_wrong_rare_row_is_read_again_exactly() -> None:
    # The row of a neuron on at 0.5% of inputs, wrong by 30% on two weights: the points where the model
    # has it on, f's difference without it (rank one: its column times its pre-activation) and bisection
    # towards where f shows it off give the row back, to rounding.
    for seed in range(3):
        true = _rare_last_row(seed, 0.005)
        W2, b2 = (np.array(a, dtype=float) for a in true.layers[1])
        W2[0, :2] *= 1.3
        model = [true.layers[0], (W2, b2), true.layers[2]]
        oracle = CountingOracle(MLPOracle(true))
        pool = np.random.default_rng(seed + 1).normal(size=(4000, 8))
        got, info = reread_rare_rows(oracle.query, model, pool, np.sqrt(8), np.random.default_rng(seed + 2), 1e-10)
        assert info.replaced == (0,) and info.queries == oracle.queries
        al = align(true, MLP(got))
        # exact values of f on one linear piece each: the row comes back to float64 rounding of the
        # least-squares solve (2^-40 leaves room for its conditioning)
        assert al.complete and al.log2_max_norm_weight_error < -40


def test_common_and_right_rows_are_left_alone() -> None:
    true = _rare_last_row(4, 0.005)
    pool = np.random.default_rng(5).normal(size=(4000, 8))
    got, info = reread_rare_rows(MLPOracle(true).query, list(true.layers), pool, np.sqrt(8),
                                 np.random.default_rng(6), 1e-10)
    # the rare row is right already: reading it again may replace it by itself (to rounding), nothing else
    assert set(info.replaced) <= {0}
    for (W, b), (Wt, bt) in zip(got, true.layers, strict=True):
        np.testing.assert_allclose(W, Wt, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(b, bt, rtol=1e-9, atol=1e-12)
    # with no rare row (max_share 0): nothing is queried, not even at the hints
    same, none = reread_rare_rows(MLPOracle(true).query, list(true.layers), pool, np.sqrt(8),
                                  np.random.default_rng(6), 1e-10, hints=pool[:5], max_share=0.0)
    assert none.replaced == () and none.queries == 0


def test_draws_cover_every_coordinate_where_it_is_on() -> None:
    # The first n draws, then up to `per` more for each input coordinate of the layer that is on at fewer
    # than `per` of those: a weight on a coordinate rarely on with the neuron is seen only there.
    from relux.attack.reread import _covering

    m = random_mlp("5-6-2", np.random.default_rng(0))
    prefix = [m.layers[0]]
    D = np.random.default_rng(1).normal(size=(3000, 5))
    H = pfx.forward(prefix, D)[1]
    got = _covering(D, prefix, 10, 4)
    np.testing.assert_array_equal(got[:10], D[:10])
    Hg = pfx.forward(prefix, got)[1]
    for c in range(H.shape[1]):
        assert int(np.sum(Hg[:, c] > 0)) >= min(4, int(np.sum(H[:, c] > 0)))
    # each added input is one of D's, and none twice
    assert got.shape[0] <= 10 + 4 * H.shape[1]
    assert np.unique(got, axis=0).shape[0] == got.shape[0]
    assert _covering(D[:8], prefix, 10, 4).shape[0] == 8
