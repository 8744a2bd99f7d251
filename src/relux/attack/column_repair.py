"""Per-coordinate repair of a gradient jump measured next to unseen boundaries (attack-notes §3).

A first-layer row is read from the jump ``G+ - G-`` of the gradients on the two sides of its
hyperplane; with ``k >= 2`` outputs that jump is the rank-one matrix ``c ⊗ w`` (CJM20 §4.2). Each
column ``i`` comes from two forward differences along coordinate ``i``. In a deep network, a
difference whose step crosses the boundary of a deeper neuron, which the attack cannot see yet,
carries that neuron's own jump: a vector of outputs that is in general not parallel to ``c``. So
the column stands out from the rank-one fit, and only that column is wrong. Rather than discarding
the whole measurement (``d + 1`` queries a side), the suspect columns are measured again with
smaller steps, two queries each.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from relux.attack.linalg import svd
from relux.oracle.base import FloatArray, QueryFn

#: A clean column's residual from the rank-one fit is rounding: its size over ``1/h+ + 1/h-`` is about
#: the same for every column. A column this many times the median of that is suspect.
SUSPECT_FACTOR = 64.0


@dataclass(frozen=True)
class RepairInfo:
    """What :func:`repair_columns` did: columns re-measured per pass, queries, rows left suspect."""

    remeasured: tuple[int, ...]
    queries: int
    rows_left: int


def suspect_columns(
    delta: FloatArray, inv_steps: FloatArray, f_scale: FloatArray, max_fraction: float = 0.45
) -> np.ndarray:
    """Columns of each jump ``delta`` (shape ``(n, k, d)``) that do not fit its rank-one part.

    ``inv_steps`` ``(n, d)`` is ``1/h+ + 1/h-`` per column: the rounding a clean column carries is
    about ``eps |f|`` times it, with ``|f|`` the row's ``f_scale`` (``(n,)``, the largest output value
    at its probe points). The rank-one part is fitted, the columns whose residual is more than
    :data:`SUSPECT_FACTOR` times the typical rounding are set aside, and the fit is repeated on the
    rest (twice), so that a few large contaminated columns cannot bend it. A row with more than
    ``max_fraction`` suspect columns is not repaired (its fit is not trustworthy): all-False.
    """
    n, k, d = delta.shape
    out = np.zeros((n, d), dtype=bool)
    if k < 2:
        return out
    eps = float(np.finfo(float).eps)
    for r in range(n):
        D = delta[r]
        u = _robust_direction(D, inv_steps[r])
        if u is None:
            continue
        clean = np.ones(d, dtype=bool)
        bad = np.zeros(d, dtype=bool)
        for _ in range(3):
            res = np.linalg.norm(D - np.outer(u, u @ D), axis=0)  # distance of each column from span(c)
            t = res / inv_steps[r]
            floor = max(float(np.median(t[clean])), eps * float(f_scale[r]))
            bad = t > SUSPECT_FACTOR * floor
            if np.array_equal(~bad, clean) or (~bad).sum() < k:
                break
            clean = ~bad
            U, S, _ = svd(D[:, clean], full_matrices=False)
            if S[0] == 0.0:
                break
            u = U[:, 0]
        if bad.mean() <= max_fraction:
            out[r] = bad
    return out


def _robust_direction(D: FloatArray, inv: FloatArray, candidates: int = 16) -> FloatArray | None:
    """The output direction of ``c`` in a jump ``D`` (``(k, d)``) some of whose columns are contaminated.

    A least-squares fit would be bent by the contaminated columns, so the direction is taken from
    single columns instead: among the largest columns (the most precise, and some are clean when
    fewer than half are not), the one that the most columns are parallel to, by the median of
    the residuals of all columns (a median that a minority of contaminated columns cannot move)."""
    norms = np.linalg.norm(D, axis=0)
    order = np.argsort(norms)[::-1]
    top = order[: max(1, D.shape[1] // 2)]
    picks = np.unique(np.concatenate([top[:candidates // 2],
                                      top[np.linspace(0, top.size - 1, candidates // 2).astype(int)]]))
    best, best_score = None, np.inf
    for i in picks:
        if norms[i] == 0.0:
            continue
        u = D[:, i] / norms[i]
        score = float(np.median(np.linalg.norm(D - np.outer(u, u @ D), axis=0) / inv))
        if score < best_score:
            best, best_score = u, score
    return best


def repair_columns(
    query: QueryFn,
    X: FloatArray,
    F: FloatArray,
    G: FloatArray,
    steps: FloatArray,
    n: int,
    passes: int = 3,
    shrink: float = 8.0,
) -> tuple[FloatArray, FloatArray, RepairInfo]:
    """Re-measure the suspect columns of the jumps ``G[:n] - G[n:]`` with steps ``shrink`` times smaller.

    ``X`` ``(2n, d)`` holds the points ``x+`` then ``x-``, ``F`` ``(2n, k)`` their values, ``G`` ``(2n, k,
    d)`` their forward-difference gradients taken with ``steps`` ``(2n, d)``. A suspect column is
    re-measured on both sides (its contamination may be on either). Returns the updated gradients and
    steps (copies) and a :class:`RepairInfo`; costs two queries per suspect column and pass.
    """
    G = G.copy()
    steps = steps.copy()
    f_scale = np.maximum(np.max(np.abs(F[:n]), axis=1), np.max(np.abs(F[n:]), axis=1))
    done: list[int] = []
    queries = 0
    bad = np.zeros((n, X.shape[1]), dtype=bool)
    for _ in range(passes):
        inv = 1.0 / steps[:n] + 1.0 / steps[n:]
        bad = suspect_columns(G[:n] - G[n:], inv, f_scale)
        rows, cols = np.nonzero(bad)
        if rows.size == 0:
            break
        pts = np.concatenate([rows, rows + n])
        cc = np.concatenate([cols, cols])
        h = steps[pts, cc] / shrink
        P = X[pts].copy()
        P[np.arange(pts.size), cc] += h
        h = P[np.arange(pts.size), cc] - X[pts, cc]  # the step actually taken
        Y = np.asarray(query(P), dtype=np.float64).reshape(pts.size, -1)
        queries += pts.size
        G[pts, :, cc] = (Y - F[pts]) / h[:, None]
        steps[pts, cc] = h
        done.append(int(rows.size))
    else:
        inv = 1.0 / steps[:n] + 1.0 / steps[n:]
        bad = suspect_columns(G[:n] - G[n:], inv, f_scale)
    return G, steps, RepairInfo(tuple(done), queries, int(bad.any(axis=1).sum()))
