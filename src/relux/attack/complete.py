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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from relux.attack import prefix as pfx
from relux.attack.critical import LineKinks, find_kinks
from relux.oracle.base import FloatArray

log = logging.getLogger(__name__)
QueryFn = Callable[[FloatArray], FloatArray]


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


def _walk(
    layers: Sequence[pfx.Layer], x: FloatArray, n: FloatArray, m: int, hold: Sequence[int], scale: float
) -> FloatArray | None:
    """From ``x``, a step along the boundary (orthogonal to ``n``) that raises coordinate ``m`` until it
    is on, holding the pre-activations of the coordinates ``hold`` (the other unknown ones) fixed."""
    _, jacs = pfx.jacobian(layers, x)
    g = jacs[-1][m]
    B = np.concatenate([n[None, :], jacs[-1][list(hold)]]) if len(hold) else n[None, :]
    Q, _ = np.linalg.qr(B.T)
    d = g - Q @ (Q.T @ g)
    if float(np.linalg.norm(d)) <= 1e-8 * float(np.linalg.norm(g)):
        d = g - (g @ n) * n  # cannot hold them all: move anyway, the kink test checks the pattern
    nd = float(np.linalg.norm(d))
    if nd == 0.0:
        return None
    d = d / nd
    step = 1e-3 * scale
    for _ in range(60):
        Zs, _ = pfx.forward(layers, (x + step * d)[None, :])
        if Zs[-1][0, m] > 0:
            return np.asarray(step * d)
        step *= 1.4
    return None


def _crossing(
    query: QueryFn, x: FloatArray, n: FloatArray, half: float, n_grid: int, rel_tol: float
) -> tuple[LineKinks, int]:
    lines, info = find_kinks(query, x[None, :], n[None, :], -half, half, n_grid, rel_tol)
    return lines[0], info.queries


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
) -> Completion:
    """Fill the weights of ``(w, b)`` on the coordinates outside ``coverage`` (see the module text).

    ``anchors`` are points on the neuron's boundary (its witnesses). ``scale`` is the input scale
    times ``sqrt(d0)``. Coordinates never reached stay zero and are reported in ``reasons``.
    """
    w = np.array(w, dtype=float)
    cov = np.array(coverage, dtype=bool)
    filled: list[int] = []
    reasons: dict[int, str] = {}
    queries = 0
    for m in (int(i) for i in np.flatnonzero(~cov)):
        done = False
        reason = "no anchor from which coordinate could be switched on along the boundary"
        for x in anchors[:3]:
            M, _ = pfx.jacobian(layers, x)
            nrm = w @ M
            nn = float(np.linalg.norm(nrm))
            if nn == 0.0:
                continue
            nrm = nrm / nn
            hold = [int(k) for k in np.flatnonzero(~cov) if k != m]
            step = _walk(layers, x, nrm, m, hold[: max(0, x.size - 2)], scale)
            if step is None:
                continue
            cands: list[float] = []
            checks: list[LineKinks] = []
            for f in (1.5, 3.0):
                p = x + f * step
                line, qn = _crossing(query, p, nrm, 0.5 * scale, n_grid, rel_tol)
                queries += qn
                checks.append(line)
                if f != 1.5:
                    continue
                for xk in line.points():
                    if _prefix_kink(layers, xk):
                        continue
                    _, H = pfx.forward(layers, xk[None, :])
                    h = H[0]
                    others = ~cov.copy()
                    others[m] = False
                    if h[m] <= 0 or np.any(h[others] > 0):
                        continue
                    cands.append(float(-(w @ h + b) / h[m]))
            if not cands:
                reason = "no kink of an unknown neuron where the coordinate is on"
                continue
            # The second crossing must be a found kink for the right value of w_m.
            best, best_err = None, np.inf
            for c in cands:
                wc = w.copy()
                wc[m] = c
                errs = []
                for xk in checks[1].points():
                    _, H = pfx.forward(layers, xk[None, :])
                    h = H[0]
                    errs.append(abs(float(wc @ h + b)) / (float(np.linalg.norm(wc) * np.linalg.norm(h)) + abs(b)))
                e = min(errs) if errs else np.inf
                if e < best_err:
                    best, best_err = c, e
            if best is not None and best_err <= 1e-7:
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
