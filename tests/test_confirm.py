"""Judging a row by the crossings it predicts (relux.attack.confirm)."""

from __future__ import annotations

import numpy as np

from relux.attack.confirm import crossing_hits
from relux.attack.critical import LineKinks


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
