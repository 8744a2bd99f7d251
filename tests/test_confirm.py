"""Judging a row by the crossings it predicts (relux.attack.confirm)."""

from __future__ import annotations

import numpy as np

from relux.attack.confirm import crossing_hits
from relux.attack.critical import LineKinks
from relux.attack.deep import _distinct_rows, _with_kept
from relux.attack.unify import NeuronRow


def _line(x0: list[float], u: list[float], kinks: list[float]) -> LineKinks:
    return LineKinks(np.array(x0), np.array(u), -1.0, 1.0, np.array(kinks), np.zeros((len(kinks), 1)), 1.0)


def test_an_unseen_weight_excuses_only_the_crossings_where_it_is_on() -> None:
    # prefix h = ReLU(x); the true neuron is h0 + 5 h1 - 0.5, the estimate lacks the weight on h1
    prefix = [(np.eye(2), np.zeros(2))]
    W, b = np.array([[1.0, 0.0]]), np.array([-0.5])
    where_on = _line([0.0, 1.0], [1.0, 0.0], [])  # h1 = 1: the true neuron never crosses
    where_off = _line([0.0, -1.0], [1.0, 0.0], [])  # h1 = 0: the estimate is exact, its crossing is missed
    assert crossing_hits(W, b, [where_on], prefix)[1].tolist() == [1]
    assert crossing_hits(W, b, [where_on], prefix, coverage=np.array([[True, False]]))[1].tolist() == [0]
    assert crossing_hits(W, b, [where_off], prefix, coverage=np.array([[True, False]]))[1].tolist() == [1]


def _row(v: list[float], cov: list[bool] | None = None) -> NeuronRow:
    a = np.asarray(v, dtype=float)
    a /= np.linalg.norm(a)
    c = np.ones(a.size - 1, dtype=bool) if cov is None else np.asarray(cov)
    return NeuronRow(w=a[:-1], b=float(a[-1]), members=(), coverage=c, residual=0.0, gap=np.inf)


def test_repeated_rows_are_dropped_and_the_slot_refilled() -> None:
    """Two candidates that refine to one neuron keep one row; the next spare candidate that refines to a
    new row takes the freed slot. Agreement counts only on the coordinates both rows have seen."""
    a = _row([1.0, 2.0, 0.0, 0.5])
    b = _row([3.0, -1.0, 1.0, 0.2])
    a_again = _row([-1.0, -2.0, 0.0, -0.5])  # the same hyperplane, written with the other sign
    a_unseen = _row([1.0, 2.0, 7.0, 0.5], [True, True, False])  # differs only where it saw nothing
    c = _row([0.0, 1.0, -1.0, 1.0])
    refined: list[NeuronRow] = []

    def refine(r: NeuronRow) -> NeuronRow:
        refined.append(r)
        return r

    out = _distinct_rows([a, b, a_again, a_unseen], [a, c], 4, refine, [])
    assert [id(r) for r in out] == [id(a), id(b), id(c)]  # a spare equal to a kept row is not refined
    assert refined == [c]
    # nothing repeated: nothing refilled, nothing refined
    refined.clear()
    assert _distinct_rows([a, b], [c], 3, refine, []) == [a, b] and not refined


def test_a_kept_row_that_misses_its_crossings_is_dropped() -> None:
    """A row kept from an earlier round stays only while it misses at most a tenth of its crossings
    (plus two): the true row here crosses every line at a found kink, the wrong one (off in its weight
    on h1) misses on the lines where h1 is on."""
    prefix = [(np.eye(2), np.zeros(2))]
    true = _row([1.0, 1.0, -0.5])  # crosses h0 + h1 = 0.5
    wrong = _row([1.0, 3.0, -0.5])
    lines = []
    for k in range(12):  # lines along h0 at h1 = 0.1 k / 4 (on), kink where h0 = 0.5 - h1
        h1 = 0.025 * k + 0.05
        lines.append(_line([0.0, h1], [1.0, 0.0], [0.5 - h1]))
    merged, score, n_kept = _with_kept([true, wrong], [], lines, prefix)
    assert n_kept == 1 and merged[0] is true and score[0] == 12
