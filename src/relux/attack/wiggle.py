"""Sign recovery for a hidden layer followed by more hidden layers (CM24 §4, SOE and neuron wiggle).

At a point ``x`` where the layer is controllable (``Ŵ_i M_x`` has full row rank ``d_i``), the
input direction ``δ_j = (Ŵ_i M_x)^+ e_j`` moves the estimated pre-activation ``ẑ_j`` and no other
neuron of the layer. The output then moves if and only if neuron ``j`` is active at ``x`` (and
reaches the output), so one query per neuron tells on which side of its hyperplane it is on: the
side where ``ẑ_j`` has the sign ``s_j``. Points are built inside the region where the whole prefix is
active (an LP), where controllability is most likely. Without controllability the least-squares
direction still moves the other neurons a little (the CM24 wiggle), and the confidence drops.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import linprog

from relux.attack import prefix as pfx
from relux.oracle.base import FloatArray

QueryFn = Callable[[FloatArray], FloatArray]


@dataclass(frozen=True)
class WiggleSigns:
    signs: FloatArray  # +1 / -1 per neuron
    confidence: FloatArray  # in [0, 1]
    decided: np.ndarray  # neurons with a clear verdict
    points: int
    controllable_points: int
    queries: int


def _all_active_point(layers: Sequence[pfx.Layer], d0: int, box: float) -> tuple[FloatArray, float] | None:
    """Maximise the smallest pre-activation of every known neuron with the whole prefix active (LP)."""
    if not layers:
        return None
    A = np.eye(d0)
    c = np.zeros(d0)
    rows_A, rows_c = [], []
    for W, b in layers:
        A, c = W @ A, W @ c + b
        nrm = np.linalg.norm(A, axis=1, keepdims=True)
        nrm[nrm == 0] = 1.0
        rows_A.append(A / nrm)
        rows_c.append(c / nrm[:, 0])
    GA = np.concatenate(rows_A)
    Gc = np.concatenate(rows_c)
    # variables (x, t): maximise t s.t. GA x + Gc >= t  <=>  -GA x + t <= Gc
    A_ub = np.concatenate([-GA, np.ones((GA.shape[0], 1))], axis=1)
    cost = np.zeros(d0 + 1)
    cost[-1] = -1.0
    bounds = [(-box, box)] * d0 + [(None, box)]
    res = linprog(cost, A_ub=A_ub, b_ub=Gc, bounds=bounds, method="highs")
    if not res.success or res.x[-1] <= 0:
        return None
    return res.x[:d0], float(res.x[-1])


def _candidates(layers: Sequence[pfx.Layer], d0: int, scale: float, n: int, rng: np.random.Generator) -> FloatArray:
    pts = [rng.normal(0.0, scale, size=(n, d0))]
    lp = _all_active_point(layers, d0, box=4.0 * scale * np.sqrt(d0))
    if lp is not None:
        x_c, margin = lp
        V = rng.normal(size=(n, d0))
        V /= np.linalg.norm(V, axis=1, keepdims=True)
        fr = rng.uniform(0.1, 0.9, size=n)
        out = []
        for v, f in zip(V, fr, strict=True):
            # Walk from the centre along v while every prefix neuron stays active.
            lo, hi = 0.0, 8.0 * margin + scale
            for _ in range(30):
                mid = 0.5 * (lo + hi)
                Zs, _ = pfx.forward(layers, (x_c + mid * v)[None, :])
                if all(np.all(Z > 0) for Z in Zs):
                    lo = mid
                else:
                    hi = mid
            out.append(x_c + f * lo * v)
        pts.append(np.asarray(out))
    return np.concatenate(pts)


def wiggle_signs(
    query: QueryFn,
    layers: Sequence[pfx.Layer],
    W_hat: FloatArray,
    b_hat: FloatArray,
    d0: int,
    scale: float,
    rng: np.random.Generator,
    max_points: int = 24,
) -> WiggleSigns:
    """Decide the sign of every row of ``(W_hat, b_hat)`` (the layer after ``layers``)."""
    m = W_hat.shape[0]
    C = _candidates(layers, d0, scale, 4 * max_points, rng)
    chosen: list[tuple[FloatArray, FloatArray, bool]] = []
    for x in C:
        M, _ = pfx.jacobian(layers, x)
        R = W_hat @ M
        sv = np.linalg.svd(R, compute_uv=False)
        ctrl = bool(sv.size == m and sv[-1] > 1e-8 * sv[0])
        chosen.append((x, R, ctrl))
    chosen.sort(key=lambda c: not c[2])
    pos = np.zeros(m, dtype=bool)  # the output moved while ẑ_j > 0
    neg = np.zeros(m, dtype=bool)  # the output moved while ẑ_j < 0
    pos_q = np.zeros(m, dtype=bool)  # ẑ_j > 0 was probed with a usable step
    neg_q = np.zeros(m, dtype=bool)
    n_pts = n_ctrl = queries = 0
    eps_m = float(np.finfo(float).eps)
    for x, R, ctrl in chosen[:max_points]:
        _, H = pfx.forward(layers, x[None, :])
        zhat = W_hat @ H[0] + b_hat
        P = np.linalg.pinv(R)  # (d0, m): column j moves ẑ_j by one unit
        eps = 0.5 * np.abs(zhat)
        if layers:
            Zs, _ = pfx.forward(layers, x[None, :])
            _, pre_jacs = pfx.jacobian(layers, x)
            for Z, J in zip(Zs, pre_jacs, strict=True):
                rate = np.abs(J @ P)  # (d_l, m): change of each prefix neuron per unit move
                with np.errstate(divide="ignore"):
                    lim = np.min(np.abs(Z[0])[:, None] / rate, axis=0)
                eps = np.minimum(eps, 0.5 * lim)
        step_len = eps * np.linalg.norm(P, axis=0)
        usable = step_len > 1e-9 * scale * np.sqrt(d0)
        if not usable.any():
            continue
        D = (P * (np.sign(zhat) * eps)[None, :]).T  # (m, d0): move away from the boundary
        Y = query(np.concatenate([x[None, :], x[None, :] + D[usable]]))
        queries += int(usable.sum()) + 1
        moved = np.zeros(m)
        moved[usable] = np.max(np.abs(Y[1:] - Y[0]), axis=1)
        # Rounding alone moves f by a few ulps of |f|; a real response is far above that.
        noise = 64.0 * eps_m * (float(np.max(np.abs(Y))) + 1.0)
        resp = usable & (moved > 1e4 * noise)
        pos |= resp & (zhat > 0)
        neg |= resp & (zhat < 0)
        pos_q |= usable & (zhat > 0)
        neg_q |= usable & (zhat < 0)
        n_pts += 1
        n_ctrl += int(ctrl)
        if n_pts >= 4 and np.all(pos ^ neg):
            break
    decided = pos ^ neg
    signs = np.where(neg & ~pos, -1.0, 1.0)
    # Confidence: 1 for a clean verdict probed on both sides, 0.75 when only the answering side was
    # probed, 0 when the neuron answered on both sides (inconsistent) or never.
    confidence = np.where(decided, np.where(pos_q & neg_q, 1.0, 0.75), 0.0)
    return WiggleSigns(signs=signs, confidence=confidence, decided=decided, points=n_pts,
                       controllable_points=n_ctrl, queries=queries)
