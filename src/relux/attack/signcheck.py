"""Checking signs, and repairing the few that are wrong (attack-notes §4: every sign decision must be
checked, not trusted).

With the hidden layers fixed, the output layer is a linear least-squares fit of ``f`` on the last
hidden activations. A wrong sign anywhere leaves a residual far above rounding on fresh queries, so
the residual is the check. A repair flips the least confident neurons of the last hidden layer, one
at a time and then in pairs, and keeps a flip only if the residual drops under the tolerance.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from relux.attack import prefix as pfx
from relux.attack.linalg import lstsq
from relux.oracle.base import FloatArray


@dataclass(frozen=True)
class SignCheck:
    """Outcome of :func:`check_and_repair`."""

    residual_before: float
    residual_after: float
    tolerance: float
    flipped: tuple[int, ...]  # neurons of the last hidden layer flipped by the repair
    passed: bool


def output_residual(layers: Sequence[pfx.Layer], X: FloatArray, Y: FloatArray) -> tuple[float, FloatArray, FloatArray]:
    """Fit the output layer on ``(X, Y)`` and return ``(max |Y - Ŷ| / max |Y|, W_out, b_out)``."""
    _, H = pfx.forward(layers, X)
    D = np.concatenate([H, np.ones((H.shape[0], 1))], axis=1)
    coef = lstsq(D, Y)
    res = float(np.max(np.abs(D @ coef - Y))) / max(float(np.max(np.abs(Y))), np.finfo(float).tiny)
    return res, coef[:-1].T, coef[-1]


def _flip(layers: Sequence[pfx.Layer], idx: Sequence[int]) -> list[pfx.Layer]:
    W, b = layers[-1]
    s = np.ones(W.shape[0])
    s[list(idx)] = -1.0
    return [*layers[:-1], (W * s[:, None], b * s)]


def check_and_repair(
    layers: Sequence[pfx.Layer],
    X: FloatArray,
    Y: FloatArray,
    tol: float,
    confidence: FloatArray | None = None,
    max_candidates: int = 12,
) -> tuple[list[pfx.Layer], SignCheck]:
    """Check the hidden layers against fresh samples ``(X, Y)``; repair last-layer signs if needed."""
    r0, _, _ = output_residual(layers, X, Y)
    if r0 <= tol:
        return list(layers), SignCheck(r0, r0, tol, (), True)
    m = layers[-1][0].shape[0]
    conf = np.zeros(m) if confidence is None else np.asarray(confidence, dtype=float)
    cands = [int(j) for j in np.argsort(conf, kind="stable")[:max_candidates]]
    best: tuple[float, tuple[int, ...]] = (r0, ())
    for size in (1, 2):
        for combo in itertools.combinations(cands, size):
            r, _, _ = output_residual(_flip(layers, combo), X, Y)
            if r < best[0]:
                best = (r, combo)
            if r <= tol:
                return _flip(layers, combo), SignCheck(r0, r, tol, combo, True)
    return list(layers), SignCheck(r0, best[0], tol, (), False)
