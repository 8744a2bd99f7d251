"""Inputs near given ones, in a neuron's on-region, chosen with a model and no query (for the fits of
rarely active neurons: :mod:`relux.attack.refine_net`, :mod:`relux.attack.reread`,
:mod:`relux.attack.unseen_columns` and :mod:`relux.identifiability`; attack-notes §3)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from relux.attack import prefix as pfx
from relux.oracle.base import FloatArray

Layer = tuple[FloatArray, FloatArray]


def moved_copies(P: FloatArray, n: int, reach: float, shares: Sequence[float], rng: np.random.Generator) -> FloatArray:
    """``n`` copies of rows of ``P`` drawn at random, each moved by a random step whose length is one of
    ``shares`` (drawn at random) times ``reach``: a cloud about known points at several scales."""
    sig = reach * rng.choice(shares, size=n)
    C = P[rng.integers(P.shape[0], size=n)]
    out: FloatArray = C + sig[:, None] * rng.normal(size=C.shape) / np.sqrt(C.shape[1])
    return out


def pair_points(
    layers: Sequence[Layer], i: int, j: int, seeds: FloatArray, cols: np.ndarray, rng: np.random.Generator,
    tries: int = 4,
) -> FloatArray:
    """Inputs where neuron ``j`` of hidden layer ``i`` and each input coordinate in ``cols`` (neurons of layer
    ``i - 1``) are on together, reached from points ``seeds`` where ``j`` is on (no queries): from up to
    ``tries`` seeds, a step along the coordinate's gradient (less any part that lowers ``j``) to 1.05 to 3
    times its linear zero crossing; up to two points per coordinate where both are on."""
    out: list[FloatArray] = []
    have = np.zeros(cols.size, dtype=int)
    for x in seeds[rng.permutation(seeds.shape[0])[:tries]]:
        _, pj = pfx.jacobian(layers[: i + 1], x)
        zs, _ = pfx.forward(layers[: i + 1], x[None, :])
        zc, gj = zs[i - 1][0, cols], pj[i][j]
        G = pj[i - 1][cols]
        # less the part of the step that lowers neuron j (in this linear region)
        dots = G @ gj
        U = G - np.minimum(dots, 0.0)[:, None] * gj[None, :] / max(float(gj @ gj), 1e-300)
        rate = np.einsum("cd,cd->c", G, U)
        ok = (rate > 0) & (zc < 0) & (have < 2)
        if not ok.any():
            continue
        idx = np.flatnonzero(ok)
        t = np.multiply.outer(-zc[idx] / rate[idx], np.array([1.05, 1.3, 2.0, 3.0]))
        C3 = x[None, None, :] + t[:, :, None] * U[idx][:, None, :]
        zz, _ = pfx.forward(layers[: i + 1], C3.reshape(-1, x.shape[0]))
        both = ((zz[i][:, j] > 0) & (zz[i - 1][np.arange(4 * idx.size), np.repeat(cols[idx], 4)] > 0)).reshape(-1, 4)
        for r, k in enumerate(idx):
            take = np.flatnonzero(both[r])[: 2 - have[k]]
            if take.size:
                out.append(C3[r, take])
                have[k] += take.size
    return np.concatenate(out) if out else np.zeros((0, seeds.shape[1]))
