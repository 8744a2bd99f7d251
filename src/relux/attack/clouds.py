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


def _pair_step(layers: Sequence[Layer], i: int, j: int, x: FloatArray, cols: np.ndarray
               ) -> tuple[FloatArray, FloatArray, FloatArray, np.ndarray]:
    """From ``x`` (``j`` on there), one linear step per coordinate of ``cols`` along its gradient less any part
    that lowers ``j``, to 1.05, 1.3, 2 and 3 times its linear zero crossing: the candidate points
    (``cols.size x 4 x d``), the coordinate's and ``j``'s pre-activations there (``cols.size x 4`` each), and
    which coordinates are off at ``x`` and have a step that raises them (the others' candidates are ``x``)."""
    _, pj = pfx.jacobian(layers[: i + 1], x)
    zs, _ = pfx.forward(layers[: i + 1], x[None, :])
    zc, gj = zs[i - 1][0, cols], pj[i][j]
    G = pj[i - 1][cols]
    dots = G @ gj
    U = G - np.minimum(dots, 0.0)[:, None] * gj[None, :] / max(float(gj @ gj), 1e-300)
    rate = np.einsum("cd,cd->c", G, U)
    moves = (rate > 0) & (zc < 0)
    t = np.multiply.outer(np.where(moves, -zc / np.where(moves, rate, 1.0), 0.0), np.array([1.05, 1.3, 2.0, 3.0]))
    C3 = x[None, None, :] + t[:, :, None] * U[:, None, :]
    zc3 = np.full((cols.size, 4), -np.inf)
    zj3 = np.full((cols.size, 4), -np.inf)
    if moves.any():  # only the coordinates that move are evaluated
        zz, _ = pfx.forward(layers[: i + 1], C3[moves].reshape(-1, x.shape[0]))
        k = int(moves.sum())
        zc3[moves] = zz[i - 1][np.arange(4 * k), np.repeat(cols[moves], 4)].reshape(-1, 4)
        zj3[moves] = zz[i][:, j].reshape(-1, 4)
    return C3, zc3, zj3, moves


def pair_points(
    layers: Sequence[Layer], i: int, j: int, seeds: FloatArray, cols: np.ndarray, rng: np.random.Generator,
    tries: int = 4, steps: int = 1,
) -> FloatArray:
    """Inputs where neuron ``j`` of hidden layer ``i`` and each input coordinate in ``cols`` (neurons of layer
    ``i - 1``) are on together, reached from points ``seeds`` where ``j`` is on (no queries): from up to
    ``tries`` seeds, a step along the coordinate's gradient (less any part that lowers ``j``) to 1.05 to 3
    times its linear zero crossing; up to two points per coordinate where both are on. With ``steps > 1``, a
    coordinate whose step did not get there goes on from the candidate where it is highest with ``j`` still
    on, its gradient taken there afresh, up to ``steps`` steps in all: other boundaries on the way bend the
    path, and a coordinate seldom on with ``j`` may be on with it only some way off."""
    out: list[FloatArray] = []
    have = np.zeros(cols.size, dtype=int)
    for x in seeds[rng.permutation(seeds.shape[0])[:tries]]:
        pos: dict[int, FloatArray] = {}  # where each coordinate's path goes on from (after the first step)
        for step in range(steps):
            todo = [k for k in range(cols.size) if have[k] < 2 and (step == 0 or k in pos)]
            if not todo:
                break
            # the first step starts every coordinate at x (one Jacobian); later ones each at its own point
            starts = [(x, np.array(todo))] if step == 0 else [(pos[k], np.array([k])) for k in todo]
            pos = {}
            for x0, ks in starts:
                C3, zc3, zj3, moves = _pair_step(layers, i, j, x0, cols[ks])
                both = (zj3 > 0) & (zc3 > 0) & moves[:, None]
                for r, k in enumerate(ks):
                    take = np.flatnonzero(both[r])[: 2 - have[k]]
                    if take.size:
                        out.append(C3[r, take])
                        have[k] += take.size
                    elif moves[r] and (zj3[r] > 0).any():
                        on = np.flatnonzero(zj3[r] > 0)
                        pos[int(k)] = C3[r, on[np.argmax(zc3[r, on])]]
    return np.concatenate(out) if out else np.zeros((0, seeds.shape[1]))
