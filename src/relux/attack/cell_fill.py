"""The weights a pieced-together row still lacks, read in cells where they are on (attack-notes §3;
CM24 §3.2 on partial signatures).

A row pieced together from pattern regions (:mod:`relux.attack.pattern_layer`) lacks the weights on
the neurons of the layer before that were off at every kink of it measured. Each is read from one
more kink of the row's neuron, in a cell where those neurons are on:

- the earlier layers follow their patterns at one of the row's kinks, and the layer before has the
  lacked neurons asked to be on (:func:`relux.attack.pattern_layer.choose_pattern`, linear programs,
  no query);
- the row's boundary, as known (the lacked weights taken as zero), must pass through the centre of
  the largest ball in that cell that it can, with the lacked neurons on there barely on (one more
  linear program, :func:`_crossing_ball`): a line through that centre along the row's normal, less
  its part along those neurons' gradients, keeps them as barely on, so the true boundary, which
  their unknown weights move by their weight times their value, crosses it near the centre;
- the kinks on that line that neither the prefix nor a whole row of the layer explains are measured
  nearest the estimated boundary first (:func:`relux.attack.witnesses.measure_candidates`, ``2 (r +
  1)`` queries each), and the one whose partial signature agrees with the row on the weights both
  saw (:func:`relux.attack.pattern_layer` ``MATCH_TOL``) gives the lacked weights on there.

Every weight filled comes from an exact finite-difference gradient at a kink whose neuron is
identified by the weights already known, as the pattern regions' pieces are; nothing is fitted. The
new kink's distance from the filled row's plane is returned as its residual (the row is refined
afterwards, :func:`relux.attack.deep.refine_rows`).
Behind the CIFAR-scale unitary victim's layers 1-3 (session 34), the completion along the boundary
(:func:`relux.attack.complete.complete_row`) filled 8 of 20 such weights of seven rows for 1.5M
queries; this filled all 23 of eight rows for 32,170 queries (one line each), and rows lacking 45
to 82 weights in three or four lines. With the lacked neurons on as far as the ball (not held
barely on), nine rows lacking 2 to 82 weights were left partial.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from relux.attack import prefix as pfx
from relux.attack.active_lines import (
    AllOnRegion,
    cell_constraints,
    cell_map,
    cell_masks,
    largest_ball,
    region_margin,
)
from relux.attack.config import ExtractionConfig
from relux.attack.witnesses import find_candidates, measure_candidates
from relux.oracle.base import FloatArray, QueryFn

if TYPE_CHECKING:
    from relux.attack.pattern_layer import Pattern

log = logging.getLogger(__name__)

#: Kinks measured per line, nearest the row's estimated boundary first. Behind the CIFAR-scale
#: unitary victim's layers 1-3 the row's kink was among the first 15 of up to 170 on a line.
MEASURED_PER_LINE = 16
#: Lacked neurons asked to be on per cell, drawn at random: each one on moves the row's boundary from
#: where the weights known put it, by its unknown weight times its value there. With 52 asked on, no
#: kink among the 16 nearest the estimated boundary was the row's, in five cells; with 1 to 12, the
#: first cell mostly gave it.
ASKED_PER_CELL = 8
#: The lacked neurons on in the cell are held at most this fraction of the ball's radius from their
#: boundary at its centre (:func:`_crossing_ball`), and the line runs along which they stay constant:
#: the row's true kink is then within about this fraction of the radius, times the lacked weights'
#: share of the row, from the centre.
LOOSE_CAP = 0.1


@dataclass(frozen=True)
class CellFill:
    """A row after :func:`fill_in_cells`: weights and bias (on the scale of the row given), which
    weights are known, the kinks that filled some, and the cost."""

    w: FloatArray
    b: float
    seen: np.ndarray
    points: tuple[FloatArray, ...]
    lines: int
    measured: int
    reasons: tuple[str, ...]  # why each try that filled nothing failed
    residual: float = 0.0  # the largest relative distance of those kinks from the filled row's plane


def _crossing_ball(
    region: AllOnRegion, g: FloatArray, g0: float, loose: np.ndarray | None = None,
) -> tuple[float, FloatArray | None]:
    """The largest ball inside ``region`` (as :func:`relux.attack.active_lines.largest_ball`) whose
    centre lies on the hyperplane ``g · x + g0 = 0``: its radius and centre (0 and None when the
    plane misses the region). The rows ``loose`` (a mask over the region's rows) need only hold at
    the centre, and there be at most :data:`LOOSE_CAP` times the radius from their boundary: the
    lacked neurons, barely on, so that their unknown weights move the row's boundary little."""
    lo = np.zeros(region.A.shape[0], dtype=bool) if loose is None else np.asarray(loose, dtype=bool)
    r, x = largest_ball(region.A, region.c, region.margin, region.box, plane=(g, g0), loose=lo, cap=LOOSE_CAP)
    if x is None or not r > 0:
        return 0.0, None
    return r, x


def _cell(layers: Sequence[pfx.Layer], box: float, pat: Pattern) -> AllOnRegion:
    """The cell where the known layers follow ``pat``, as a region (no linear program: its centre and
    depth are left at zero; :func:`_crossing_ball` finds the ball that matters here)."""
    A, c = cell_constraints(layers, cell_masks(layers, pat.on, pat.before))
    return AllOnRegion(A, c, region_margin(A, c, box), box, np.zeros(A.shape[1]), 0.0)


def _span(region: AllOnRegion, x: FloatArray, u: FloatArray) -> tuple[float, float]:
    """How far the line ``x + t u`` (``u`` of unit norm) stays inside ``region`` either way (``t_lo < 0
    < t_hi``). Rows the line runs along (``|A_i · u|`` at most 1e-9 of ``|A_i|``, as the lacked
    neurons' in :func:`fill_in_cells`, to rounding) do not bound it: their slack at ``x`` may be a
    rounding below zero, and its ratio to a rounding-sized slope is meaningless."""
    s = region.A @ x + region.c - region.margin  # slack, positive at x
    r = region.A @ u
    cross = np.abs(r) > 1e-9 * np.linalg.norm(region.A, axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        lim = -s / r
    hi = float(np.min(lim[cross & (r < 0)], initial=np.inf))
    lo = float(np.max(lim[cross & (r > 0)], initial=-np.inf))
    box = region.box
    with np.errstate(divide="ignore", invalid="ignore"):
        bh = np.where(u > 0, (box - x) / u, np.where(u < 0, (-box - x) / u, np.inf))
        bl = np.where(u > 0, (-box - x) / u, np.where(u < 0, (box - x) / u, -np.inf))
    return max(lo, float(np.max(bl))), min(hi, float(np.min(bh)))


def _agrees(w: FloatArray, b: float, seen: np.ndarray, v: FloatArray, c: float, active: np.ndarray,
            tol: float, min_shared: int) -> float | None:
    """The factor that scales the partial signature ``(v, c)`` (weights on ``active``) onto the row
    ``(w, b)`` (weights on ``seen``) when the two agree to ``tol`` in ``1 - |cos|`` on the weights
    both saw (at least ``min_shared``) and the bias; else None."""
    both = seen & active
    if both.sum() < min_shared:
        return None
    p, q = np.append(v[both], c), np.append(w[both], b)
    npn, nq = float(np.linalg.norm(p)), float(np.linalg.norm(q))
    if npn == 0.0 or nq == 0.0:
        return None
    cos = float(p @ q) / (npn * nq)
    return float(p @ q) / npn**2 if 1.0 - abs(cos) <= tol else None


def fill_in_cells(
    query: QueryFn,
    layers: Sequence[pfx.Layer],
    w: FloatArray,
    b: float,
    seen: np.ndarray,
    points: FloatArray,
    d0: int,
    cfg: ExtractionConfig,
    rng: np.random.Generator,
    rel_tol: float,
    known: tuple[FloatArray, FloatArray] | None = None,
    tries: int | None = None,
) -> CellFill:
    """The row ``(w, b)`` of the layer behind ``layers``, its weights off ``seen`` read at kinks in cells
    where those neurons are on (module docstring): at most ``tries`` cells (by default 8, or twice
    as many as it takes to ask every lacked neuron on :data:`ASKED_PER_CELL` at a time), each with
    the earlier layers' patterns at one of the row's kinks ``points`` in turn and a random draw of
    the lacked neurons asked on. ``known``: whole rows of the layer (their kinks are set aside
    without a query)."""
    from relux.attack.pattern_layer import MATCH_TOL, MIN_SHARED, Pattern, _controls, _earlier_region, _most_on

    w = np.array(w, dtype=float)
    seen = np.array(seen, dtype=bool)
    if seen.all() or points.shape[0] == 0:
        return CellFill(w, b, seen, (), 0, 0, () if seen.all() else ("no kink of the row to start from",))
    box = 3.0 * cfg.input_scale
    n_grid = int(cfg.grid_per_neuron * sum(W.shape[0] for W, _ in layers)) + 16
    found: list[FloatArray] = []
    reasons: list[str] = []
    residual = 0.0
    lines = measured = 0
    order = rng.permutation(points.shape[0])
    if tries is None:
        tries = max(8, 2 * -(-int((~seen).sum()) // ASKED_PER_CELL))
    for k in range(tries):
        lacked = np.flatnonzero(~seen)
        if not lacked.size:
            break
        ask = rng.choice(lacked, size=min(ASKED_PER_CELL, lacked.size), replace=False)
        p = points[order[k % order.size]]
        Z, _ = pfx.forward(layers, p[None])
        before = tuple(z[0] > 0 for z in Z[:-1])
        # one linear program: as many lacked neurons on as keep a ball a tenth as deep as the earlier
        # layers' cell (pattern_layer.choose_pattern in one block)
        early = _earlier_region(layers, box, before)
        if early is None:
            reasons.append("the kink's earlier cell is empty")
            continue
        Ae, ce, me, last, r0, _ = early
        hard = np.zeros(Ae.shape[0], dtype=bool)
        hard[:last] = True
        soft = np.zeros(Ae.shape[0], dtype=bool)
        soft[last + ask] = True
        ball = _most_on(Ae, ce, me, box, 0.1 * r0, hard, soft)
        if ball is None:
            reasons.append("no ball in the kink's earlier cell")
            continue
        on = (Ae[last:] @ ball[1] + ce[last:]) > 0
        pat = Pattern(on, 0.1 * r0, int(ball[0].sum()), before)
        new = on & ~seen
        if not new.any():
            reasons.append("no lacked neuron on in the cell")
            continue
        if not _controls(layers, pat):
            reasons.append("the layer before does not control its neurons on in the cell")
            continue
        region = _cell(layers, box, pat)
        # the row's estimated pre-activation there, affine in the input (the lacked weights as zero)
        M, m = cell_map(layers, cell_masks(layers, pat.on, pat.before))
        A_last, c_last = M[-w.size:], m[-w.size:]
        wk = np.where(seen & pat.on, w, 0.0)
        g, g0 = wk @ A_last, float(wk @ c_last) + b
        gn = float(np.linalg.norm(g))
        if gn == 0.0:
            reasons.append("the row's weights known are all on neurons off in the cell")
            continue
        loose = np.zeros(region.A.shape[0], dtype=bool)
        loose[region.A.shape[0] - w.size + np.flatnonzero(new)] = True
        depth, x = _crossing_ball(region, g, g0, loose)
        if x is None:
            reasons.append("the row's estimated boundary misses the cell, or the cell is empty")
            continue
        # along the row's normal, less its part along the lacked neurons' gradients (they stay as
        # barely on as at the centre, so the true kink stays near it)
        Q, _ = np.linalg.qr(region.A[loose].T)
        u = g - Q @ (Q.T @ g)
        if float(np.linalg.norm(u)) <= 1e-6 * gn:
            reasons.append("the row's normal lies in the span of the lacked neurons' gradients")
            continue
        u = u / float(np.linalg.norm(u))
        lo, hi = _span(region, x, u)
        if not (np.isfinite(lo) and np.isfinite(hi) and hi > lo):
            reasons.append("no line inside the cell")
            continue
        scale = cfg.input_scale * float(np.sqrt(d0))
        x0 = x + 0.5 * (lo + hi) * u
        cands, _ = find_candidates(query, layers, d0, 0, n_grid, cfg, rng, rel_tol,
                                   lines_given=(x0[None], (u * scale)[None]), t_range=0.5 * (hi - lo) / scale,
                                   known=known)
        lines += 1
        if not cands:
            reasons.append("no kink on the line")
            continue
        # the kinks nearest the estimated boundary first
        near = sorted(cands, key=lambda c: abs(float(g @ c.x + g0)))[:MEASURED_PER_LINE]
        got = False
        deficient = 0
        for c in near:
            wts, _, _ = measure_candidates(query, layers, d0, [c], cfg)
            measured += 1
            if not wts or not wts[0].full_rank:
                deficient += 1
                continue
            wt = wts[0]
            s = _agrees(w, b, seen, wt.w, wt.b, wt.active, MATCH_TOL, MIN_SHARED)
            if s is None:
                continue
            fresh = wt.active & ~seen
            w[fresh] = s * wt.w[fresh]
            seen |= fresh
            found.append(wt.x)
            # the new kink on the filled row's plane (exact to rounding when the known weights are;
            # as far off as they are otherwise, which the caller keeps as the row's residual)
            hb = np.append(wt.h, 1.0)
            residual = max(residual, abs(float(hb @ np.append(w, b))) / (float(np.linalg.norm(hb))
                                                                         * float(np.linalg.norm(np.append(w, b)))))
            got = True
            log.debug("cell fill: %d weights from a kink %.2g deep in the cell", int(fresh.sum()), depth)
            break
        if not got:
            log.debug("cell fill: none of %d kinks (of %d on the line) is the row's", len(near), len(cands))
            reasons.append(f"none of the {len(near)} kinks nearest the estimated boundary is the row's"
                           + (f" ({deficient} measured short of full rank)" if deficient else ""))
    return CellFill(w, b, seen, tuple(found), lines, measured, tuple(reasons), residual)
