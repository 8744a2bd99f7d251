"""Fitting the exact points of walks along next-layer boundaries (:mod:`relux.attack.walk`), and the
signs of layer ``i`` they decide (the CM24 §5 last-layer solve, one layer down; attack-notes §4).

A neuron of layer ``i+1`` is ``z' = u·ReLU(ẑ) + a·h + c`` with ``a = -Σ_{flipped} u_j ŵ_j``. A walk's
points give ``θ = (u, a, c)`` on the neurons whose state varies among them (:func:`fit_partial`); every
fit is a set of linear equations on the flips (:func:`sign_system`). A neuron of layer ``i`` that no
kink has shown (rarely crossed) and that stays on along a walk adds ``β u_miss·h``: one unknown
direction shared by every walk, fitted with the flips by :func:`solve_walk_signs`; it then points at
the missing neuron.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.optimize

from relux.attack import prefix as pfx
from relux.attack.linalg import svd
from relux.attack.signs import SignSolution, solve_binary
from relux.oracle.base import FloatArray


@dataclass(frozen=True)
class PartialFit:
    """A walk's points fitted with the layer-``i`` neurons whose state varies among them.

    A neuron of constant state contributes nothing (off) or an affine term in ``h`` (on), so its
    ``u_j`` is free and ``a`` is known only modulo its ``ŵ_j``; coordinates of ``h`` that stay zero at
    every point are unknown too. What is left still constrains the signs of the varying neurons
    (:func:`sign_system`).
    """

    vary: np.ndarray  # (n_i,) layer-i neurons whose state varies among the points
    observed: np.ndarray  # (p,) coordinates of h non-zero at some point
    u: FloatArray  # (n_i,), zero outside ``vary``
    a: FloatArray  # (p,), zero outside ``observed``; ``a`` plus the on-neurons' u_j ŵ_j
    c: float
    residual: float
    gap: float

    @property
    def ok(self) -> bool:
        return self.residual <= 1e-7 and self.gap >= 1e3  # a wrong point misfits by far more

    @property
    def own(self) -> bool:
        """The walk followed a neuron of layer ``i`` itself (one no kink had shown): ``u = 0`` and
        ``(a, c)`` is its row. (A walk that switched no layer-i neuron has no ``u`` to speak of.)"""
        size = float(np.linalg.norm(np.concatenate([self.u, self.a])))
        return bool(self.vary.any()) and float(np.linalg.norm(self.u)) <= 1e-6 * size




def features(layers: Sequence[pfx.Layer], P: FloatArray) -> FloatArray:
    """``[ReLU(ẑ_i), h_{i-1}, 1]`` at the rows of ``P`` (``layers`` ends with layer ``i``)."""
    Zs, _ = pfx.forward(layers, P)
    _, Hprev = pfx.forward(layers[:-1], P)
    return np.concatenate([np.maximum(Zs[-1], 0.0), Hprev, np.ones((P.shape[0], 1))], axis=1)


def varying(F: FloatArray, n_i: int) -> np.ndarray:
    """Layer-``i`` neurons (the first ``n_i`` feature columns) whose state changes among the points."""
    on = F[:, :n_i] > 0
    return np.asarray(on.any(axis=0) & ~on.all(axis=0))


def null_vector(F: FloatArray) -> tuple[FloatArray, float, float]:
    """Robust null vector of ``F`` (rows are points): rows misfitting by 1000x the median are dropped,
    twice at most. Returns ``(θ unit, largest kept row misfit, uniqueness gap)``; NaN when too few rows."""
    keep = np.ones(F.shape[0], dtype=bool)
    col = np.linalg.norm(F, axis=0)
    col[col == 0] = 1.0
    rn = np.linalg.norm(F, axis=1) + 1e-300
    theta = np.full(F.shape[1], np.nan)
    S = np.zeros(0)
    for _ in range(3):
        if keep.sum() < F.shape[1] + 1:
            return np.full(F.shape[1], np.nan), 1.0, 0.0
        _, S, Vt = svd(F[keep] / col, full_matrices=False)
        theta = Vt[-1] / col
        theta /= float(np.linalg.norm(theta))
        r = np.abs(F @ theta) / rn
        bad = keep & (r > 1e3 * float(np.median(r[keep])) + 1e-15)
        if not bad.any():
            break
        keep &= ~bad
    resid = float(np.max(np.abs(F[keep] @ theta) / rn[keep]))
    gap = float(S[-2] / max(S[-1], np.finfo(float).tiny))
    return theta, resid, gap


def fit_theta(layers: Sequence[pfx.Layer], P: FloatArray) -> tuple[FloatArray, float, float]:
    """Null vector of the features of exact boundary points ``P``: ``(θ unit, residual, gap)``. Points
    located less exactly than the rest (1000x the median misfit) are dropped, twice at most."""
    return null_vector(features(layers, P))


def fit_partial(layers: Sequence[pfx.Layer], P: FloatArray) -> PartialFit | None:
    """The points ``P`` of one walk as a :class:`PartialFit` (None while they are too few)."""
    n_i = layers[-1][0].shape[0]
    F = features(layers, P)
    vary = varying(F, n_i)
    observed = np.asarray(np.any(F[:, n_i:-1] != 0, axis=0))
    cols = np.concatenate([vary, observed, [True]])
    if P.shape[0] < int(cols.sum()) + 2:
        return None
    theta, resid, gap = null_vector(F[:, cols])
    if not np.all(np.isfinite(theta)):
        return None
    full = np.zeros(F.shape[1])
    full[cols] = theta
    return PartialFit(vary, observed, full[:n_i], full[n_i:-1], float(full[-1]), resid, gap)


def _complement(W_hat: FloatArray, f: PartialFit) -> FloatArray:
    """Orthonormal basis (columns, in full ``h`` coordinates) of the observed coordinates' space
    modulo the rows of the neurons whose state stayed constant along the walk."""
    p = W_hat.shape[1]
    Wo = W_hat[:, f.observed]
    const = Wo[~f.vary]
    if const.shape[0]:
        U_, S_, _ = svd(const.T, full_matrices=True)
        rank = int(np.sum(S_ > 1e-10 * max(float(S_[0]), np.finfo(float).tiny))) if S_.size else 0
        N = U_[:, rank:]
    else:
        N = np.eye(Wo.shape[1])
    E = np.zeros((p, N.shape[1]))
    E[f.observed] = N
    return E


def sign_system(
    W_hat: FloatArray, fits: Sequence[PartialFit]
) -> tuple[FloatArray, FloatArray, list[tuple[slice, FloatArray, int]]]:
    """Linear equations ``A t = g`` on the flips ``t`` of layer ``i`` from walks' partial fits.

    With ``a' = a + Σ_{on} u_j ŵ_j`` and ``a = -Σ_{flipped} u_j ŵ_j``, each fit gives
    ``a' ≡ -Σ_{varying j} t_j u_j ŵ_j`` modulo the span of the constant neurons' rows, on the observed
    coordinates of ``h``: both sides are projected on the complement of that span. Also returns, per
    fit with equations, its rows of the system, the basis ``E`` of its projection and its index.
    """
    blocks_A: list[FloatArray] = []
    blocks_g: list[FloatArray] = []
    index: list[tuple[slice, FloatArray, int]] = []
    n_i = W_hat.shape[0]
    row = 0
    for k, f in enumerate(fits):
        # A walk along a missing layer-i neuron itself gives its row on the observed coordinates, with
        # no sign in it: equations ``0 = a`` that only the missing directions can meet.
        E = _complement(W_hat, f) if not f.own else np.eye(W_hat.shape[1])[:, f.observed]
        if E.shape[1] == 0:
            continue
        # θ's scale is arbitrary; ‖(u, a)‖, not ‖u‖: a walk along a missing neuron of layer i has u = 0
        scale = float(np.linalg.norm(np.concatenate([f.u, f.a]))) or 1.0
        Ab = np.zeros((E.shape[1], n_i))
        Ab[:, f.vary] = (E.T @ W_hat[f.vary].T) * (f.u[f.vary] / scale)
        blocks_A.append(Ab)
        blocks_g.append(-(E.T @ f.a) / scale)
        index.append((slice(row, row + E.shape[1]), E, k))
        row += E.shape[1]
    if not blocks_A:
        return np.zeros((0, n_i)), np.zeros(0), []
    return np.concatenate(blocks_A), np.concatenate(blocks_g), index


def _missing_directions(
    A: FloatArray, g: FloatArray, index: Sequence[tuple[slice, FloatArray, int]], t: FloatArray, r: int,
    iterations: int = 30,
) -> FloatArray:
    """``r`` directions ``V`` (orthonormal columns, in ``h`` coordinates) with each fit's leftover
    ``g - A t`` as close as possible to ``E^T V β``: a few alternating least-squares rounds over ``V``
    and the ``β``s from the leftovers' principal directions, then Gauss-Newton on ``V`` alone with the
    ``β``s eliminated (variable projection; the alternation alone converges slowly)."""
    res = [(E, (g - A @ t)[sl]) for sl, E, _ in index]
    lifted = np.stack([E @ rw for E, rw in res])
    V = svd(lifted, full_matrices=False)[2][:r].T
    p = V.shape[0]
    for _ in range(iterations):
        betas = [np.linalg.lstsq(E.T @ V, rw, rcond=None)[0] for E, rw in res]
        M = np.zeros((p * r, p * r))
        y = np.zeros(p * r)
        for (E, rw), be in zip(res, betas, strict=True):
            M += np.kron(np.outer(be, be), E @ E.T)
            y += np.kron(be, E @ rw)
        V = np.linalg.qr(np.linalg.lstsq(M, y, rcond=None)[0].reshape(r, p).T)[0]

    def leftover(vflat: FloatArray) -> FloatArray:
        Vm = vflat.reshape(p, r)
        out = []
        for E, rw in res:
            B = E.T @ Vm
            out.append(rw - B @ np.linalg.lstsq(B, rw, rcond=None)[0])
        return np.concatenate(out)

    fit = scipy.optimize.least_squares(leftover, V.reshape(-1), method="lm", xtol=1e-15, ftol=1e-15, gtol=1e-15,
                                       max_nfev=200 * (p * r + 1))
    return np.asarray(np.linalg.qr(fit.x.reshape(p, r))[0])


def _project_missing(
    A: FloatArray, g: FloatArray, index: Sequence[tuple[slice, FloatArray, int]], V: FloatArray
) -> tuple[FloatArray, FloatArray]:
    """The system with each fit's component along its ``E^T V`` removed (the ``β``s are free reals)."""
    Ap, gp = A.copy(), g.copy()
    for sl, E, _ in index:
        Q = np.linalg.qr(E.T @ V)[0]
        Ap[sl] -= Q @ (Q.T @ Ap[sl])
        gp[sl] -= Q @ (Q.T @ gp[sl])
    return Ap, gp


