"""A last-hidden-layer neuron that is off only rarely (attack-notes §4; the always-on solve of
:mod:`relux.attack.always_on`, for a neuron that does switch off somewhere).

A neuron off at one input in 10^4 is crossed by few search lines, so no witness group finds it. Where
it is on, its term ``A (r·h + β)`` is affine in the layer input ``h``: the last-layer fit leaves
``out ⊗ w`` (``= A ⊗ r`` up to scale) in its affine part, as an always-on neuron would. But its row
leaves the dual cone of the reachable inputs, and its bias matters. Where it is off, ``f`` differs from
the fit ``f̂`` by exactly

    g(x) = f(x) - f̂(x) = -out (w·h(x) + t),   out t = A β,

so one query at an input where it is off gives ``t``: ``t = -(g·out)/|out|² - w·h(x)``. The inputs most
likely off are those with the most extreme ``w·h`` (chosen with the prefix, before any query).
Several of them must agree on ``t``, and ``g`` must point along ``out``; the side they lie on gives the
row's orientation. Then the neuron is an ordinary one, ``out ReLU(w·h + t)`` (or its negation), with
every parameter exact.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from relux.attack import prefix as pfx
from relux.oracle.base import FloatArray, QueryFn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RarelyOff:
    """Outcome of :func:`locate_rarely_off`: the neuron ``out ReLU(w·h + b)`` and the flips of the
    other rows that go with it (``candidate``: which rank-one leftover it came from)."""

    ok: bool
    reason: str
    flips: np.ndarray
    w: FloatArray
    b: float
    out: FloatArray
    off_points: int
    queries: int
    candidate: int = -1


def locate_rarely_off(
    query: QueryFn,
    layers: Sequence[pfx.Layer],
    predict: Callable[[FloatArray], FloatArray],
    candidates: Sequence[tuple[np.ndarray, FloatArray, FloatArray]],
    d0: int,
    scale: float,
    rng: np.random.Generator,
    n_pool: int = 65536,
    n_probe: int = 64,
    rel_tol: float = 1e-7,
) -> RarelyOff:
    """The bias (and orientation) of a neuron rarely off, for each rank-one leftover ``(flips, w, out)``
    of ``candidates`` in turn (see the module docstring); the first that the oracle confirms wins.

    ``predict``: the last-layer fit ``f̂`` (exact wherever the neuron is on); ``layers``: the prefix,
    whose outputs ``h`` the rows act on. A pool of ``n_pool`` inputs ``N(0, scale²)`` is drawn, and the
    ``n_probe`` with the lowest and highest ``w·h`` are queried. An input counts as off when ``|g|``
    exceeds ``rel_tol`` of ``max |f|`` (the caller sets it well above the fit's own misfit) and ``g`` is
    parallel to ``out`` (cosine 1 - 1e-6); all of them, two at least, must agree on ``t`` (to ``1e-7``
    of the spread of ``w·h``), and every probed input must be on (fitted within ``rel_tol``) or off as
    the found neuron says. With one output every leftover is rank one and the cosine test says
    nothing: the candidates are then only the smallest leftovers, and the bias test alone decides."""
    n_pool = max(2 * n_probe, min(n_pool, 2**25 // max(d0, 1)))
    X = rng.normal(0.0, scale, size=(n_pool, d0))
    _, H = pfx.forward(layers, X)
    asked: dict[int, FloatArray] = {}
    reason = "no rank-one leftover to place"
    for ci, (flips, w, out) in enumerate(candidates):
        on2 = float(out @ out)
        if on2 == 0:
            continue
        s = H @ w
        order = np.argsort(s)
        probe = np.unique(np.concatenate([order[:n_probe], order[-n_probe:]]))
        new = [int(i) for i in probe if int(i) not in asked]
        if new:
            Yn = query(X[new])
            asked.update({i: Yn[j] for j, i in enumerate(new)})
        Y = np.stack([asked[int(i)] for i in probe])
        g = Y - predict(X[probe])
        yscale = max(float(np.max(np.abs(Y))), np.finfo(float).tiny)
        gn = np.linalg.norm(g, axis=1)
        cos = np.abs(g @ out) / np.maximum(gn * np.sqrt(on2), np.finfo(float).tiny)
        off = (gn > rel_tol * yscale) & (cos >= 1 - 1e-6)
        if not off.any():
            reason = "no probed input showed the neuron off"
            continue
        t = -(g[off] @ out) / on2 - s[probe][off]
        spread = float(np.std(s)) + 1e-300
        # the largest group of off inputs agreeing on t
        best_n, best_t = 0, 0.0
        for v in t:
            close = np.abs(t - v) <= 1e-7 * (spread + abs(v))
            if int(close.sum()) > best_n:
                best_n, best_t = int(close.sum()), float(np.median(t[close]))
        if best_n < 2 or best_n < int(off.sum()):
            # one neuron off gives one bias at every input where it is off
            reason = f"the {int(off.sum())} probed input(s) off do not agree on a bias ({best_n} do)"
            continue
        side = np.sign(s[probe][off] + best_t)
        if np.any(side == 0) or np.unique(side).size != 1:
            reason = "the probed inputs off lie on both sides of the found boundary"
            continue
        sg = -float(side[0])  # off where sg (w·h + t) < 0
        predicted_off = sg * (s[probe] + best_t) < 0
        # every probed input predicted off must show it, and every other must fit (a miss there is
        # another error of the fit, which the bias read here would not explain)
        if np.any(predicted_off != off) or np.any(gn[~predicted_off] > rel_tol * yscale):
            reason = "the probed inputs are not on and off as the found boundary says"
            continue
        log.debug("rarely-off neuron: bias %.6g from %d inputs off (candidate %d)", best_t, best_n, ci)
        return RarelyOff(True, "", flips, sg * w, sg * best_t, sg * out, best_n, len(asked), ci)
    m = candidates[0][0].size if candidates else 0
    return RarelyOff(False, reason, np.zeros(m, dtype=bool), np.zeros(H.shape[1]), 0.0, np.zeros(0), 0, len(asked))
