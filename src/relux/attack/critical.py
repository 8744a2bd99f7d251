"""Critical points (kinks) of f along lines, found in batches and located exactly.

Follows CJM20 §4.2 (critical points by binary search) with the exact finish of attack-notes §2: once an
interval holds a single kink and its two neighbours are affine, the two affine pieces are intersected
and the intersection is confirmed with one query. All lines advance together, so every round of the
search is one batched oracle call.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

from relux.oracle.base import FloatArray, QueryFn

#: how close (a share of the line's span) the affine neighbours' intersection must come to a predicted
#: kink for it to be taken as that kink (:func:`find_kinks`): a predicted kink sits within about 1e-14 of
#: the span of the kink located by queries; a second kink in the interval, of a tenth of its slope change
#: and farther than about 1.1e-11 of the span, moves the intersection beyond this. An intersection that far off
#: would fail the confirming queries too (it misses the pieces by about the collinearity tolerance)
PREDICTED_TOL = 1e-12


@dataclass(frozen=True)
class LineKinks:
    """Kinks found on the line ``x(t) = x0 + t * u`` for ``t`` in ``[t_lo, t_hi]``."""

    x0: FloatArray
    u: FloatArray
    t_lo: float
    t_hi: float
    t: FloatArray  # (m,) sorted kink positions
    values: FloatArray  # (m, k) f at the kinks
    scale: float  # max |f| on the initial grid (the line's tolerance scale)

    def points(self) -> FloatArray:
        """The kinks as input points, shape ``(m, d)``."""
        return self.x0[None, :] + self.t[:, None] * self.u[None, :]


@dataclass(frozen=True)
class KinkSearchInfo:
    """Diagnostics of :func:`find_kinks`. ``unresolved`` counts intervals given up, by reason."""

    queries: int
    rounds: int
    kinks: int
    unresolved: dict[str, int] = field(default_factory=dict)


@dataclass
class _LineState:
    t: FloatArray
    F: FloatArray
    scale: float
    dead: set[float] = field(default_factory=set)  # intervals (by left t) given up


def _collinear_dev(tl: FloatArray, tm: FloatArray, tr: FloatArray, Fl: FloatArray, Fm: FloatArray,
                   Fr: FloatArray) -> FloatArray:
    """Max over outputs of |F(m) - chord(m)| for triples (vectorised over rows)."""
    w = ((tm - tl) / (tr - tl))[:, None]
    return np.asarray(np.max(np.abs(Fm - (Fl + w * (Fr - Fl))), axis=1))


def _affine_intervals(t: FloatArray, F: FloatArray, tol: float) -> NDArray[np.bool_]:
    """Intervals shown affine: each interval adjacent to a point whose neighbours' chord it lies on."""
    n = t.size
    lin = np.zeros(n - 1, dtype=bool)
    if n >= 3:
        ok = _collinear_dev(t[:-2], t[1:-1], t[2:], F[:-2], F[1:-1], F[2:]) <= tol
        lin[:-1] |= ok
        lin[1:] |= ok
    return lin


def _kink_points(t: FloatArray, F: FloatArray, tol: float) -> NDArray[np.bool_]:
    """Points that are kinks: both adjacent intervals affine, but the point is off its neighbours' chord.

    A point lands exactly on a kink only when it was queried at the intersection of the two affine
    pieces, so this criterion confirms each intersection with two extra interior points.
    """
    n = t.size
    out = np.zeros(n, dtype=bool)
    if n < 3:
        return out
    lin = _affine_intervals(t, F, tol)
    dev = _collinear_dev(t[:-2], t[1:-1], t[2:], F[:-2], F[1:-1], F[2:])
    out[1:-1] = lin[:-1] & lin[1:] & (dev > tol)
    return out


