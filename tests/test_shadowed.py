"""A kink lies on one neuron's boundary: a row whose every witness lies on another row is dropped."""

from __future__ import annotations

import numpy as np
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from witness_helpers import exact_witness, positive_neuron

from relux.attack.unify import shadowed_rows, unify
from relux.attack.witnesses import Witness


def _witness(w: np.ndarray, b: float, active: np.ndarray, rng: np.random.Generator) -> Witness:
    """A full-rank exact witness whose point has every active input positive."""
    wt = exact_witness(w, b, active, rng)
    assert wt.h[np.flatnonzero(active)[-1]] > 0
    return wt


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_a_row_fitted_across_two_neurons_is_dropped_and_the_true_rows_stay(seed: int) -> None:
    """The failure seen on 40-20-10-10-1: witnesses of one neuron that see two coordinates each, and
    one stray witness of another neuron that sees a coordinate none of them see, unify into a row
    that fits them all (that coordinate's weight is fixed by the stray witness alone)."""
    rng = np.random.default_rng(seed)
    d = 6
    (wa, ba), (wb, bb) = positive_neuron(rng, d), positive_neuron(rng, d)
    full = np.ones(d, dtype=bool)
    wits = [_witness(wa, ba, full, rng) for _ in range(3)]  # neuron A, every coordinate on
    wits += [_witness(wb, bb, full, rng) for _ in range(3)]  # neuron B
    pairs = [np.isin(np.arange(d), p) for p in ([0, 1], [1, 2], [2, 3], [3, 4], [0, 4])]
    wits += [_witness(wa, ba, p, rng) for p in pairs]  # A, two coordinates at a time (never 5)
    wits.append(_witness(wb, bb, np.isin(np.arange(d), [5]), rng))  # B, coordinate 5 alone
    row_a = unify(wits, [0, 1, 2, 6, 7, 8, 9, 10])
    row_b = unify(wits, [3, 4, 5, 11])
    mixed = unify(wits, [6, 7, 8, 9, 10, 11])
    # every member fits the mixed row exactly, yet it is neither neuron
    assert mixed.residual < 1e-10
    ref = np.append(wa, ba) / np.linalg.norm(np.append(wa, ba))
    got = np.append(mixed.w, mixed.b)
    # the stray witness moves the mixed row away from A unless it happens to lie near A's boundary too
    assume(min(np.linalg.norm(got - ref), np.linalg.norm(got + ref)) > 1e-3)
    assert shadowed_rows([row_a, row_b, mixed], wits) == {2}
    assert shadowed_rows([mixed, row_b, row_a], wits) == {0}


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(2, 5))
def test_rows_of_distinct_neurons_are_never_dropped(seed: int, n: int) -> None:
    rng = np.random.default_rng(seed)
    d = 6
    wits: list[Witness] = []
    rows = []
    for _ in range(n):
        w, b = positive_neuron(rng, d)
        start = len(wits)
        for _ in range(3):
            active = rng.random(d) < 0.7
            active[rng.integers(d)] = True
            wits.append(_witness(w, b, active, rng))
        rows.append(unify(wits, list(range(start, len(wits)))))
    assert shadowed_rows(rows, wits) == set()
