"""The vertex of a polytope that maximises a linear objective, by a dense primal simplex started from a
point inside it (attack-notes §3: the chords of :mod:`relux.attack.active_lines` run between such
vertices).

The regions the chords run in are ``{x : A x + c ≥ margin, |x_i| ≤ box}`` with ``A`` dense: behind
the CIFAR-scale victims' first four layers, 1,024 rows and 512 box sides in 256 frame dimensions. A
general sparse solver (HiGHS, through :func:`scipy.optimize.linprog`) took about 1,000 dual simplex
iterations and 0.65 s per vertex there, 55% of a layer-5 pattern region's time (session 37). Here:

1. *Crash* (Bertsimas and Tsitsiklis, *Introduction to Linear Optimization*, §3.5, on finding an
   initial basic feasible solution): from the interior point, move along the objective projected off
   the constraints met so far until the next constraint is met, and add it, until ``d`` are met. The
   result is a vertex; at 256 dimensions it had 92-96% of the optimal gain over the start.
2. *Primal simplex* (same book, §3.2-3.3, revised simplex with the basis inverse kept dense and
   updated by the Sherman-Morrison formula, refactorised every ``REFACTOR`` pivots): the multipliers
   of the tight constraints say which to leave (the most negative; Bland's lowest index after a run
   of degenerate pivots, which cannot cycle), a ratio test which to meet.
3. *Certificate*: the final vertex is accepted only when, with the basis factorised afresh, every
   constraint holds and every multiplier is positive, to tolerances relative to the data: then it is
   the only optimum, the one any exact solver returns. Where the optimum may be a face (a zero
   multiplier, or an objective spanned by fewer than ``d`` constraints in the crash), and on any
   other failure, it returns None with the reason, and the caller solves the linear program with
   HiGHS instead, whose vertex of the face the chords were measured with.

Every quantity is computed on rows scaled to unit norm, so the tolerances are relative.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from relux.oracle.base import FloatArray

#: Pivots between fresh factorisations of the basis (its inverse drifts under rank-one updates).
REFACTOR = 64
#: Degenerate pivots in a row (no step) after which the leaving constraint is chosen by Bland's rule.
DEGENERATE_RUN = 16
#: Pivots allowed, per dimension, before giving up (HiGHS then solves it).
PIVOTS_PER_DIM = 20
#: Relative tolerances: a multiplier below ``-MU_TOL |objective|`` is negative, and the vertex is
#: certified only when every multiplier is above ``MU_TOL |objective|``; a slack (of a unit row)
#: below ``-FEAS_TOL`` times the box's diagonal violates its constraint. ``MU_TOL`` is above HiGHS's
#: dual feasibility tolerance (1e-7): with a smallest multiplier between the two, HiGHS may stop at a
#: neighbouring vertex, optimal to its tolerance and up to half the box away (the session 37 review,
#: objectives tilted 1e-5 to 1e-8 off a facet's normal), so such cases are left to it. Rounding in a
#: 256-wide basis solve is about 1e-13 relative (the crash's points were within 6e-12 of feasible).
MU_TOL = 1e-6
FEAS_TOL = 1e-9
#: The reason given where the optimum may not be a single vertex (a multiplier is zero to
#: ``MU_TOL``, or the objective is spanned by fewer than ``d`` constraints, as where a neuron of the
#: region is lowest): which vertex of the face a solver returns is its own choice. With the crash's
#: vertex there, or one tilted outward, a small test network lost a row of its all-on layer that
#: HiGHS's vertices gave.
FACE = "the optimum may be a face, not a single vertex"


@dataclass(frozen=True)
class VertexInfo:
    """How :func:`dense_vertex` went: pivots after the crash, and ``reason`` (empty when the vertex
    is certified optimal)."""

    crash_steps: int
    pivots: int
    reason: str = ""


def _rows(A: FloatArray, c: FloatArray, margin: FloatArray, box: float) -> tuple[FloatArray, FloatArray]:
    """The constraints as ``N x + h ≥ 0`` with unit rows: the region's, then ``x_i ≤ box`` and
    ``x_i ≥ -box``. Zero rows are kept, scaled by one (they never bind: their slack is ``h``)."""
    d = A.shape[1]
    nrm = np.linalg.norm(A, axis=1)
    nrm = np.where(nrm > 0, nrm, 1.0)
    N = np.concatenate([A / nrm[:, None], -np.eye(d), np.eye(d)])
    h = np.concatenate([(c - margin) / nrm, np.full(2 * d, float(box))])
    return N, h


def _ratio(s: FloatArray, r: FloatArray, free: np.ndarray, step_norm: float) -> tuple[int, float]:
    """The constraint met first moving along a direction whose rates of change are ``r`` from slacks
    ``s`` (among ``free`` rows, those that decrease), and how far: (-1, inf) when none decreases."""
    dec = free & (r < -1e-13 * step_norm)
    if not dec.any():
        return -1, float("inf")
    idx = np.flatnonzero(dec)
    t = np.maximum(s[idx], 0.0) / -r[idx]
    k = int(np.argmin(t))
    return int(idx[k]), float(t[k])


def _inverse(N: FloatArray, B: FloatArray) -> FloatArray | None:
    """The inverse of the basis ``N[B]``, or None when it is singular."""
    try:
        out: FloatArray = np.linalg.inv(N[B])
    except np.linalg.LinAlgError:
        return None
    return out


def dense_vertex(
    A: FloatArray, c: FloatArray, margin: FloatArray, box: float, objective: FloatArray, start: FloatArray,
) -> tuple[FloatArray | None, VertexInfo]:
    """The point of ``{x : A x + c ≥ margin, |x_i| ≤ box}`` that maximises ``objective · x``, reached
    from ``start`` (inside that set) as the module docstring says, with how it went; None, with the
    reason, when it cannot certify the vertex (the caller then solves the linear program otherwise),
    as where the optimum may be a face (:data:`FACE`)."""
    d = A.shape[1]
    N, h = _rows(A, c, margin, box)
    g = np.asarray(objective, dtype=float)
    gn = float(np.linalg.norm(g))
    x = np.asarray(start, dtype=float).copy()
    feas_tol = FEAS_TOL * 2.0 * float(box) * np.sqrt(d)
    s = N @ x + h
    if gn == 0.0 or not np.all(np.isfinite(s)) or s.min() < -feas_tol:
        return None, VertexInfo(0, 0, "the start is not inside the region, or the objective is zero")
    free = np.ones(N.shape[0], dtype=bool)
    basis: list[int] = []
    Q = np.zeros((d, 0))
    # 1. crash: along the objective, less its part on the constraints met so far
    while len(basis) < d:
        v = g - Q @ (Q.T @ g)
        if float(np.linalg.norm(v)) <= 1e-12 * gn:
            return None, VertexInfo(len(basis), 0, FACE)
        r = N @ v
        i, t = _ratio(s, r, free, float(np.linalg.norm(v)))
        if i < 0:
            return None, VertexInfo(len(basis), 0, "the crash found no constraint ahead")
        x = x + t * v
        s = s + t * r
        free[i] = False
        basis.append(i)
        a = N[i] - Q @ (Q.T @ N[i])
        an = float(np.linalg.norm(a))
        if an <= 1e-10:
            return None, VertexInfo(len(basis), 0, "the crash met a constraint dependent on those before")
        Q = np.column_stack([Q, a / an])
    crash = len(basis)
    # 2. primal simplex from that vertex
    B = np.array(basis)
    Binv = _inverse(N, B)
    if Binv is None:
        return None, VertexInfo(crash, 0, "the crash's basis is singular")
    pivots = degenerate = 0
    since = 0  # pivots since the last fresh factorisation
    while True:
        mu = -(Binv.T @ g)
        neg = mu < -MU_TOL * gn
        if since and (since >= REFACTOR or not neg.any()):
            # a fresh factorisation: every REFACTOR pivots (the updated inverse drifts), and to confirm
            # an optimum
            Binv = _inverse(N, B)
            if Binv is None:
                return None, VertexInfo(crash, pivots, "the basis became singular")
            s = N @ x + h
            since = 0
            continue
        if not neg.any():
            break
        if pivots >= PIVOTS_PER_DIM * d:
            return None, VertexInfo(crash, pivots, f"no optimum after {pivots} pivots")
        j = int(np.flatnonzero(neg)[np.argmin(B[neg])]) if degenerate >= DEGENERATE_RUN else int(np.argmin(mu))
        v = Binv[:, j]
        r = N @ v
        i, t = _ratio(s, r, free, float(np.linalg.norm(v)))
        if i < 0:
            return None, VertexInfo(crash, pivots, "unbounded along an edge (the box should prevent it)")
        degenerate = degenerate + 1 if t <= 0.0 else 0
        x = x + t * v
        s = s + t * r
        piv = float(r[i])  # N_i · v, nonzero (negative) by the ratio test
        Binv = Binv - np.outer(v, (N[i] - N[B[j]]) @ Binv) / piv
        free[B[j]], free[i] = True, False
        B[j] = i
        pivots += 1
        since += 1
    # 3. certificate: the vertex solves its basis, and every constraint holds
    try:
        x = np.linalg.solve(N[B], -h[B])
    except np.linalg.LinAlgError:
        return None, VertexInfo(crash, pivots, "the final basis is singular")
    s = N @ x + h
    if not np.all(np.isfinite(x)) or s.min() < -feas_tol:
        return None, VertexInfo(crash, pivots, f"the final vertex violates a constraint by {-s.min():.2g}")
    if np.any(-(Binv.T @ g) <= MU_TOL * gn):
        return None, VertexInfo(crash, pivots, FACE)
    return x, VertexInfo(crash, pivots)
