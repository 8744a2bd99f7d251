"""A neuron of layer ``i`` that no search line showed, found from where the next layer points at it.

A rarely crossed neuron of layer ``i`` is on (or off) almost everywhere. Where it is on, it adds
``u_k (w·h + b)`` to every neuron ``k`` of layer ``i+1``: walks along next-layer boundaries see it as
a leftover affine term whose direction ``w`` (in layer-``(i-1)`` output coordinates) is the same for
every walk, and :func:`relux.attack.walk_fit.solve_walk_signs` fits it. This module turns that direction
into the exact row: lines from points where the neuron is on, along the input direction that lowers
``w·h`` fastest, cross its boundary; every kink the known prefix does not explain gives a candidate
bias ``b = -w·h(x*)``, and two kinks that agree fix it (CJM20 §4.3 kink search, aimed). The row is
then refined on exact boundary points (:func:`relux.attack.polish.polish_unit`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from relux.attack import prefix as pfx
from relux.attack.config import ExtractionConfig
from relux.attack.critical import find_kinks
from relux.attack.polish import polish_unit
from relux.attack.signs import fit_dropping_misfits
from relux.attack.walk import WalkOutcome
from relux.oracle.base import FloatArray, QueryFn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MissingRow:
    """Outcome of :func:`recover_missing`: the row over layer ``i``'s input when ``ok``."""

    w: FloatArray
    b: float
    points: FloatArray  # exact kinks of the row
    residual: float
    ok: bool
    reason: str
    lines: int


def _on_side(w: FloatArray, b: float, H_on: FloatArray) -> tuple[FloatArray, float]:
    """``(w, b)``, negated if needed so that the neuron is on at most of the layer inputs ``H_on``
    (where a neuron no search line crossed sits)."""
    return (-w, -b) if float(np.median(H_on @ w + b)) < 0 else (w, b)


def _bias_groups(cands: FloatArray, tol: float) -> list[FloatArray]:
    """Indices of candidate biases that agree within ``tol``, largest group first."""
    order = np.argsort(cands)
    groups: list[list[int]] = []
    for i in order:
        if groups and abs(cands[i] - cands[groups[-1][-1]]) <= tol:
            groups[-1].append(int(i))
        else:
            groups.append([int(i)])
    return [np.asarray(g) for g in sorted(groups, key=len, reverse=True)]


def _low_points(
    prev: Sequence[pfx.Layer], v: FloatArray, on_points: FloatArray, d0: int, cfg: ExtractionConfig,
    rng: np.random.Generator, n: int, samples: int = 4096, steps: int = 30,
) -> FloatArray:
    """Inputs where ``v·h`` is lowest, from the known prefix alone (no query): the lowest of random
    inputs on the sphere of the typical input norm, then projected (sub)gradient steps on it."""
    R = cfg.input_scale * float(np.sqrt(d0))
    S = rng.normal(size=(samples, d0))
    S = np.concatenate([S * (R / np.linalg.norm(S, axis=1, keepdims=True)), on_points])
    _, H = pfx.forward(prev, S)
    X = S[np.argsort(H @ v)[:n]].copy()
    for k in range(X.shape[0]):
        x = X[k]
        step = 0.1 * R
        for _ in range(steps):
            g = v @ pfx.jacobian(prev, x)[0]
            g -= (g @ x) / float(x @ x) * x  # along the sphere
            ng = float(np.linalg.norm(g))
            if ng == 0.0:
                break
            y = x - step * g / ng
            y *= R / float(np.linalg.norm(y))
            if float(pfx.forward(prev, y[None, :])[1][0] @ v) < float(pfx.forward(prev, x[None, :])[1][0] @ v):
                x = y
            else:
                step *= 0.5
        X[k] = x
    return X


