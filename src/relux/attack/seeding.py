"""Rows grown from single witnesses (attack-notes §3, rank deficiency).

When a layer's input is only partly active at every witness, witnesses of one neuron rarely overlap
enough to be grouped. A single witness already fixes the neuron's weights on the coordinates active
there (its partial signature); the rest are read from exact kinks by walking along the boundary
(:mod:`relux.attack.complete`), and the row is polished on exact boundary points
(:mod:`relux.attack.polish`). The completed row must then explain the crossings it predicts on every
search line, which a witness of a deeper neuron cannot do, and must differ from every known row.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np

from relux.attack import prefix as pfx
from relux.attack.complete import complete_row
from relux.attack.config import ExtractionConfig
from relux.attack.confirm import crossing_hits
from relux.attack.critical import LineKinks
from relux.attack.hyperplanes import hyperplane_distance
from relux.attack.polish import polish_row
from relux.attack.unify import NeuronRow, on_neuron
from relux.attack.witnesses import Witness
from relux.oracle.base import FloatArray

log = logging.getLogger(__name__)
QueryFn = Callable[[FloatArray], FloatArray]


def _unit(w: FloatArray, b: float) -> tuple[FloatArray, float]:
    n = float(np.linalg.norm(np.append(w, b)))
    return w / n, b / n


def rows_from_seeds(
    query: QueryFn,
    layers: Sequence[pfx.Layer],
    witnesses: Sequence[Witness],
    known: Sequence[NeuronRow],
    lines: Sequence[LineKinks],
    width: int,
    d0: int,
    n_grid: int,
    cfg: ExtractionConfig,
    rng: np.random.Generator,
    rel_tol: float,
    max_seeds: int,
) -> list[NeuronRow]:
    """New rows, each grown from one witness no known row explains, until the layer has ``width``."""
    scale = cfg.input_scale * float(np.sqrt(d0))
    found: list[NeuronRow] = []
    tried = 0
    order = sorted(range(len(witnesses)), key=lambda i: -int(witnesses[i].active.sum()))
    for i in order:
        if len(known) + len(found) >= width or tried >= max_seeds:
            break
        wt = witnesses[i]
        if not wt.full_rank or not wt.active.any():
            continue
        rows = [*known, *found]
        if any(on_neuron(wt, r, tol=1e-6) for r in rows):
            continue
        tried += 1
        w, b = wt.w.copy(), float(wt.b)
        cov = wt.active.copy()
        anchors = wt.x[None, :]
        if not cov.all():
            c = complete_row(query, layers, w, b, cov, anchors, d0, scale, n_grid, rel_tol)
            if not c.coverage.all():
                log.debug("seed %d: completion left coordinates %s", i, sorted(c.reasons))
                continue
            w, b, cov = c.w, c.b, c.coverage
        pol, _ = polish_row(query, layers, w, b, anchors, d0, scale, rng)
        if pol.ok:
            w, b = pol.w, pol.b
        w, b = _unit(w, b)
        hits, misses = crossing_hits(w[None, :], np.array([b]), lines, layers)
        if hits[0] < 3 or 4 * misses[0] > hits[0]:
            log.debug("seed %d: completed row not confirmed (%d hits, %d misses)", i, hits[0], misses[0])
            continue
        if rows:
            keys = np.stack([np.append(r.w, r.b) for r in rows])
            if float(np.min(hyperplane_distance(np.append(w, b), keys))) < 1e-4:
                continue
        row = NeuronRow(w=w, b=b, members=(i,), coverage=cov, residual=0.0, gap=np.inf)
        members = tuple(j for j, x in enumerate(witnesses) if on_neuron(x, row, tol=1e-6)) or (i,)
        found.append(NeuronRow(w=w, b=b, members=members, coverage=cov, residual=0.0, gap=np.inf))
        log.debug("seed %d: new row confirmed (%d hits, %d misses, %d witnesses)", i, hits[0], misses[0],
                  len(members))
    return found
