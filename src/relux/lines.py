"""Points on random lines across a network's first-layer hyperplanes, for checking a model against
``f`` (:mod:`relux.verify`, and the attack's self-check, :func:`relux.attack.checks.self_check`): along a
line ``f - f̂`` is piecewise linear, so it is evaluated at every first-layer kink and on a grid between."""

from __future__ import annotations

import numpy as np

from relux.model import FloatArray


def kink_parameters(W: FloatArray, b: FloatArray, x0: FloatArray, u: FloatArray) -> FloatArray:
    """The ``t`` at which each pre-activation of the layer ``(W, b)`` vanishes on ``x0 + t u``.

    Rows parallel to the line (``W u = 0``) never cross it and are left out.
    """
    num = W @ x0 + b
    den = W @ u
    ok = den != 0.0
    t: FloatArray = -num[ok] / den[ok]
    return t


def line_parameters(
    reference_kinks: FloatArray, other_kinks: FloatArray, points_per_line: int, coverage: float
) -> FloatArray:
    """Sorted parameters ``t`` at which to evaluate a line (see the module documentation).

    The segment spans the central ``coverage`` quantile range of ``reference_kinks`` plus a 5% margin
    each side (``[-1, 1]`` when there are none); it holds a uniform grid of ``points_per_line`` points and
    every kink of either network inside it.
    """
    if reference_kinks.size:
        lo = float(np.quantile(reference_kinks, (1.0 - coverage) / 2.0))
        hi = float(np.quantile(reference_kinks, (1.0 + coverage) / 2.0))
    else:
        lo, hi = -1.0, 1.0
    width = hi - lo
    if not width > 0.0:
        width = max(1.0, abs(lo))
        lo, hi = lo - width / 2.0, hi + width / 2.0
    lo, hi = lo - 0.05 * width, hi + 0.05 * width
    kinks = np.concatenate([reference_kinks, other_kinks])
    kinks = kinks[(kinks >= lo) & (kinks <= hi)]
    t: FloatArray = np.unique(np.concatenate([np.linspace(lo, hi, points_per_line), kinks]))
    return t
