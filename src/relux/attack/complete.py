"""Completing a row whose witnesses never saw some layer-input coordinates active (attack-notes §3,
the rank-deficiency of LSELBP26).

A neuron of layer ``i`` is seen only through the coordinates of layer ``i-1`` that are active at its
witnesses; its weight on a coordinate ``m`` that is never active there is unknown. Where ``m`` is
off, the estimated boundary is exact. Walking along it until ``m`` switches on and crossing it
again, the true boundary sits where ``ŵ·h + b + w_m h_m = 0``: one exact kink there gives ``w_m``.
Each candidate is confirmed by a second crossing further along the walk, where the completed row must
predict a kink that the oracle shows. Every step is exact arithmetic on kinks, no gradients.

The walk goes on past the switch until ``h_m`` is a tenth of the layer input's typical on value
(the row's own error is divided by ``h_m``), then a hundredth, then just past the switch, when a
level gives no confirmed weight (a crossing further from the switch more often meets another
unknown coordinate switching on). Behind the CIFAR-scale victims' first two layers (512 known
neurons) a walk takes 33 to 225 steps, and one that stops just past the switch stands on the known
boundaries it slid along, where the row's kink cannot be told from theirs. Measurements:
BENCHMARKS.md, session 30.
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


#: How far (relative to ``|x| + 1``) an extracted layer's boundary may lie from the true one, across
#: it: the CIFAR-scale victims' extracted layers are within 2.3e-9 of their true rows (session 31).
PREFIX_REL = 3e-9


def _prefix_kink(layers: Sequence[pfx.Layer], x: FloatArray, n: FloatArray, rel: float = 1e-7) -> bool:
    """Could a kink at ``x`` of the line along ``n`` be a known neuron's? Yes when one crosses the
    line within ``rel`` (of ``|x| + 1``) of ``x``, measured along the line, or when ``x`` is within
    the known layers' own precision of its boundary across it (:data:`PREFIX_REL`: where the line
    meets that boundary at a shallow angle, an error that small across moves the crossing far along
    it). The test is along the line, not across, because the walk ends on the known boundaries it
    slid along and the crossing line can run nearly inside them: behind the CIFAR trained victim's
    layers 1-2 the row's own kink lay 3e-3 along the line from them but 2.4e-6 across (2.5e-8 of
    ``|x| + 1``), and the test across, at ``rel``, set aside the weight it gave (right to 1e-5)."""
    Zs, _ = pfx.forward(layers, x[None, :])
    _, jacs = pfx.jacobian(layers, x)
    size = float(np.linalg.norm(x)) + 1.0
    for Z, J in zip(Zs, jacs, strict=True):
        z = np.abs(Z[0])
        if np.any(z <= rel * size * np.abs(J @ n)) or np.any(z <= PREFIX_REL * size * np.linalg.norm(J, axis=1)):
            return True
    return False


def _basis(B: FloatArray | None, d: int) -> FloatArray:
    """Orthonormal basis (``d x r``) of the span of the rows of ``B`` (none when ``B`` is None)."""
    if B is None:
        return np.zeros((d, 0))
    Q, R = np.linalg.qr(np.atleast_2d(B).T)
    keep = np.abs(np.diag(R)) > 1e-12 * (float(np.max(np.abs(R))) + 1e-300)
    out: FloatArray = Q[:, keep]
    return out


def _greedy_hold(
    jac: FloatArray, order: Sequence[int], g: FloatArray, extra: FloatArray | None = None, keep: float = 0.2
) -> FloatArray:
    """Hold the pre-activations ``order``, in turn, while the part of ``g`` outside the span of their
    gradients (and of ``extra``) keeps at least ``keep`` of its length. Returns an orthonormal basis of
    that span (one Gram-Schmidt step per coordinate, twice for stability, rather than a factorisation
    per coordinate: behind 512 known neurons a walk holds hundreds)."""
    Q = _basis(extra, jac.shape[1])
    r = g - Q @ (Q.T @ g)
    floor = keep * float(np.linalg.norm(g))
    for k in order:
        v = jac[k] - Q @ (Q.T @ jac[k])
        v = v - Q @ (Q.T @ v)
        nv = float(np.linalg.norm(v))
        if nv <= 1e-12 * float(np.linalg.norm(jac[k])):
            continue  # in the span already: held for free
        u = v / nv
        r2 = r - u * float(u @ r)
        if float(np.linalg.norm(r2)) >= floor:
            Q, r = np.column_stack([Q, u]), r2
    return Q


def _walk(
    layers: Sequence[pfx.Layer], x: FloatArray, w: FloatArray, m: int, hold: Sequence[int], scale: float,
    target: float = 0.0, max_steps: int | None = None,
    red: tuple[FloatArray, FloatArray] | None = None,
) -> tuple[FloatArray, FloatArray] | None:
    """From ``x``, walk (piece by piece of the prefix) in the direction that raises coordinate ``m``
    while holding the row's estimated pre-activation and the coordinates ``hold`` fixed, to just past
    where ``m`` switches on. Returns the point there and the final direction.

    Each step ends at the nearest known boundary ahead, where the prefix's Jacobian changes. Where
    the new piece's direction turns straight back across a boundary the walk has crossed before, the
    walk slides along that boundary (holds its pre-activation too) rather than zigzag across it.

    With ``target > 0`` the walk goes on past the switch until ``m``'s pre-activation reaches
    ``target`` (a weight read where ``h_m`` is larger divides the row's error by more), or stops
    early, still with ``m`` on, where another coordinate of ``hold`` would switch on. A walk takes
    at most ``max_steps`` steps: by default one per known neuron, and 64 more. ``red``: the first
    layer's row space (:func:`relux.attack.prefix.input_space`), where the walk's linear algebra
    runs (ten times cheaper at CIFAR scale)."""
    V, first = (None, None) if red is None else red
    p = x.copy()
    crossed: set[tuple[int, int]] = set()
    slide: list[tuple[int, int]] = []
    held_set = set(hold)
    steps = 64 + sum(W.shape[0] for W, _ in layers) if max_steps is None else max_steps
    for _ in range(steps):
        M, jacs = pfx.jacobian(layers, p, first)
        n = w @ M
        extra = np.vstack([n, *(jacs[li][k] for li, k in slide)])
        Zs, _ = pfx.forward(layers, p[None, :])
        g = jacs[-1][m]
        # Hold the unknown coordinates closest to switching on, as many as the control space allows.
        Q = _greedy_hold(jacs[-1], sorted(hold, key=lambda k: abs(float(Zs[-1][0, k]))), g, extra)
        d = g - Q @ (Q.T @ g)
        nd = float(np.linalg.norm(d))
        if nd <= 1e-9 * float(np.linalg.norm(g)):
            return None
        d = d / nd
        step_dir = d if V is None else d @ V  # the input-space direction (unit: V's rows are orthonormal)
        zm = float(Zs[-1][0, m])
        rate = float(g @ d)  # > 0
        to_switch = (target - zm) / rate if zm < target else 0.0
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
            if target > 0.0:
                return p + to_switch * step_dir, step_dir
            # just past the switch, but not past the next boundary (the step is linear)
            return p + (to_switch + min(1e-3 * scale, 0.5 * (lim - to_switch))) * step_dir, step_dir
        if zm > 0.0 and hit[0] == len(jacs) - 1 and hit[1] in held_set and Zs[-1][0, hit[1]] < 0.0:
            # past the switch, another unknown coordinate would switch on next: stop short of it (a walk
            # whose coordinate switches on within the step goes on; changing that was measured to turn a
            # seed-sweep victim wrong, BENCHMARKS.md session 30)
            return p + 0.5 * lim * step_dir, step_dir
        if not np.isfinite(lim) or lim > 4.0 * scale:
            return None
        if hit in crossed and lim <= 1e-6 * scale:
            slide.append(hit)
            continue
        crossed.add(hit)
        p = p + (lim + 1e-9 * scale) * step_dir
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
) -> tuple[float, FloatArray | None, int]:
    """The kink the row with ``w_m = c`` predicts on the normal through ``p``, looked for with 6 queries:
    its miss relative to the bracket (inf when no single kink is in it), the layer input there, and the
    queries asked (0 when the row predicts no kink there)."""
    wc = w.copy()
    wc[m] = c
    n2 = pfx.unit_normal(layers, wc, p)
    if n2 is None:
        return np.inf, None, 0
    t2 = root_on_line(layers, wc, b, p, n2)
    if t2 is None:
        return np.inf, None, 0
    dist = pfx.boundary_distance(layers, p + t2 * n2)
    delta = min(0.25 * dist, 1e-3 * scale)
    tk = _bracket_kink(query, p, n2, t2, delta)
    if tk is None:
        return np.inf, None, 6
    _, H = pfx.forward(layers, (p + tk * n2)[None, :])
    return abs(tk - t2) / delta, H[0], 6


def _cross_normal(layers: Sequence[pfx.Layer], w: FloatArray, p: FloatArray, m: int, hold: Sequence[int],
                  red: tuple[FloatArray, FloatArray] | None = None) -> FloatArray | None:
    """The row's normal at ``p`` with the gradients of ``m`` and of as many of ``hold`` as leave it a
    fifth of its length projected out: a line along it crosses the boundary without moving them.
    ``red`` as for :func:`_walk`."""
    M, jacs = pfx.jacobian(layers, p, None if red is None else red[1])
    n0 = w @ M
    Q = _greedy_hold(jacs[-1], [m, *hold], n0)
    n1 = n0 - Q @ (Q.T @ n0)
    if red is not None:
        n1 = n1 @ red[0]
    nn = float(np.linalg.norm(n1))
    return n1 / nn if nn > 0.0 else None


def _candidates(
    query: QueryFn, layers: Sequence[pfx.Layer], w: FloatArray, b: float, m: int, others: np.ndarray,
    p1: FloatArray, n1: FloatArray, scale: float, n_grid: int, rel_tol: float, max_candidates: int,
) -> tuple[list[float], int]:
    """Weights ``w_m`` read from the kinks nearest the estimated crossing on a segment through ``p1``
    along ``n1`` that are no known neuron's and where ``m`` is on and every other unknown coordinate
    off."""
    t0 = root_on_line(layers, w, b, p1, n1)
    if t0 is None:
        return [], 0
    line, qn = _crossing(query, p1 + t0 * n1, n1, 0.05 * scale, n_grid, rel_tol)
    cands: list[float] = []
    for tk in line.t[np.argsort(np.abs(line.t))]:
        xk = p1 + (t0 + tk) * n1
        if _prefix_kink(layers, xk, n1):
            continue
        _, H = pfx.forward(layers, xk[None, :])
        h = H[0]
        if h[m] > 0 and not np.any(h[others] > 0):
            cands.append(float(-(w @ h + b) / h[m]))
            if len(cands) >= max_candidates:
                break
    return cands, qn


def _confirmed(
    query: QueryFn, layers: Sequence[pfx.Layer], w: FloatArray, b: float, m: int, others: np.ndarray,
    cands: Sequence[float], probes: Sequence[FloatArray], scale: float,
) -> tuple[float | None, float, int]:
    """The candidate whose completed row predicts a kink the oracle shows at a probe point (to 1e-6
    of the bracket), or one sharpened at a probe's kink and confirmed at a second probe; else None.
    Also the best relative miss and the queries."""
    queries = 0
    best, best_err = None, np.inf
    for c in cands:
        # the farthest probe first (largest h_m); a probe whose bracket shows no single kink is passed over
        # for the next nearer one
        miss, h_k, i = np.inf, None, -1
        for i in range(len(probes) - 1, -1, -1):
            miss, h_k, q = _probe(query, layers, w, b, m, c, probes[i], scale)
            queries += q
            if h_k is not None:
                break
        if h_k is None or h_k[m] <= 0:
            continue  # the kink is where the coordinate is off: it cannot tell one weight from another
        if miss < best_err:
            best, best_err = c, miss
        if miss <= 1e-6:
            return c, miss, queries
        if i <= 0 or np.any(h_k[others] > 0):
            continue
        # The first estimate comes from near the switch, where h_m may be small and divide the row's own
        # error; the probe's kink, further on, gives a sharper one. It must then predict the kink at a
        # nearer probe point (an independent check).
        c2 = float(-(w @ h_k + b - w[m] * h_k[m]) / h_k[m])
        if abs(c2 - c) > 1e-2 * (abs(c) + 1e-12 * float(np.linalg.norm(w))):
            continue  # a different neuron's kink
        for k in range(i - 1, -1, -1):
            miss2, h2, q = _probe(query, layers, w, b, m, c2, probes[k], scale)
            queries += q
            if h2 is None or h2[m] <= 0:
                continue
            if miss2 <= 1e-4:
                # two kinks of the oracle, at independent points, agree on c2 (another neuron's kink would
                # miss by a fraction of the bracket): the polish refines it on boundary points
                return c2, min(miss2, 1e-6), queries
            if miss2 < best_err:
                best, best_err = c2, miss2
            break
    return best, best_err, queries


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
    levels: Sequence[float] = (0.1, 0.01, 0.0),
    max_candidates: int = 4,
) -> Completion:
    """Fill the weights of ``(w, b)`` on the coordinates outside ``coverage`` (see the module text).

    ``anchors`` are points on the neuron's boundary (its witnesses); the first ``max_anchors`` are
    tried in turn. ``scale`` is the input scale times ``sqrt(d0)``. For each missing coordinate ``m``:
    walk along the boundary (holding the other unknown coordinates fixed) past where ``m`` switches on,
    until its pre-activation reaches a share ``level`` of the median of the layer input's on
    coordinates at the anchor (a weight read where ``h_m`` is larger divides the row's own error by
    more; the levels are tried in turn, down to just past the switch, because a crossing further
    from the switch more often meets another unknown coordinate switching on); search a short segment
    across the boundary for the kinks nearest the walk's end, read ``w_m`` from each (at most
    ``max_candidates``), and confirm with probes further on, where the completed row must predict a
    kink to 1e-6 of the bracket. Coordinates never reached stay zero and are reported in ``reasons``.
    """
    w = np.array(w, dtype=float)
    cov = np.array(coverage, dtype=bool)
    filled: list[int] = []
    reasons: dict[int, str] = {}
    queries = 0
    grid = max(16, n_grid // 8)
    red = pfx.input_space(layers)
    # each anchor's typical on value of the layer input (the walks' levels are shares of it)
    Z_anchor = [pfx.forward(layers, x[None, :])[0][-1][0] for x in anchors[:max_anchors]]
    typicals = [float(np.median(z[z > 0])) if np.any(z > 0) else 0.0 for z in Z_anchor]
    for m in (int(i) for i in np.flatnonzero(~cov)):
        done = False
        why: list[str] = []  # what stopped each level, in the order tried
        others = ~cov  # the unknown coordinates other than m
        others[m] = False
        hold = [int(k) for k in np.flatnonzero(others)]
        for x, typical in zip(anchors[:max_anchors], typicals, strict=True):
            if pfx.unit_normal(layers, w, x) is None:
                continue
            for level in levels:
                walked = _walk(layers, x, w, m, hold, scale, level * typical, red=red)
                if walked is None:
                    why.append("no walk switched the coordinate on along the boundary")
                    continue
                p1, d = walked
                n1 = _cross_normal(layers, w, p1, m, hold, red)
                if n1 is None:
                    why.append("no direction across the boundary")
                    continue
                cands, qn = _candidates(query, layers, w, b, m, others, p1, n1, scale, grid, rel_tol, max_candidates)
                queries += qn
                if not cands:
                    why.append("no kink of an unknown neuron where the coordinate is on")
                    continue
                # Confirm: further along, the completed row must predict a kink the oracle shows, at
                # points past the switch where, of the unknown coordinates, only m is on
                probes = []
                for eps in (3e-3, 1e-2, 3e-2, 1e-1):
                    cand_p = p1 + eps * scale * d
                    _, Hc = pfx.forward(layers, cand_p[None, :])
                    if Hc[0][m] > 0 and not np.any(Hc[0][others] > 0):
                        probes.append(cand_p)
                if not probes:
                    why.append("no second point where only the coordinate is on")
                    continue
                best, best_err, qc = _confirmed(query, layers, w, b, m, others, cands, probes, scale)
                queries += qc
                if best is not None and best_err <= 1e-6:
                    w[m] = best
                    cov[m] = True
                    filled.append(m)
                    done = True
                    break
                why.append(f"no candidate weight predicted the confirming kink (best relative miss {best_err:.1e})")
            if done:
                break
        if not done:
            # each distinct reason once, the first (the highest level's) first
            reasons[m] = "; ".join(dict.fromkeys(why)) or "no anchor where the row has a normal"
    log.debug("row completion: filled %s, left %s", filled, reasons)
    return Completion(w=w, b=float(b), coverage=cov, filled=tuple(filled), reasons=reasons, queries=queries)
