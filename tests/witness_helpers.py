"""Exact synthetic witnesses of known neurons, shared by test_shadowed.py and test_grow_rows.py."""

from __future__ import annotations

import numpy as np

from relux.attack.witnesses import Witness


def exact_witness(w: np.ndarray, b: float, active: np.ndarray, rng: np.random.Generator,
                  rank: int | None = None) -> Witness:
    """An exact witness of the neuron ``(w, b)`` whose layer input is on at ``active`` only, and
    ``w·h + b = 0`` there. ``rank`` None: the measurement shows ``w`` on those coordinates (up to
    scale, full rank). ``rank`` given: it is seen through a random space of control of that
    dimension (fewer than the active coordinates: the partial signature alone does not determine
    ``w`` there)."""
    idx = np.flatnonzero(active)
    h = np.zeros(w.size)
    h[idx] = rng.uniform(0.01, 0.2, size=idx.size)
    # the last active coordinate puts the point on the boundary
    k = idx[-1]
    h[k] = 0.0
    h[k] = -(w @ h + b) / w[k]
    if rank is None:
        A = np.eye(w.size)[idx]
        v = w[idx]
    else:
        A = np.zeros((rank, w.size))
        A[:, idx] = rng.normal(size=(rank, idx.size))
        v = A @ w
    wp = np.where(active, w, 0.0)
    n = float(np.linalg.norm(np.append(wp, b)))
    return Witness(x=h.copy(), active=active.copy(), w=wp / n, b=b / n,
                   full_rank=rank is None or rank >= idx.size, A_ctrl=A, v_ctrl=v / np.linalg.norm(v), h=h,
                   rank_ratio=0.0, line=0, normal=np.zeros(w.size))


def positive_neuron(rng: np.random.Generator, d: int) -> tuple[np.ndarray, float]:
    """Positive weights and a bias below minus their sum over a fifth: every coordinate set reaches
    the boundary with positive inputs (so that :func:`exact_witness` can place its point)."""
    return rng.uniform(0.3, 1.5, size=d), float(rng.uniform(-3.0, -1.5))