def find_kinks(
    query: QueryFn,
    x0: FloatArray,
    u: FloatArray,
    t_lo: float,
    t_hi: float,
    n_grid: int,
    rel_tol: float,
    max_rounds: int = 80,
    predicted: list[FloatArray] | None = None,
) -> tuple[list[LineKinks], KinkSearchInfo]:
    """Find the kinks of ``f`` on each line ``x0[i] + t u[i]``, ``t in [t_lo, t_hi]``.

    ``rel_tol`` is the collinearity tolerance relative to the line's scale (``max |f|`` on its
    grid). Kinks in the two outermost grid intervals may be missed (they have no affine neighbour
    on one side); callers use lines whose ends lie beyond the region of interest.

    ``predicted``: per line, the sorted positions of kinks already known (the known prefix's, from
    :func:`relux.attack.prefix.line_crossings`). An interval whose affine neighbours meet within
    :data:`PREDICTED_TOL` of the line's span of the only predicted kink in it is that kink: it is
    located there without the three confirming queries (another kink in the interval would move the
    intersection off it).

    Returns the kinks of every line and a diagnostics record.
    """
    x0 = np.atleast_2d(np.asarray(x0, dtype=np.float64))
    u = np.atleast_2d(np.asarray(u, dtype=np.float64))
    n_lines, d = x0.shape
    grid = np.linspace(t_lo, t_hi, max(int(n_grid), 4) + 1)
    X = (x0[:, None, :] + grid[None, :, None] * u[:, None, :]).reshape(-1, d)
    Y = query(X)
    queries = X.shape[0]
    k = Y.shape[1]
    Y = Y.reshape(n_lines, grid.size, k)
    states: list[_LineState] = []
    for i in range(n_lines):
        scale = float(np.max(np.abs(Y[i]))) if Y[i].size else 0.0
        states.append(_LineState(grid.copy(), Y[i].copy(), max(scale, np.finfo(float).tiny)))
    unresolved: dict[str, int] = {}
    min_len = (t_hi - t_lo) * 1e-14
    p_tol = PREDICTED_TOL * (t_hi - t_lo)
    rounds = 0
    while rounds < max_rounds:
        rounds += 1
        # Plan one query per open (not yet affine) interval on every line: the intersection of the
        # affine neighbours when both are known, else the midpoint.
        plan_line: list[int] = []
        plan_t: list[float] = []
        # predicted kinks met where the affine neighbours intersect: (line, t, f there), no query
        known_line: list[int] = []
        known_t: list[float] = []
        known_f: list[FloatArray] = []
        for li, st in enumerate(states):
            t, F = st.t, st.F
            n = t.size
            tol = rel_tol * st.scale
            lin = _affine_intervals(t, F, tol)
            slopes = (F[1:] - F[:-1]) / (t[1:] - t[:-1])[:, None]
            for i in map(int, np.flatnonzero(~lin)):
                a, b = float(t[i]), float(t[i + 1])
                if a in st.dead:
                    continue
                L = b - a
                if L <= min_len:
                    st.dead.add(a)
                    unresolved["too_short"] = unresolved.get("too_short", 0) + 1
                    continue
                tqs = [0.5 * (a + b)]
                if 0 < i < n - 2 and lin[i - 1] and lin[i + 1]:
                    sl, sr = slopes[i - 1], slopes[i + 1]
                    dsl = sl - sr
                    e = F[i] - F[i + 1] + sr * L
                    den = float(dsl @ dsl)
                    if den > 0:
                        tau = -float(e @ dsl) / den
                        if 0.0 < tau < L and predicted is not None:
                            pk = predicted[li]
                            inside = pk[np.searchsorted(pk, a, side="right"):np.searchsorted(pk, b, side="left")]
                            if inside.size == 1 and abs(float(inside[0]) - (a + tau)) <= p_tol:
                                known_line.append(li)
                                known_t.append(a + tau)
                                known_f.append(F[i] + sl * tau)
                                continue
                        if 0.0 < tau < L:
                            # The intersection lies on both affine pieces by construction, so it is
                            # confirmed by two close points that must each sit on its own piece.
                            jump = float(np.max(np.abs(dsl)))
                            delta = max(1e-7 * L, 1e3 * tol / jump)
                            delta = min(delta, 0.25 * min(tau, L - tau))
                            tqs = [a + tau - delta, a + tau, a + tau + delta]
                for tq in tqs:
                    plan_line.append(li)
                    plan_t.append(tq)
        if not plan_line and not known_line:
            break
        if len(plan_line) > 8 * grid.size * n_lines:
            # Everything looks bent: the oracle is noisier than rel_tol assumes. Stop rather than
            # subdivide without end.
            unresolved["too_many_open_intervals"] = unresolved.get("too_many_open_intervals", 0) + len(plan_line)
            break
        # the planned points are queried; the predicted kinks join them with their values on the left piece
        p_idx, p_t = np.asarray(plan_line, dtype=int), np.asarray(plan_t, dtype=float)
        Yp = query(x0[p_idx] + p_t[:, None] * u[p_idx]).reshape(p_idx.size, k) if p_idx.size else np.zeros((0, k))
        queries += p_idx.size
        lines_idx = np.concatenate([p_idx, np.asarray(known_line, dtype=int)])
        tq_arr = np.concatenate([p_t, np.asarray(known_t, dtype=float)])
        Yq = np.concatenate([Yp, np.asarray(known_f, dtype=float).reshape(len(known_line), k)])
        for li in np.unique(lines_idx):
            st = states[int(li)]
            sel = lines_idx == li
            t_new = np.concatenate([st.t, tq_arr[sel]])
            F_new = np.concatenate([st.F, Yq[sel]])
            order = np.argsort(t_new, kind="stable")
            keep = np.concatenate([[True], np.diff(t_new[order]) > 0])
            order = order[keep]
            st.t, st.F = t_new[order], F_new[order]
    else:
        unresolved["max_rounds"] = unresolved.get("max_rounds", 0) + 1
    out: list[LineKinks] = []
    total = 0
    for li, st in enumerate(states):
        sel = _kink_points(st.t, st.F, rel_tol * st.scale)
        out.append(LineKinks(x0[li].copy(), u[li].copy(), float(t_lo), float(t_hi), st.t[sel].copy(),
                             st.F[sel].copy(), st.scale))
        total += int(sel.sum())
    return out, KinkSearchInfo(queries=queries, rounds=rounds, kinks=total, unresolved=unresolved)
