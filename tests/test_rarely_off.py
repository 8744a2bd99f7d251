"""A last-hidden-layer neuron that is off only rarely (relux.attack.rarely_off): its row comes from the
affine part of the last-layer fit, its bias from a few inputs where it is off."""

from __future__ import annotations

import numpy as np
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from relux.attack import prefix as pfx
from relux.attack.always_on import rank_one_leftovers
from relux.attack.rarely_off import locate_rarely_off
from relux.attack.signs import fit_dropping_misfits
from relux.model import MLP
from relux.oracle import MLPOracle
from relux.zoo import random_mlp


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_a_neuron_off_at_one_input_in_a_thousand_is_placed_exactly(seed: int) -> None:
    rng = np.random.default_rng(seed)
    net = random_mlp((6, 10, 5, 3), rng)
    (W1, b1), (W2, b2), (W3, b3) = net.layers
    X = rng.normal(size=(200000, 6))
    _, H = pfx.forward([(W1, b1)], X)
    # neuron 4 of layer 2 on at all but 0.1% of inputs
    b2 = b2.copy()
    b2[4] -= np.quantile(H @ W2[4] + b2[4], 1e-3)
    victim = MLP([(W1, b1), (W2, b2), (W3, b3)])
    query = MLPOracle(victim).query
    prefix = [(W1, b1)]
    # the four other rows, known up to sign (two of them negated)
    sgn = np.array([1.0, -1.0, 1.0, -1.0])
    Wk, bk = W2[:4] * sgn[:, None], b2[:4] * sgn
    Xf = rng.normal(size=(800, 6))
    _, Hf = pfx.forward(prefix, Xf)
    # the pipeline reaches this only with an exact fit: the fit points are where the neuron is on
    on = Hf @ W2[4] + b2[4] > 0
    Zk = Hf[on] @ Wk.T + bk
    # (a known row on, or off, at every fit point is handled before this solve: not drawn here)
    assume(bool(np.all((Zk > 0).any(axis=0) & (Zk <= 0).any(axis=0))))
    alpha, gamma, c, _, _ = fit_dropping_misfits(Hf[on] @ Wk.T + bk, Hf[on], query(Xf[on]), rounds=0)

    def predict(P: np.ndarray) -> np.ndarray:
        _, Hp = pfx.forward(prefix, P)
        return np.asarray(np.maximum(Hp @ Wk.T + bk, 0.0) @ alpha.T + Hp @ gamma.T + c)

    cands = rank_one_leftovers(alpha, gamma, Wk)
    ro = locate_rarely_off(query, prefix, predict, cands, 6, 1.0, np.random.default_rng(seed + 1))
    assert ro.ok, ro.reason
    np.testing.assert_array_equal(ro.flips, sgn < 0)
    # the row and bias equal the truth up to a positive scale: exact kinks and float64 fits (1e-9 is
    # far above their rounding and far below what a wrong bias gives)
    got = np.append(ro.w, ro.b)
    true = np.append(W2[4], b2[4])
    scale = float(got @ true) / float(true @ true)
    assert scale > 0
    np.testing.assert_allclose(got, scale * true, atol=1e-9 * float(np.linalg.norm(got)))
    assert ro.off_points >= 2 and ro.queries <= 2 * 64 * len(cands)


def test_nothing_is_placed_when_no_probed_input_is_off() -> None:
    """A neuron on everywhere (positive bias, non-negative inputs, non-negative row): no input shows
    it off, so no bias is invented."""
    rng = np.random.default_rng(0)
    net = random_mlp((6, 10, 5, 3), rng)
    (W1, b1), (W2, b2), (W3, b3) = net.layers
    W2, b2 = W2.copy(), b2.copy()
    W2[4], b2[4] = np.abs(W2[4]), 1.0
    victim = MLP([(W1, b1), (W2, b2), (W3, b3)])
    query = MLPOracle(victim).query
    prefix = [(W1, b1)]
    Xf = rng.normal(size=(400, 6))
    _, Hf = pfx.forward(prefix, Xf)
    Wk, bk = W2[:4], b2[:4]
    alpha, gamma, c, _, _ = fit_dropping_misfits(Hf @ Wk.T + bk, Hf, query(Xf), rounds=0)

    def predict(P: np.ndarray) -> np.ndarray:
        _, Hp = pfx.forward(prefix, P)
        return np.asarray(np.maximum(Hp @ Wk.T + bk, 0.0) @ alpha.T + Hp @ gamma.T + c)

    ro = locate_rarely_off(query, prefix, predict, rank_one_leftovers(alpha, gamma, Wk), 6, 1.0,
                           np.random.default_rng(1))
    assert not ro.ok and ro.reason == "no probed input showed the neuron off"
