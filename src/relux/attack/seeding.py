"""Rows grown from single witnesses (attack-notes §3, rank deficiency).

When a layer's input is only partly active at every witness, witnesses of one neuron rarely overlap
enough to be grouped. A single witness already fixes the neuron's weights on the coordinates active
there (its partial signature); the rest are read from exact kinks by walking along the boundary
(:mod:`relux.attack.complete`), and the row is polished on exact boundary points
(:mod:`relux.attack.polish`). The completed row must then explain the crossings it predicts on every
search line, which a witness of a deeper neuron cannot do, and must differ from every known row.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import numpy as np

from relux.attack import prefix as pfx
from relux.attack.complete import complete_row
from relux.attack.config import ExtractionConfig
from relux.attack.confirm import crossing_hits
from relux.attack.critical import LineKinks
from relux.attack.hyperplanes import hyperplane_distance
from relux.attack.linalg import svd
from relux.attack.polish import polish_row
from relux.attack.unify import NeuronRow, on_neuron
from relux.attack.witnesses import Witness
from relux.oracle.base import FloatArray, QueryFn

log = logging.getLogger(__name__)


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
        found.append(dataclasses.replace(row, members=members))
        log.debug("seed %d: new row confirmed (%d hits, %d misses, %d witnesses)", i, hits[0], misses[0],
                  len(members))
    return found


def rows_from_unexplained(
    witnesses: Sequence[Witness],
    known: Sequence[NeuronRow],
    lines: Sequence[LineKinks],
    layers: Sequence[pfx.Layer],
    width: int,
    rng: np.random.Generator,
    trials: int = 400,
) -> list[NeuronRow]:
    """Rows fitted to the witnesses no known row explains (attack-notes §3).

    Every witness is an exact point of its neuron's boundary, so ``w·h(x) + b = 0`` there: witnesses of
    one missing neuron are the inliers of one hyperplane in the layer's input space, whatever their
    active sets. RANSAC over small subsets finds them (witnesses of deeper neurons are outliers);
    each fit must then explain its predicted crossings on every search line.
    """
    found: list[NeuronRow] = []
    pool = [i for i, wt in enumerate(witnesses) if not any(on_neuron(wt, r, tol=1e-6) for r in known)]
    while pool and len(known) + len(found) < width:
        Hu = np.stack([np.append(witnesses[i].h, 1.0) for i in pool])
        nrm = np.linalg.norm(Hu, axis=1)
        act = (Hu[:, :-1] > 0).any(axis=0)
        k = int(act.sum()) + 1
        if len(pool) < k + 2:
            break
        A = np.concatenate([Hu[:, :-1][:, act], Hu[:, -1:]], axis=1)
        best: np.ndarray | None = None
        for _ in range(trials):
            sub = rng.choice(len(pool), size=min(len(pool), k + 1), replace=False)
            _, _, Vt = svd(A[sub] / nrm[sub, None], full_matrices=False)
            inl = np.abs(A @ Vt[-1]) / nrm <= 1e-7
            if best is None or inl.sum() > best.sum():
                best = inl
        if best is None or best.sum() < k + 2:
            break
        sel = np.flatnonzero(best)
        cov = np.asarray((Hu[sel, :-1] > 0).any(axis=0))
        Asel = np.concatenate([Hu[sel][:, :-1][:, cov], Hu[sel, -1:]], axis=1)
        _, S, Vt = svd(Asel / nrm[sel, None], full_matrices=False)
        v = Vt[-1]
        w = np.zeros(Hu.shape[1] - 1)
        w[cov] = v[:-1]
        w, b = _unit(w, float(v[-1]))
        hits, misses = crossing_hits(w[None, :], np.array([b]), lines, layers)
        members = tuple(pool[i] for i in sel)
        gap = float(S[-2] / S[-1]) if S.size > 1 and S[-1] > 0 else np.inf
        log.debug("unexplained witnesses: %d of %d on one hyperplane (coverage %d/%d, gap %.1e, %d hits, %d misses)",
                  len(sel), len(pool), int(cov.sum()), cov.size, gap, hits[0], misses[0])
        if gap < 1e3 or hits[0] < 3 or (4 * misses[0] > hits[0] and cov.all()):
            break
        found.append(NeuronRow(w=w, b=b, members=members, coverage=cov, residual=float(S[-1]), gap=gap))
        taken = set(members)
        pool = [i for i in pool if i not in taken]
    return found
