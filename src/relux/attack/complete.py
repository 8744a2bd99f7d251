"""Completing a row whose witnesses never saw some layer-input coordinates active (attack-notes §3,
the rank-deficiency of LSELBP26).

A neuron of layer ``i`` is seen only through the coordinates of layer ``i-1`` that are active at its
witnesses; its weight on a coordinate ``m`` that is never active there is unknown. Where ``m`` is
off, the estimated boundary is exact. Walking along it until ``m`` switches on and crossing it
again, the true boundary sits where ``ŵ·h + b + w_m h_m = 0``: one exact kink there gives ``w_m``.
Each candidate is confirmed by a second crossing further along the walk, where the completed row must
predict a kink that the oracle shows. Every step is exact arithmetic on kinks, no gradients.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from relux.attack import prefix as pfx
from relux.attack.critical import LineKinks, find_kinks
from relux.attack.polish import OFFSETS, kink_in_bracket, root_on_line
from relux.oracle.base import FloatArray, QueryFn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Completion:
    """A row after completion and what happened to each missing coordinate."""

    w: FloatArray
    b: float
    coverage: np.ndarray
    filled: tuple[int, ...]
    reasons: dict[int, str] = field(default_factory=dict)  # coordinate -> why it stayed unknown
    queries: int = 0


def _prefix_kink(layers: Sequence[pfx.Layer], x: FloatArray, rel: float = 1e-7) -> bool:
    """Is ``x`` on the boundary of a known neuron?"""
    Zs, _ = pfx.forward(layers, x[None, :])
    _, jacs = pfx.jacobian(layers, x)
    for Z, J in zip(Zs, jacs, strict=True):
        scale = np.linalg.norm(J, axis=1) * (float(np.linalg.norm(x)) + 1.0)
        if np.any(np.abs(Z[0]) <= rel * np.maximum(scale, np.finfo(float).tiny)):
            return True
    return False


def _hold_basis(jac: FloatArray, rows: Sequence[int], extra: FloatArray | None = None) -> FloatArray:
    """Orthonormal basis of the gradients of the pre-activations ``rows`` (and the gradient or
    gradients ``extra``)."""
    parts = [jac[list(rows)]] if len(rows) else []
    if extra is not None:
        parts.append(np.atleast_2d(extra))
    if not parts:
        return np.zeros((jac.shape[1], 0))
    B = np.concatenate(parts)
    Q, R = np.linalg.qr(B.T)
    keep = np.abs(np.diag(R)) > 1e-12 * (float(np.max(np.abs(R))) + 1e-300)
    out: FloatArray = Q[:, keep]
    return out


def _walk(
    layers: Sequence[pfx.Layer], x: FloatArray, w: FloatArray, m: int, hold: Sequence[int], scale: float
) -> tuple[FloatArray, FloatArray] | None:
    """From ``x``, walk (piece by piece of the prefix) in the direction that raises coordinate ``m``
    while holding the row's estimated pre-activation and the coordinates ``hold`` fixed, to just past
    where ``m`` switches on. Returns the point there and the final direction.

    Each step ends at the nearest known boundary ahead, where the prefix's Jacobian changes. Where
    the new piece's direction turns straight back across a boundary the walk has crossed before, the
    walk slides along that boundary (holds its pre-activation too) rather than zigzag across it."""
    p = x.copy()
    crossed: set[tuple[int, int]] = set()
    slide: list[tuple[int, int]] = []
    for _ in range(64):
        M, jacs = pfx.jacobian(layers, p)
        n = w @ M
        extra = np.vstack([n, *(jacs[li][k] for li, k in slide)])
        Zs, _ = pfx.forward(layers, p[None, :])
        g = jacs[-1][m]
        # Hold the unknown coordinates closest to switching on, as many as the control space allows.
        held: list[int] = []
        for k in sorted(hold, key=lambda k: abs(float(Zs[-1][0, k]))):
            Q = _hold_basis(jacs[-1], [*held, k], extra)
            if float(np.linalg.norm(g - Q @ (Q.T @ g))) >= 0.2 * float(np.linalg.norm(g)):
                held.append(k)
        Q = _hold_basis(jacs[-1], held, extra)
        d = g - Q @ (Q.T @ g)
        nd = float(np.linalg.norm(d))
        if nd <= 1e-9 * float(np.linalg.norm(g)):
            return None
        d = d / nd
        zm = float(Zs[-1][0, m])
        rate = float(g @ d)  # > 0
        to_switch = -zm / rate if zm < 0 else 0.0
        # distance along d to the nearest known boundary other than m itself
        lim, hit = np.inf, (-1, -1)
        for li, (Z, J) in enumerate(zip(Zs, jacs, strict=True)):
            r = J @ d
            with np.errstate(divide="ignore", invalid="ignore"):
                tt = np.where(-Z[0] * np.sign(r) > 0, -Z[0] / r, np.inf)
            if li == len(jacs) - 1:
                tt[m] = np.inf
            for lk, k in slide:
                if lk == li:
                    tt[k] = np.inf  # held: the walk runs along it
            i = int(np.argmin(tt))
            if tt[i] < lim:
                lim, hit = float(tt[i]), (li, i)
        if to_switch <= lim:
            # just past the switch, but not past the next boundary (the step is linear)
            return p + (to_switch + min(1e-3 * scale, 0.5 * (lim - to_switch))) * d, d
        if not np.isfinite(lim) or lim > 4.0 * scale:
            return None
        if hit in crossed and lim <= 1e-6 * scale:
            slide.append(hit)
            continue
        crossed.add(hit)
        p = p + (lim + 1e-9 * scale) * d
    return None


def _crossing(
    query: QueryFn, x: FloatArray, n: FloatArray, half: float, n_grid: int, rel_tol: float
) -> tuple[LineKinks, int]:
    lines, info = find_kinks(query, x[None, :], n[None, :], -half, half, n_grid, rel_tol)
    return lines[0], info.queries


def _bracket_kink(query: QueryFn, p: FloatArray, n: FloatArray, t0: float, delta: float) -> float | None:
    """The kink of ``f`` on ``p + t n`` within ``t0 ± delta`` (6 queries; see :func:`kink_in_bracket`)."""
    T = t0 + delta * np.asarray(OFFSETS)
    return kink_in_bracket(T, query(p[None, :] + T[:, None] * n[None, :]))


def _probe(
    query: QueryFn, layers: Sequence[pfx.Layer], w: FloatArray, b: float, m: int, c: float, p: FloatArray,
    scale: float,
) -> tuple[float, FloatArray | None]:
    """The kink the row with ``w_m = c`` predicts on the normal through ``p``, looked for with 6 queries:
    its miss relative to the bracket (inf when no single kink is in it) and the layer input there."""
    wc = w.copy()
    wc[m] = c
    n2 = pfx.unit_normal(layers, wc, p)
    if n2 is None:
        return np.inf, None
    t2 = root_on_line(layers, wc, b, p, n2)
    if t2 is None:
        return np.inf, None
    dist = pfx.boundary_distance(layers, p + t2 * n2)
    delta = min(0.25 * dist, 1e-3 * scale)
    tk = _bracket_kink(query, p, n2, t2, delta)
    if tk is None:
        return np.inf, None
    _, H = pfx.forward(layers, (p + tk * n2)[None, :])
    return abs(tk - t2) / delta, H[0]


def complete_row(
    query: QueryFn,
    layers: Sequence[pfx.Layer],
    w: FloatArray,
    b: float,
    coverage: np.ndarray,
    anchors: FloatArray,
    d0: int,
    scale: float,
    n_grid: int,
    rel_tol: float,
    max_anchors: int = 3,
) -> Completion:
    """Fill the weights of ``(w, b)`` on the coordinates outside ``coverage`` (see the module text).

    ``anchors`` are points on the neuron's boundary (its witnesses); the first ``max_anchors`` are
    tried in turn. ``scale`` is the input scale
    times ``sqrt(d0)``. For each missing coordinate ``m``: walk along the boundary (holding the other
    unknown coordinates fixed) to just past where ``m`` switches on, search a short segment across
    the boundary for the kink nearest the estimated crossing, read ``w_m`` from it, and confirm with
    a second probe further on, where the completed row must predict a kink to 1e-6 of the bracket.
    Coordinates never reached stay zero and are reported in ``reasons``.
    """
    w = np.array(w, dtype=float)
    cov = np.array(coverage, dtype=bool)
    filled: list[int] = []
    reasons: dict[int, str] = {}
    queries = 0
    for m in (int(i) for i in np.flatnonzero(~cov)):
        done = False
        reason = "no anchor from which the coordinate could be switched on along the boundary"
        others = ~cov  # the unknown coordinates other than m
        others[m] = False
        hold = [int(k) for k in np.flatnonzero(others)]
        for x in anchors[:max_anchors]:
            if pfx.unit_normal(layers, w, x) is None:
                continue
            walked = _walk(layers, x, w, m, hold, scale)
            if walked is None:
                continue
            p1, d = walked
            cands: list[float] = []
            M1, jacs1 = pfx.jacobian(layers, p1)
            n0 = w @ M1
            held1: list[int] = []
            for k in [m, *hold]:
                Q1 = _hold_basis(jacs1[-1], [*held1, k])
                if float(np.linalg.norm(n0 - Q1 @ (Q1.T @ n0))) >= 0.2 * float(np.linalg.norm(n0)):
                    held1.append(k)
            Q1 = _hold_basis(jacs1[-1], held1)
            n1 = n0 - Q1 @ (Q1.T @ n0)  # cross the boundary without moving m (and what else can be held)
            if not np.any(n1):
                continue
            n1 = n1 / float(np.linalg.norm(n1))
            t0 = root_on_line(layers, w, b, p1, n1)
            if t0 is None:
                continue
            line, qn = _crossing(query, p1 + t0 * n1, n1, 0.05 * scale, max(16, n_grid // 8), rel_tol)
            queries += qn
            ts = line.t
            for tk in ts[np.argsort(np.abs(ts))][:3]:
                xk = p1 + (t0 + tk) * n1
                if _prefix_kink(layers, xk):
                    continue
                _, H = pfx.forward(layers, xk[None, :])
                h = H[0]
                if h[m] <= 0 or np.any(h[others] > 0):
                    continue
                cands.append(float(-(w @ h + b) / h[m]))

            if not cands:
                reason = "no kink of an unknown neuron where the coordinate is on"
                continue
            # Confirm: further along, the completed row must predict a kink the oracle shows.
            # points past the switch where, of the unknown coordinates, only m is on
            probes = []
            for eps in (3e-3, 1e-2, 3e-2, 1e-1):
                cand_p = p1 + eps * scale * d
                _, Hc = pfx.forward(layers, cand_p[None, :])
                if Hc[0][m] > 0 and not np.any(Hc[0][others] > 0):
                    probes.append(cand_p)
            if not probes:
                reason = "no second point where only the coordinate is on"
                continue
            best, best_err = None, np.inf
            for c in cands:
                miss, h_k = _probe(query, layers, w, b, m, c, probes[-1], scale)
                queries += 6
                if h_k is None or h_k[m] <= 0:
                    continue  # the kink is where the coordinate is off: it cannot tell one weight from another
                if miss < best_err:
                    best, best_err = c, miss
                if miss <= 1e-6 or len(probes) < 2 or np.any(h_k[others] > 0):
                    continue
                # The first estimate comes from just past the switch, where h_m is small and divides
                # the row's own error; the probe's kink, further on, gives a sharper one. It must
                # then predict the kink at another probe point (an independent check).
                c2 = float(-(w @ h_k + b - w[m] * h_k[m]) / h_k[m])
                if abs(c2 - c) > 1e-2 * (abs(c) + 1e-12 * float(np.linalg.norm(w))):
                    continue  # a different neuron's kink
                miss2, h2 = _probe(query, layers, w, b, m, c2, probes[-2], scale)
                queries += 6
                if h2 is None or h2[m] <= 0:
                    continue
                if miss2 <= 1e-4:
                    # two kinks of the oracle, at independent points, agree on c2 (another neuron's kink
                    # would miss by a fraction of the bracket): the polish refines it on boundary points
                    best, best_err = c2, min(miss2, 1e-6)
                    break
                if miss2 < best_err:
                    best, best_err = c2, miss2
            if best is not None and best_err <= 1e-6:
                w[m] = best
                cov[m] = True
                filled.append(m)
                done = True
                break
            reason = f"no candidate weight predicted the confirming kink (best relative miss {best_err:.1e})"
        if not done:
            reasons[m] = reason
    log.debug("row completion: filled %s, left %s", filled, reasons)
    return Completion(w=w, b=float(b), coverage=cov, filled=tuple(filled), reasons=reasons, queries=queries)
