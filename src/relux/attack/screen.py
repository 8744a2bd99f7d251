"""Telling a kink of the layer being extracted from a deeper one, with rows of that layer known
(attack-notes §3: witnesses of deeper layers are set aside, never walked as the layer's own).

Behind the known prefix, a neuron of layer ``i+1`` bends only at the prefix's boundaries; a deeper
neuron also bends where a neuron of layer ``i+1`` it depends on switches. A walk from a deeper kink
looks right until it first meets such a boundary and then fails, after tens of steps. Once some rows
of layer ``i+1`` are known, their boundaries are known too: the start's boundary is followed, inside
the prefix's region where it is a plane, just past a known row's boundary, and a kink is looked for
in a narrow bracket where the plane predicts it (6 queries). A neuron of layer ``i+1`` has its kink
there; a deeper one that depends on that row is displaced far out of the bracket.

:func:`prescreen` does this before the start's normal is measured (the plane's direction within a
2-D slice comes from one more kink, about 20 queries, where the normal costs about ``d0``);
:func:`screen_starts` with the measured normal.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from relux.attack import prefix as pfx
from relux.attack.critical import find_kinks
from relux.attack.polish import OFFSETS, bracket_kink
from relux.attack.witnesses import Candidate
from relux.oracle.base import FloatArray, QueryFn

Row = tuple[FloatArray, float, FloatArray, float]  # (w, b, points, residual)


Known = tuple[FloatArray, FloatArray]  # the known rows stacked: (W, b)


def _stack(rows: Sequence[Row]) -> Known:
    return np.stack([r[0] for r in rows]), np.array([r[1] for r in rows])


def _known_rows(layers: Sequence[pfx.Layer], known: Known, z: FloatArray,
                G: FloatArray) -> tuple[FloatArray, FloatArray]:
    """The known rows' values at the point of ``z`` and their gradients in its region."""
    n_i = layers[-1][0].shape[0]
    W, b = known
    zl, Gl = z[-n_i:], G[-n_i:]
    return W @ np.maximum(zl, 0.0) + b, (W * (zl > 0)) @ Gl


def _crossing(zk: FloatArray, A: FloatArray, z: FloatArray, G: FloatArray, e_dir: FloatArray,
              tests: int) -> list[float]:
    """Distances along the unit ``e_dir`` (either way) to just past a known row's boundary, well
    inside the prefix's region: up to ``tests`` of them, the nearest first."""
    rate = A @ e_dir
    with np.errstate(divide="ignore", invalid="ignore"):
        beta = np.where(rate != 0, -zk / rate, np.inf)
    out: list[float] = []
    reach = {1.0: pfx.reach(z, G, e_dir), -1.0: pfx.reach(z, G, -e_dir)}
    for k in np.argsort(np.abs(beta)):
        bk = float(beta[k])
        if len(out) == tests or not np.isfinite(bk):
            break
        side = 1.0 if bk > 0 else -1.0
        # short of the prefix's next boundary and of the next known row's (its kink would be there)
        beyond = np.abs(beta[(beta * side > abs(bk))])
        nxt = min(reach[side], float(np.min(beyond)) if beyond.size else np.inf)
        e = 0.5 * min(abs(bk), nxt - abs(bk))
        if e > 0.1 * abs(bk):
            out.append(bk + side * e)
    return out


def _bracket(layers: Sequence[pfx.Layer], known: Known, si: int, y: FloatArray, u: FloatArray,
             beta: float, spread: float) -> tuple[int, FloatArray, FloatArray, float] | None:
    """A bracket along ``u`` about ``y``, a thousandth of the distance walked to it, inside the
    prefix's region there and clear of the known rows' boundaries (their kinks would bend a side)."""
    z, G = pfx.forms(layers, y)
    zk, A = _known_rows(layers, known, z, G)
    with np.errstate(divide="ignore", invalid="ignore"):
        rows_reach = float(np.min(np.abs(zk) / np.abs(A @ u)))
    delta = min(1e-3 * abs(beta), 0.25 * pfx.reach(z, G, u), 0.25 * pfx.reach(z, G, -u), 0.25 * rows_reach)
    return (si, y, u, delta) if delta > 1e-9 * spread else None


def _verdicts(query: QueryFn, plans: Sequence[tuple[int, FloatArray, FloatArray, float]], n: int) -> list[bool]:
    """Brackets ``(start, point, unit direction, half-width)``: a start is set aside when one of its
    brackets shows, with both sides affine, no kink in its middle; a side bent by some other kink
    says nothing."""
    keep = [True] * n
    if not plans:
        return keep
    T = np.asarray(OFFSETS)
    X = np.concatenate([y[None, :] + (delta * T)[:, None] * u[None, :] for _si, y, u, delta in plans])
    Y = query(X).reshape(len(plans), T.size, -1)
    for (si, _y, _u, _delta), Yi in zip(plans, Y, strict=True):
        # the start's neuron has its kink in the middle (the plane is good to far better than the
        # middle's 3e-4 of the distance walked); a deeper one that depends on the row bends far more
        if bracket_kink(T, Yi)[1] in ("flat", "outside"):
            keep[si] = False
    return keep


