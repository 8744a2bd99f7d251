"""Following one neuron's boundary across the regions of the known prefix (attack-notes §3, rank
deficiency; LSELBP26).

Where the space of control is smaller than the layer input, one witness cannot determine a row, and
witnesses of different neurons cannot be told apart by their partial signatures. The boundary of a
neuron is continuous, though: from a witness, step along its local hyperplane across a boundary of
the prefix (preferably one that switches on a layer-input coordinate not seen yet), and search a
short line along the old normal for the kink nearest to the predicted position. That kink is the same
neuron in a new region, with a new active set; the chain of such witnesses is unified into one row.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from relux.attack import prefix as pfx
from relux.attack.config import ExtractionConfig
from relux.attack.unify import unify
from relux.attack.witnesses import Witness, collect_witnesses
from relux.oracle.base import FloatArray, QueryFn


def _next_point(
    layers: Sequence[pfx.Layer], wt: Witness, seen: np.ndarray, rng: np.random.Generator
) -> tuple[FloatArray, float] | None:
    """A point on the (local) hyperplane of ``wt`` just past the boundary of a layer-input neuron that
    is off at ``wt`` (one not in ``seen`` if possible), and the distance travelled."""
    if not layers:
        return None  # the first layer has no prefix regions to cross
    Zs, _ = pfx.forward(layers, wt.x[None, :])
    _, pre_jacs = pfx.jacobian(layers, wt.x)
    z = Zs[-1][0]
    G = pre_jacs[-1]
    n = wt.normal
    off = np.flatnonzero(z <= 0)
    if off.size == 0:
        return None
    prefer = off[~seen[off]] if (~seen[off]).any() else off
    best: tuple[float, FloatArray] | None = None
    for m in rng.permutation(prefer)[:8]:
        g = G[m]
        d = g - (g @ n) * n
        nd = float(np.linalg.norm(d))
        if nd == 0:
            continue
        d /= nd
        rate = float(g @ d)
        if rate <= 0:
            continue
        dist = float(-z[m]) / rate
        if best is None or dist < best[0]:
            best = (dist, d)
    if best is None:
        return None
    dist, d = best
    step = 1.25 * dist + 1e-9
    return wt.x + step * d, step


def trace_neuron(
    query: QueryFn,
    layers: Sequence[pfx.Layer],
    seed: Witness,
    d0: int,
    steps: int,
    cfg: ExtractionConfig,
    rng: np.random.Generator,
    rel_tol: float,
) -> list[Witness]:
    """Witnesses of the neuron of ``seed`` in up to ``steps`` further regions of the prefix."""
    chain = [seed]
    seen = seed.active.copy()
    cur = seed
    scale = cfg.input_scale * float(np.sqrt(d0))
    failures = 0
    for _ in range(steps):
        if seen.all() and len(chain) >= 3:
            break
        nxt = _next_point(layers, cur, seen, rng)
        cand: Witness | None = None
        if nxt is not None:
            p, travelled = nxt
            # Search along the old normal; the boundary bends by at most the distance travelled.
            t_half = max(travelled, 1e-6 * scale) / scale
            found, _ = collect_witnesses(query, layers, d0, 0, 24, cfg, rng, rel_tol,
                                         lines_given=(p[None, :], cur.normal[None, :]), t_range=t_half)
            if found:
                cand = min(found, key=lambda w: float(np.linalg.norm(w.x - p)))
                trial = chain + [cand]
                if unify(trial, list(range(len(trial)))).residual > 1e-9:
                    cand = None  # not the same neuron (or a poor measurement)
        if cand is None:
            failures += 1
            if failures > 4:
                break
            cur = chain[int(rng.integers(len(chain)))]  # try again from another witness of the chain
            continue
        chain.append(cand)
        seen |= cand.active
        cur = cand
    return chain