@dataclass(frozen=True)
class WalkSigns:
    """Flips of layer ``i`` decided by walks, and the directions of its missing neurons."""

    solution: SignSolution
    missing: FloatArray  # (p, r): orthonormal basis of the missing neurons' rows (in h coordinates)


def solve_walk_signs(
    W_hat: FloatArray, fits: Sequence[PartialFit], n_missing: int, max_enum_bits: int
) -> WalkSigns | None:
    """Flips of layer ``i`` (rows ``W_hat``) from walks' partial fits, allowing ``n_missing`` neurons of
    the layer that no kink showed: their contribution, affine in ``h`` wherever they stayed on, is
    fitted as directions shared by every walk (alternating with the flips, three rounds at most).
    None when no fit gives an equation."""
    A, g, index = sign_system(W_hat, fits)
    if A.shape[0] == 0:
        return None
    # Partial fits decide the neurons they saw vary; the rest stay undecided (relevant_rel).
    sol = solve_binary(A, g, max_enum_bits, relevant_rel=1e-6)
    p = W_hat.shape[1]
    if sol.ok or n_missing <= 0:
        return WalkSigns(sol, np.zeros((p, 0)))
    r = min(n_missing, p, len(index))  # each fit's leftover shows at most one more direction
    if A.shape[0] <= p * r + len(index):
        # Too few equations: the missing directions (and one scale per fit) could absorb any leftover,
        # so a wrong sign vector would fit exactly. The signs stay undecided.
        return WalkSigns(sol, np.zeros((p, 0)))
    t = np.clip(np.round(np.linalg.lstsq(A, g, rcond=None)[0]), 0.0, 1.0)
    best = sol
    V = np.zeros((p, 0))
    for _ in range(3):
        V = _missing_directions(A, g, index, t, r)
        Ap, gp = _project_missing(A, g, index, V)
        sol_v = solve_binary(Ap, gp, max_enum_bits, relevant_rel=1e-6)
        if sol_v.ok:
            return WalkSigns(sol_v, V)
        if sol_v.residual < best.residual:
            best = sol_v
        t_new = sol_v.flips.astype(float)
        if np.array_equal(t_new, t):
            break
        t = t_new
    return WalkSigns(best, np.zeros((p, 0)))