def screen_starts(
    query: QueryFn, layers: Sequence[pfx.Layer], rows: Sequence[Row],
    starts: Sequence[tuple[FloatArray, FloatArray]], spread: float, tests: int = 2,
) -> list[bool]:
    """Which measured starts ``(x, normal)`` may be kinks of layer ``i+1`` (module docstring); a
    start with no known boundary well inside its region is kept untested."""
    if not rows:
        return [True] * len(starts)
    known = _stack(rows)
    plans: list[tuple[int, FloatArray, FloatArray, float]] = []
    for si, (x0, n) in enumerate(starts):
        nn = n / float(np.linalg.norm(n))
        z, G = pfx.forms(layers, x0)
        zk, A = _known_rows(layers, known, z, G)
        # towards each known boundary within the start's plane
        V = A - np.outer(A @ nn, nn)
        for k in np.argsort(np.abs(zk) / (np.linalg.norm(V, axis=1) + 1e-300))[:tests]:
            nv = float(np.linalg.norm(V[k]))
            if nv <= 1e-12 * float(np.linalg.norm(A[k])):
                continue
            e_dir = V[k] / nv
            for beta in _crossing(zk[k : k + 1], A[k : k + 1], z, G, e_dir, 1):
                br = _bracket(layers, known, si, x0 + beta * e_dir, nn, beta, spread)
                if br is not None:
                    plans.append(br)
    return _verdicts(query, plans, len(starts))


def prescreen(
    query: QueryFn, layers: Sequence[pfx.Layer], rows: Sequence[Row], cands: Sequence[Candidate],
    spread: float, rel_tol: float, tests: int = 2,
) -> list[bool]:
    """Which unmeasured starts (kinks on search lines) may be kinks of layer ``i+1``. In the plane of
    the search line and a known row's gradient, the start's boundary is a line through the kink; one
    more kink on a short parallel line gives its direction (about 20 queries, batched), and it is
    followed from there as in :func:`screen_starts`. A start is kept when nothing could be tested."""
    if not rows or not cands:
        return [True] * len(cands)
    known = _stack(rows)
    probes: list[tuple[int, FloatArray, FloatArray, float, FloatArray, FloatArray, FloatArray, FloatArray,
                       FloatArray, FloatArray]] = []
    for si, cd in enumerate(cands):
        x0 = cd.x
        ell = cd.right - cd.left
        ell = ell / float(np.linalg.norm(ell))
        z, G = pfx.forms(layers, x0)
        zk, A = _known_rows(layers, known, z, G)
        V = A - np.outer(A @ ell, ell)
        nv = np.linalg.norm(V, axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            tk = np.where(nv > 1e-12 * np.linalg.norm(A, axis=1), np.abs(zk) / nv, np.inf)
        k = int(np.argmin(tk))
        if not np.isfinite(tk[k]):
            continue
        w = V[k] * (-np.sign(zk[k]) / nv[k])
        # a short step towards that boundary, and the segment of the search line about the kink
        span = 0.5 * min(cd.half_left, cd.half_right) * cd.unorm
        beta1 = min(0.2 * min(float(tk[k]), pfx.reach(z, G, w)), 0.5 * span)
        if not beta1 > 1e-9 * spread:
            continue
        # the probe line stays in the region (a prefix kink on it would be taken for the start's)
        x1 = x0 + beta1 * w
        z1, G1 = pfx.forms(layers, x1)
        span = min(span, 0.9 * pfx.reach(z1, G1, ell), 0.9 * pfx.reach(z1, G1, -ell))
        if not span > 1e-9 * spread:
            continue
        probes.append((si, x1, ell * span, beta1, w, ell, z, G, zk, A))
    keep = [True] * len(cands)
    if not probes:
        return keep
    lines, _ = find_kinks(query, np.stack([p[1] for p in probes]), np.stack([p[2] for p in probes]), -1.0, 1.0,
                          8, rel_tol)
    plans: list[tuple[int, FloatArray, FloatArray, float]] = []
    for (si, _x1, U, beta1, w, ell, z, G, zk, A), line in zip(probes, lines, strict=True):
        if line.t.size != 1:
            continue  # none, or more than one to choose from: untested
        a1 = float(line.t[0]) * float(np.linalg.norm(U))
        x0 = cands[si].x
        y1 = x0 + beta1 * w + a1 * ell
        z1 = pfx.forms(layers, y1)[0]
        if not np.array_equal(z1 > 0, z > 0):
            continue  # that kink is past a prefix boundary: not the same plane
        e_dir = (y1 - x0) / float(np.linalg.norm(y1 - x0))
        for beta in _crossing(zk, A, z, G, e_dir, tests):
            br = _bracket(layers, known, si, x0 + beta * e_dir, ell, beta, spread)
            if br is not None:
                plans.append(br)
    return _verdicts(query, plans, len(cands))
