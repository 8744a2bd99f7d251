"""A layer's rows from signed walks, once the layer before it has its signs (attack-notes §3, the
rank deficiency behind a layer wider than its space of control).

Behind a layer ``i`` wider than the space of control, one witness of a layer-``i+1`` neuron sees only
the weights of the layer-``i`` neurons on there, and not even all of those. With layer ``i``'s signs
known (checked by a few sign-free walks, :func:`relux.attack.walk.walk_layer`), the neuron is
``z' = Σ_j u_j ReLU(z_j) + c``: a walk along its boundary needs each neuron of layer ``i`` to be on
at one of its points, not switched both ways, and it crosses the boundaries of the neurons it has
already seen without a query (:func:`relux.attack.walk.walk_boundaries` with ``signed``). One walk per
row; the rows already found set their kinks aside when new starts are looked for, and deeper layers'
kinks are set aside against those rows' boundaries (:mod:`relux.attack.screen`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from relux.attack import prefix as pfx
from relux.attack.config import ExtractionConfig
from relux.attack.confirm import crossing_hits, mostly_confirmed
from relux.attack.critical import LineKinks
from relux.attack.screen import prescreen, screen_starts
from relux.attack.walk import _normals, walk_boundaries
from relux.attack.walk_system import WalkSystem
from relux.attack.witnesses import find_candidates
from relux.oracle.base import FloatArray, QueryFn
from relux.parallel import Executor

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WalkedRows:
    """Rows of layer ``i+1`` on layer ``i``'s outputs (unit ``(w, b)``), the exact points of each,
    their misfit, and what it took."""

    W: FloatArray
    b: FloatArray
    points: tuple[FloatArray, ...]
    residual: FloatArray
    walks: int
    complete: int
    reason: str


#: rounds of search lines (two lines each) a complete layer may take to confirm a weakly confirmed row
_CONFIRM_ROUNDS = 4


def walk_rows(
    query: QueryFn,
    layers: Sequence[pfx.Layer],
    width: int,
    d0: int,
    cfg: ExtractionConfig,
    rng: np.random.Generator,
    rel_tol: float,
    known: Sequence[tuple[FloatArray, float, FloatArray, float]] = (),
    batch: int = 8,
    max_rounds: int = 48,
    executor: Executor | None = None,
) -> WalkedRows:
    """Up to ``width`` rows of the layer behind ``layers`` (whose last layer's signs are right) from
    one signed walk each; ``known``: rows already found, as ``(w, b, points, residual)``. Stops when
    the layer is complete, or after 13 rounds of search lines in a row that gave no new row, or ``max_rounds``."""
    n_i = layers[-1][0].shape[0]
    n_grid = int(cfg.grid_per_neuron * (n_i + width)) + 16
    rows: list[tuple[FloatArray, float, FloatArray, float]] = []
    for w, b, P, res in known:
        nrm = float(np.linalg.norm(np.append(w, b)))
        if not (np.isfinite(nrm) and float(np.linalg.norm(w)) > 1e-8 * nrm):
            continue  # a degenerate walk fit (no term on the layer's outputs) is no row
        rows.append((np.asarray(w, dtype=float) / nrm, float(b) / nrm, P, float(res)))
    walks = complete = screened = 0
    spread = cfg.input_scale * float(np.sqrt(d0))
    last_new = 0
    reason = ""
    lines: list[LineKinks] = []
    extra = 0  # rounds of search lines after the layer was complete, to confirm weakly confirmed rows
    for rnd in range(max_rounds):
        if len(rows) >= width:
            # A row its lines confirm at fewer crossings than they contradict (a deeper neuron's boundary
            # within one pattern of the layer before, fitted exactly: random 10-10-10-10-1 victim 2, one hit
            # and two misses on the only two lines) gets more lines first: a few more rounds, at most.
            if extra >= _CONFIRM_ROUNDS or not _weak(layers, rows, lines):
                break
            extra += 1
        if rnd - last_new > 12:
            reason = f"no new row in {rnd - last_new} rounds of search lines"
            break
        kn = (np.stack([r[0] for r in rows]), np.array([r[1] for r in rows])) if rows else None
        cands, info = find_candidates(query, layers, d0, 2, n_grid, cfg, rng, rel_tol, known=kn)
        lines += info.lines_found
        before = len(rows)
        # A start where more neurons of layer i are on than its normal can separate leaves the row
        # undetermined for many steps, and such walks rarely complete: others are walked first (more
        # neurons on than inputs is seen without a query). After rounds without a new row, any start.
        picky = rnd - last_new <= 4
        if picky:
            cands = [cd for cd in cands if int((pfx.forward(layers, cd.x[None, :])[0][-1] > 0).sum()) < d0]
        while cands and len(rows) < width:
            take, cands = cands[:batch], cands[batch:]
            if rows:  # deeper kinks set aside before their normals are measured
                keep = prescreen(query, layers, rows, take, spread, rel_tol)
                screened += len(take) - int(sum(keep))
                take = [cd for cd, k in zip(take, keep, strict=True) if k]
                if not take:
                    continue
            starts = [(x, n) for x, n in _normals(query, layers, d0, take, cfg, executor)
                      if not _on_rows(layers, rows, x)
                      and (not picky or WalkSystem(layers, x, n, signed=True).determined)]
            if starts and rows:
                keep = screen_starts(query, layers, rows, starts, spread)
                screened += len(starts) - int(sum(keep))
                starts = [st for st, k in zip(starts, keep, strict=True) if k]
            if not starts:
                continue
            for wk in walk_boundaries(query, layers, starts, d0, cfg, rng, rel_tol, signed=True):
                walks += 1
                if not wk.ok:
                    log.debug("signed walk failed: %s (%d steps, %d/%d on)", wk.reason, wk.steps,
                              int(wk.switched.sum()), n_i)
                    continue
                complete += 1
                w, c = wk.theta[:n_i], float(wk.theta[-1])
                nrm = float(np.linalg.norm(np.append(w, c)))
                w, c = w / nrm, c / nrm
                if any(abs(float(w @ r[0] + c * r[1])) > 1 - 1e-6 for r in rows):
                    continue
                rows.append((w, c, wk.points, wk.residual))
            cands = [cd for cd in cands if not _on_rows(layers, rows, cd.x)]
        rows = _confirmed(layers, rows, lines, width)
        if len(rows) > before:
            last_new = rnd
            extra = 0  # a row that filled the layer again has the confirmation rounds afresh
            log.info("signed walks: %d/%d rows after %d walks (%d complete; %d starts set aside as deeper)",
                     len(rows), width, walks, complete, screened)
    W_out = np.stack([r[0] for r in rows]) if rows else np.zeros((0, n_i))
    b_out = np.array([r[1] for r in rows], dtype=float)
    if len(rows) < width and not reason:
        reason = f"{len(rows)}/{width} rows after {max_rounds} rounds"
    return WalkedRows(W_out, b_out, tuple(r[2] for r in rows), np.array([r[3] for r in rows]), walks, complete, reason)


def _on_rows(layers: Sequence[pfx.Layer], rows: Sequence[tuple[FloatArray, float, FloatArray, float]],
             x: FloatArray) -> bool:
    """Whether ``x`` is on the boundary of one of ``rows`` (a start there would walk it again)."""
    if not rows:
        return False
    _, H = pfx.forward(layers, x[None, :])
    W = np.stack([r[0] for r in rows])
    b = np.array([r[1] for r in rows])
    v = W @ H[0] + b
    scale = np.linalg.norm(W, axis=1) * (float(np.linalg.norm(H[0])) + 1.0)
    return bool(np.any(np.abs(v) <= 1e-6 * scale))


def _weak(layers: Sequence[pfx.Layer], rows: list[tuple[FloatArray, float, FloatArray, float]],
          lines: Sequence[LineKinks]) -> bool:
    """Whether some row's predicted crossings on ``lines`` miss at least as often as they hit (and miss at
    all): too little evidence either way, which more lines settle."""
    if not rows or not lines:
        return False
    hits, misses = crossing_hits(np.stack([r[0] for r in rows]), np.array([r[1] for r in rows]), lines, layers)
    return bool(np.any((misses > 0) & (misses >= hits)))


def _confirmed(
    layers: Sequence[pfx.Layer], rows: list[tuple[FloatArray, float, FloatArray, float]], lines: Sequence[LineKinks],
    width: int,
) -> list[tuple[FloatArray, float, FloatArray, float]]:
    """``rows`` without those that predict crossings the search lines do not show, at most ``width``
    of them (the best confirmed first). A deeper neuron's boundary can pass for a row of this layer along
    a walk that switched none of the neurons in between, and its end check; on the search lines its
    row predicts kinks where there are none (:func:`relux.attack.confirm.mostly_confirmed`, the rule
    witnesses' rows are held to as well)."""
    if not rows or not lines:
        return rows[:width]
    hits, misses = crossing_hits(np.stack([r[0] for r in rows]), np.array([r[1] for r in rows]), lines, layers)
    keep = [int(j) for j in np.flatnonzero(mostly_confirmed(hits, misses))]
    if len(keep) < len(rows):
        log.info("signed walks: %d row(s) dropped: they predict crossings the search lines do not show (%s)",
                 len(rows) - len(keep), ", ".join(f"{int(misses[j])} of {int(hits[j] + misses[j])}"
                                                  for j in range(len(rows)) if j not in keep))
    keep.sort(key=lambda j: -(int(hits[j]) - 2 * int(misses[j])))
    return [rows[j] for j in sorted(keep[:width])]