def recover_missing(
    query: QueryFn,
    layers: Sequence[pfx.Layer],
    v: FloatArray,
    on_points: FloatArray,
    d0: int,
    cfg: ExtractionConfig,
    rng: np.random.Generator,
    rel_tol: float,
    n_lines: int = 8,
) -> MissingRow:
    """The row ``(w, b)`` of a missing neuron of layer ``len(layers)`` whose weight direction is ``v``
    (over that layer's input), oriented so that it is on at ``on_points``.

    ``layers`` is the known prefix, ending with the known rows of that layer (their kinks are set aside).
    """
    prev = list(layers[:-1])
    v = v / float(np.linalg.norm(v))
    scale = cfg.input_scale * float(np.sqrt(d0))
    n_all = sum(W.shape[0] for W, _ in layers)
    n_grid = int(cfg.grid_per_neuron * n_all) + 16
    # The sign of v is unknown: the neuron turns off where v·h is lowest or where it is highest.
    centre = on_points[rng.integers(on_points.shape[0])]
    x0s, us, origin = [], [], []
    low_id: dict[bytes, int] = {}  # each distinct low point, numbered
    for sv in (1.0, -1.0):
        for x in _low_points(prev, sv * v, on_points, d0, cfg, rng, max(n_lines // 2, 1)):
            for u in (x - centre, -(sv * v @ pfx.jacobian(prev, x)[0])):
                nu = float(np.linalg.norm(u))
                if nu > 0.0:
                    x0s.append(x)
                    us.append(u / nu * scale)
                    origin.append(low_id.setdefault(x.tobytes(), len(low_id)))
    none = np.zeros((0, d0))
    if not x0s:
        return MissingRow(v, 0.0, none, np.inf, False, "the direction does not move with the input", 0)
    lines, _ = find_kinks(query, np.asarray(x0s), np.asarray(us), -cfg.line_range, cfg.line_range, n_grid, rel_tol)
    pts: list[FloatArray] = []
    src: list[int] = []
    for line, o in zip(lines, origin, strict=True):
        for x in line.points():
            if pfx.boundary_distance(list(layers), x) > 1e-7 * scale:
                pts.append(x)
                src.append(o)
    if len(pts) < 2:
        return MissingRow(v, 0.0, none, np.inf, False,
                          f"{len(pts)} kink(s) the prefix does not explain on {len(x0s)} aimed lines", len(x0s))
    X = np.asarray(pts)
    # the same kink seen on two lines counts once
    keep = [0]
    for k in range(1, X.shape[0]):
        if np.min(np.linalg.norm(X[keep] - X[k], axis=1)) > 1e-6 * scale:
            keep.append(k)
    X = X[keep]
    src_k = np.asarray(src)[keep]
    _, H = pfx.forward(prev, X)
    proj = H @ v
    cands = -proj
    tol = 1e-7 * (float(np.max(np.abs(proj))) + 1.0)
    # kinks from two different low points must agree (one low point can sit on another neuron's ridge)
    groups = [gr for gr in _bias_groups(cands, tol) if np.unique(src_k[gr]).size >= 2]
    group = groups[0] if groups else np.zeros(0, dtype=int)
    if group.size < 2:
        return MissingRow(v, 0.0, X, np.inf, False,
                          f"no two of {len(pts)} unexplained kinks agree on a bias for the direction", len(x0s))
    _, Hon = pfx.forward(prev, on_points)
    v, b = _on_side(v, float(np.median(cands[group])), Hon)
    anchors = X[group]
    # the neuron's boundary may be short (it is off only in a small region): smaller spreads if needed
    for spread in (scale, 0.1 * scale, 0.01 * scale):
        pol = polish_unit(query, prev, v, b, anchors, d0, spread, rng)
        if pol.ok:
            break
    agree = float(np.ptp(cands[group])) / (float(np.max(np.abs(proj[group]))) + 1.0)
    if not pol.ok:
        # The direction comes from an exact fit and the bias from kinks that agree on it: with three
        # such kinks the row stands without refinement (the refinement's points may stray onto other
        # boundaries when the neuron's off-region is small).
        ok = group.size >= 3
        log.debug("missing row: refinement failed (%s); %d agreeing kinks", pol.reason, group.size)
        nb = float(np.linalg.norm(np.append(v, b)))
        return MissingRow(v / nb, b / nb, anchors, agree, ok, "" if ok else f"refinement: {pol.reason}", len(x0s))
    if pol.seen is not None and not pol.seen.all():
        return MissingRow(v, b, anchors, pol.residual, False,
                          f"{int((~pol.seen).sum())} of its {pol.seen.size} weights on coordinates no boundary point "
                          "sees on", len(x0s))
    w, b = _on_side(pol.w, pol.b, Hon)
    log.debug("missing row: %d kinks agree (of %d unexplained), residual %.1e", group.size, len(pts), pol.residual)
    return MissingRow(w, b, anchors, pol.residual, True, "", len(x0s))


def recover_own(
    query: QueryFn,
    layers: Sequence[pfx.Layer],
    row: FloatArray,
    points: FloatArray,
    on_points: FloatArray,
    d0: int,
    cfg: ExtractionConfig,
    rng: np.random.Generator,
) -> MissingRow:
    """A missing neuron of layer ``len(layers)`` whose own boundary a walk followed: ``row = (w, b)``
    from that walk's exact ``points`` (every input coordinate observed), refined on boundary points
    and oriented to be on at most of ``on_points`` (a neuron no search line crossed is on almost
    everywhere, else it would not show as a linear leftover)."""
    prev = list(layers[:-1])
    w, b = row[:-1].copy(), float(row[-1])
    scale = cfg.input_scale * float(np.sqrt(d0))
    anchors = points[rng.choice(points.shape[0], size=min(8, points.shape[0]), replace=False)]
    pol = polish_unit(query, prev, w, b, anchors, d0, scale, rng)
    if pol.ok:
        w, b = pol.w, pol.b
    else:
        log.debug("own row: refinement failed (%s); keeping the walk's exact fit", pol.reason)
    w, b = _on_side(w, b, pfx.forward(prev, on_points)[1])
    return MissingRow(w, b, points, pol.residual, True, "", 0)


def recover_from_walks(
    query: QueryFn,
    layers: Sequence[pfx.Layer],
    wo: WalkOutcome,
    d0: int,
    cfg: ExtractionConfig,
    rng: np.random.Generator,
    rel_tol: float,
) -> MissingRow | None:
    """The one missing neuron of layer ``len(layers)`` (signs already corrected by ``wo``): from a walk
    along its own boundary when one happened, else from the walks' shared leftover direction. None when
    the walks show neither (or more than one missing direction)."""
    if wo.own_rows:
        return recover_own(query, layers, wo.own_rows[0][0], wo.own_rows[0][1], wo.missing_on, d0, cfg, rng)
    if wo.missing.shape[1] == 1 and wo.missing_on.shape[0]:
        return recover_missing(query, layers, wo.missing[:, 0], wo.missing_on, d0, cfg, rng, rel_tol)
    return None


def unexplained_lines(
    query: QueryFn,
    layers: Sequence[pfx.Layer],
    W: FloatArray,
    b: FloatArray,
    d0: int,
    cfg: ExtractionConfig,
    rng: np.random.Generator,
    n_samples: int = 1024,
    max_lines: int = 8,
    hints: FloatArray | None = None,
) -> tuple[FloatArray, FloatArray] | None:
    """Lines through inputs where the known rows ``(W, b)`` of the last hidden layer (behind ``layers``)
    cannot explain ``f``: a neuron that is rarely on shows only there, and a line through a point of its
    on-region must cross its boundary. ``f`` is fitted on ``[ReLU(ẑ), h, 1]`` (the signs need not be
    known) with the worst points dropped until the fit is clean; the dropped ones are the targets.
    ``hints``: inputs sampled first (where an earlier attempt's model disagreed with ``f``: a rarely
    on neuron it lacked is likely on there). Returns ``(x0, u)`` or None when every sample is explained."""
    X = rng.normal(0.0, cfg.input_scale, size=(n_samples, d0))
    if hints is not None and hints.size:
        X = np.concatenate([hints.reshape(-1, d0), X])
    Y = query(X)
    _, H = pfx.forward(layers, X)
    if n_samples < 2 * (W.shape[0] + H.shape[1] + 1):
        return None
    r = fit_dropping_misfits(H @ W.T + b, H, Y)[3]
    bad = np.flatnonzero(r > 1e-7)
    if bad.size == 0:
        return None
    pick = bad[np.argsort(r[bad])[::-1][:max_lines]]
    u = rng.normal(size=(pick.size, d0))
    return X[pick], u
