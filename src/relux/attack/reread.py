"""Rows of rarely active last-layer neurons read again from the output (attack-notes §3 on rarely active
neurons and §5 on the final layer: the last hidden layer's pre-activations are read off the logits, one
neuron at a time).

A last-layer neuron on at a small share of inputs is extracted from few witnesses, and its weights on
coordinates that are seldom on with it are completed or fitted where few points show them; they can be
wrong on a region the self-check still finds (digits 64-40x4-10: three such rows, each right on all but
1e-5 of inputs). Fitting them with the rest of the network at fixed activation patterns fails there: a
wrong row has a wrong boundary, and points near it have the wrong pattern.

Here the prefix (every hidden layer before the last) and the other last-layer rows are taken as right.
Where neuron ``j`` is on, ``f(x)`` minus the model's output without ``j`` is ``c_j z_j(x)``: one direction
``c_j`` (its output column) times its pre-activation. At inputs spread over its on-region (moved copies of
the points where it is on, and steps that switch each input coordinate on with it), those differences form
a rank-one matrix whose factors are the column and the values ``z_j(x)``, observed from ``f`` itself, with
its true pattern; the row is then a linear least-squares fit of ``z_j`` on the layer's inputs. Inputs
where another row is wrong too leave the rank-one structure and are set aside.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from relux.attack import prefix as pfx
from relux.attack.clouds import moved_copies, pair_points
from relux.attack.linalg import svd
from relux.oracle.base import FloatArray, QueryFn

log = logging.getLogger(__name__)
Layer = tuple[FloatArray, FloatArray]

#: last-layer neurons on at most at this share of the pool are read again
MAX_SHARE = 0.05
#: multiply-adds spent drawing random inputs where rare rows are on (no query): 2^32 is about a second
DRAW_FLOPS = 2**32
#: an input counts as explained by one neuron when its difference leaves that direction by at most this
#: relative share (others right to rounding: 1e-13 on the victims of the deep suite)
RANK_ONE_TOL = 1e-6
#: random inputs drawn where a rare row is on, per input it spends at first: the spares give each input
#: coordinate :data:`PER_COORD` inputs where it is on too
DRAW_SPARE = 16
PER_COORD = 4
#: steps of the paths that switch each input coordinate on together with a rare row (clouds.pair_points)
PAIR_STEPS = 8
#: starting points of those paths
PAIR_TRIES = 32


@dataclass(frozen=True)
class Reread:
    """What :func:`reread_rare_rows` did: rows replaced, and why each rare row it tried was left."""

    replaced: tuple[int, ...]
    queries: int
    reasons: dict[int, str] = field(default_factory=dict)


def _drawn_on(prefix: Sequence[Layer], W: FloatArray, b: FloatArray, rows: np.ndarray, n: int, d0: int, scale: float,
              rng: np.random.Generator, max_draw: int) -> dict[int, FloatArray]:
    """Per row of ``rows``, up to ``n`` random inputs (N(0, scale^2)) where the model's row ``(W, b)`` behind
    ``prefix`` is on, from at most ``max_draw`` draws (and :data:`DRAW_FLOPS` multiply-adds of the prefix)."""
    cost = d0 * (prefix[0][0].shape[0] if prefix else 1) + sum(W_.size for W_, _ in prefix[1:]) + W.size
    total = min(max_draw, max(DRAW_FLOPS // max(cost, 1), 1024))
    got: dict[int, list[FloatArray]] = {int(j): [] for j in rows}
    have = {int(j): 0 for j in rows}
    batch = min(32768, total)
    for _ in range(max(total // batch, 1)):
        if all(v >= n for v in have.values()):
            break
        X = rng.normal(0.0, scale, size=(batch, d0))
        Z = (pfx.forward(prefix, X)[1] if prefix else X) @ W[rows].T + b[rows]
        for k, j in enumerate(rows):
            if have[int(j)] < n:
                on = X[Z[:, k] > 0][: n - have[int(j)]]
                got[int(j)].append(on)
                have[int(j)] += on.shape[0]
    return {j: np.concatenate(v) if v else np.zeros((0, d0)) for j, v in got.items()}


def _covering(D: FloatArray, prefix: Sequence[Layer], n: int, per: int) -> FloatArray:
    """The first ``n`` inputs of ``D``, and for each coordinate of the layer's input (behind ``prefix``) up
    to ``per`` more of ``D`` where it is on: a weight on a coordinate rarely on with the neuron is seen only
    at such inputs (30-15-15-15-1 victim 5: one on at 1.4% of its on-region, none among the first 64)."""
    if D.shape[0] <= n or not prefix:
        return D[:n]
    H = pfx.forward(prefix, D)[1]
    take = np.zeros(D.shape[0], dtype=bool)
    take[:n] = True
    for c in range(H.shape[1]):
        more = np.flatnonzero((H[:, c] > 0) & ~take)
        need = per - int(np.sum(take & (H[:, c] > 0)))
        if need > 0:
            take[more[:need]] = True
    return D[take]


def reread_rare_rows(
    query: QueryFn,
    layers: Sequence[Layer],
    pool: FloatArray,
    reach: float,
    rng: np.random.Generator,
    tol: float,
    hints: FloatArray | None = None,
    max_share: float = MAX_SHARE,
    max_draw: int = 2**22,
) -> tuple[list[Layer], Reread]:
    """``layers`` (hidden layers then the output layer) with the rows of last-layer neurons on at most at
    ``max_share`` of the inputs ``pool`` (but at some) read again from the output (module docstring). A row
    is replaced only where the inputs determine it (its coordinates on at enough of them), the fit explains
    ``z_j`` to ``tol`` (relative) and the new row misses ``f`` less at those inputs. ``reach``: the inputs'
    typical norm. Spends per such neuron ``4 (fan-in + 1)`` queries at random inputs where the model has it
    on, up to :data:`PER_COORD` more per input coordinate (drawn where that coordinate is on too), as many
    near the pool's points where it is on, up to two per input coordinate (paths of up to
    :data:`PAIR_STEPS` steps switching it on with the neuron, from :data:`PAIR_TRIES` starts: no query, but
    a Jacobian of the prefix per step), and 40 per bisection (at most 16); and nine per hint, once.
    ``hints``: inputs where an earlier model disagreed with ``f`` (where a wrong row shows), used with moved
    copies of them as well. Up to ``max_draw`` random inputs (fewer when the prefix is wide) are drawn to
    find where each such row is on without a query."""
    out = [(np.array(W, dtype=float), np.array(b, dtype=float)) for W, b in layers]
    prefix, (W, b), (Wo, bo) = out[:-2], out[-2], out[-1]
    Hp = pfx.forward(prefix, pool)[1] if prefix else pool
    Zp = Hp @ W.T + b
    share = np.mean(Zp > 0, axis=0)
    rare = np.flatnonzero((share > 0) & (share <= max_share))
    replaced: list[int] = []
    reasons: dict[int, str] = {}
    spent = 0
    if not rare.size:
        return out, Reread((), 0)
    Yn = np.zeros((0, Wo.shape[0]))
    need = 4 * (W.shape[1] + 1)
    near = np.zeros((0, pool.shape[1]))
    if hints is not None and hints.size:
        Hn = hints.reshape(-1, pool.shape[1])
        near = np.repeat(Hn, 8, axis=0)
        sig = reach * rng.choice([0.001, 0.003, 0.01, 0.03], size=near.shape[0])
        near = np.concatenate([Hn, near + sig[:, None] * rng.normal(size=near.shape) / np.sqrt(near.shape[1])])
        Yn = query(near)
        spent += near.shape[0]
    drawn = _drawn_on(prefix, W, b, rare, DRAW_SPARE * need, pool.shape[1], reach / np.sqrt(pool.shape[1]), rng,
                      max_draw)
    for j in rare:
        seeds = pool[Zp[:, j] > 0]
        C = moved_copies(seeds, need, reach, (0.003, 0.01, 0.03, 0.1), rng)
        # random inputs where the model has it on, wherever in its on-region (a wrong weight shows far from
        # the witnesses the row came from), with every input coordinate on at some of them
        C = np.concatenate([_covering(drawn[int(j)], prefix, need, PER_COORD), C])
        if prefix:
            # from the pool's points and the draws where it is on (the draws reach further into its region)
            starts = np.concatenate([seeds, drawn[int(j)]])
            C = np.concatenate([C, pair_points([*prefix, (W, b), (Wo, bo)], len(prefix), int(j), starts,
                                                np.arange(W.shape[1]), rng, tries=PAIR_TRIES, steps=PAIR_STEPS)])
        Y = np.concatenate([query(C), Yn]) if near.shape[0] else query(C)
        spent += C.shape[0]
        C = np.concatenate([C, near])
        scale = max(float(np.max(np.abs(Y))), np.finfo(float).tiny)

        def residual(P: FloatArray, YP: FloatArray, j: int = int(j)) -> tuple[FloatArray, FloatArray]:
            """The layer's inputs at ``P`` and ``f`` minus the model without neuron ``j`` there."""
            HP = pfx.forward(prefix, P)[1] if prefix else P
            A = np.maximum(HP @ W.T + b, 0.0)
            A[:, j] = 0.0
            return HP, YP - (A @ Wo.T + bo)

        H, R = residual(C, Y)
        # what the other rows leave (their own imprecision): the model's misses where it has the neuron far off
        far = H @ W[j] + b[j] < -0.1 * float(np.std(H @ W[j]) + abs(b[j]))
        floor = 10.0 * float(np.quantile(np.linalg.norm(R[far], axis=1), 0.9)) if far.sum() >= 8 else 0.0
        thr = max(tol * scale, floor)
        on = np.linalg.norm(R, axis=1) > thr
        # Inputs where the model has it on and f shows it off: its boundary is wrong there. Inputs where f
        # shows it on next to them (bisection towards the nearest input where it is on) show the weights
        # that moved it.
        wrong = np.flatnonzero(~on & (H @ W[j] + b[j] > 0))[:16]
        if wrong.size and on.any():
            ins = C[on][:2048]
            dist = (C[wrong] ** 2).sum(axis=1)[:, None] - 2.0 * C[wrong] @ ins.T + (ins ** 2).sum(axis=1)[None, :]
            near_on = ins[np.argmin(dist, axis=1)]
            lo, hi = near_on, C[wrong]
            for _ in range(40):
                mid = 0.5 * (lo + hi)
                _, Rm = residual(mid, query(mid))
                spent += mid.shape[0]
                up = np.linalg.norm(Rm, axis=1) > thr
                lo, hi = np.where(up[:, None], mid, lo), np.where(up[:, None], hi, mid)
            extra = np.concatenate([lo, lo + 0.05 * (lo - hi) / np.maximum(
                np.linalg.norm(lo - hi, axis=1, keepdims=True), np.finfo(float).tiny) * reach * 1e-3])
            Ye = query(extra)
            spent += extra.shape[0]
            He, Re = residual(extra, Ye)
            H, R = np.concatenate([H, He]), np.concatenate([R, Re])
            on = np.linalg.norm(R, axis=1) > thr
        if on.sum() < W.shape[1] + 2:
            reasons[int(j)] = f"on at {int(on.sum())} of {H.shape[0]} inputs near its on-region"
            continue
        _, _, Vt = svd(R[on], full_matrices=False)
        c = Vt[0] * (1.0 if float(Vt[0] @ Wo[:, j]) >= 0 else -1.0)
        z = R[on] @ c
        off_dir = np.linalg.norm(R[on] - np.outer(z, c), axis=1) / np.linalg.norm(R[on], axis=1)
        one = (off_dir * np.linalg.norm(R[on], axis=1) <= np.maximum(RANK_ONE_TOL * np.linalg.norm(R[on], axis=1),
                                                                         floor)) & (z > 0)
        Hj = H[on][one]
        seen = np.any(Hj > 0, axis=0)
        if one.sum() < int(seen.sum()) + 2:
            reasons[int(j)] = f"explained by it alone at {int(one.sum())} inputs, too few for {int(seen.sum())} weights"
            continue
        M = np.concatenate([Hj[:, seen], np.ones((Hj.shape[0], 1))], axis=1)
        rhs = z[one]
        sol, *_ = np.linalg.lstsq(M, rhs, rcond=None)
        sv = svd(M, compute_uv=False)
        fit = float(np.max(np.abs(M @ sol - rhs))) / max(float(np.max(np.abs(rhs))), np.finfo(float).tiny)
        if sv[-1] <= 1e-9 * sv[0] or fit > max(tol, floor / max(float(np.max(np.abs(rhs))), np.finfo(float).tiny)):
            reasons[int(j)] = f"the fit of its pre-activation misses by {fit:.1e} (conditioning {sv[-1] / sv[0]:.1e})"
            continue
        # the column's norm is kept (a neuron's scale is free): z and c are rescaled together
        a = float(np.linalg.norm(Wo[:, j])) or 1.0
        w_new = W[j].copy()
        w_new[seen] = sol[:-1] / a
        b_new = float(sol[-1]) / a
        # judged where it alone explains f's difference (elsewhere another row's miss would dominate)
        Ro, Ho = R[on][one], H[on][one]
        before = np.max(np.abs(Ro - np.outer(np.maximum(Ho @ W[j] + b[j], 0.0), Wo[:, j])))
        after = np.max(np.abs(Ro - np.outer(np.maximum(Ho @ w_new + b_new, 0.0), a * c)))
        # and it must not be on where f shows it off more often than before
        stray = int(np.sum(~on & (H @ w_new + b_new > 0)))
        stray0 = int(np.sum(~on & (H @ W[j] + b[j] > 0)))
        if not after < before or stray > stray0:
            reasons[int(j)] = (f"read again, it misses more ({after / scale:.1e} against {before / scale:.1e}, on at "
                               f"{stray} inputs where f shows it off, against {stray0})")
            continue
        W[j], b[j], Wo[:, j] = w_new, b_new, a * c
        replaced.append(int(j))
    return [*prefix, (W, b), (Wo, bo)], Reread(tuple(replaced), spent, reasons)
