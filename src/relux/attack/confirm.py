"""Global confirmation of recovered rows: every crossing a row predicts on a search line must be a
kink the line search found (attack-notes §3: witnesses of other neurons "must be recognised and set
aside, not merged").

A row measured from a corrupted gradient, or fitted to kinks of a deeper neuron inside one region of
the layer before it, predicts crossings where the oracle shows none. For a row behind a known
prefix, the pre-activation along a line is piecewise linear with breakpoints at prefix kinks, all of
which are among the found kinks, so it is evaluated exactly at the found kinks and the line's ends.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from relux.attack import prefix as pfx
from relux.attack.critical import LineKinks
from relux.oracle.base import FloatArray


def crossing_hits(
    W: FloatArray,
    b: FloatArray,
    lines: Sequence[LineKinks],
    layers: Sequence[pfx.Layer] = (),
    rel_tol: float = 1e-7,
    margin: float = 0.02,
    coverage: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Per row of ``(W, b)`` (a layer behind ``layers``): how many predicted crossings on ``lines`` are
    found kinks (hits) and how many are not (misses). Crossings within ``margin`` of a line's ends
    are not judged (the search may miss kinks there). ``coverage`` (rows x layer inputs): the weights
    each row has seen; a row's weights on the others are not known yet, so its predictions are judged
    only where those coordinates are off."""
    unseen = None if coverage is None else (~np.asarray(coverage, dtype=bool)).astype(float).T
    m = W.shape[0]
    hits = np.zeros(m, dtype=int)
    misses = np.zeros(m, dtype=int)
    for line in lines:
        span = line.t_hi - line.t_lo
        lo, hi = line.t_lo + margin * span, line.t_hi - margin * span
        ts = np.concatenate([[lo], line.t[(line.t > lo) & (line.t < hi)], [hi]])
        X = line.x0[None, :] + ts[:, None] * line.u[None, :]
        _, H = pfx.forward(layers, X)
        Z = H @ W.T + b  # (n_pts, m), exact between consecutive points
        scale = np.linalg.norm(H, axis=1)[:, None] * np.linalg.norm(W, axis=1)[None, :] + np.abs(b)[None, :]
        zero = np.abs(Z) <= rel_tol * np.maximum(scale, np.finfo(float).tiny)
        zero[0] = zero[-1] = False  # the ends are not kinks
        hits += zero.sum(axis=0)
        sgn = np.sign(Z)
        # A sign change between consecutive points with neither being a zero is a missed crossing.
        change = (sgn[1:] * sgn[:-1] < 0) & ~zero[1:] & ~zero[:-1]
        if unseen is not None:
            blind = ((H > 0).astype(float) @ unseen) > 0  # (n_pts, m): an unseen coordinate is on
            change &= ~blind[1:] & ~blind[:-1]
        misses += change.sum(axis=0)
    return hits, misses


def mostly_confirmed(hits: np.ndarray, misses: np.ndarray) -> np.ndarray:
    """Rows whose predicted crossings the lines show, per :func:`crossing_hits`' counts: a row of the
    layer misses a kink only where everything after it is off, so at most a tenth of its hits and two
    more; a row fitted to a deeper neuron misses most of its predictions."""
    return np.asarray(misses <= 0.1 * hits + 2)
