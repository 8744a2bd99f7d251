"""Sign recovery for the last hidden layer (CM24 §5, attack-notes §4).

Nothing non-linear follows the last hidden layer. With ``ẑ_j = s_j λ_j z_j`` (``λ_j > 0``,
``s_j = ±1`` unknown) and ``ReLU(-ẑ) = ReLU(ẑ) - ẑ``, the network output is

    f = Σ_j α_j ReLU(ẑ_j) + Σ_j β_j ẑ_j + affine,   β_j = -α_j [s_j = -1],

so a least-squares fit of ``f`` on ``[ReLU(ẑ), layer input, 1]`` gives ``α`` and the affine
coefficient ``γ = Σ_j β_j ŵ_j``. The flips are the 0/1 vector ``t`` with ``A t = -γ``,
``A[:, j] = α_j ⊗ ŵ_j``: one solve when ``A`` has full column rank, else an exhaustive search over
the free bits after pivoting (``max_enum_bits`` of them at most).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import scipy.linalg

from relux.attack.linalg import lstsq, svd
from relux.oracle.base import FloatArray


@dataclass(frozen=True)
class SignSolution:
    """Outcome of the binary solve. ``flips[j]`` is True when row ``j`` must be negated."""

    flips: np.ndarray
    relevant: np.ndarray  # neurons whose output weights are not negligible
    residual: float  # ||A t + γ|| / ||A||_col-scale for the chosen t
    free_bits: int
    solutions: int  # exact solutions found (1 = unique; >1 = functionally equivalent choices)
    method: str
    ok: bool
    reason: str
    confidence: FloatArray  # per neuron, in [0, 1]


def fit_affine_plus_relu(Zhat: FloatArray, Hin: FloatArray, Y: FloatArray) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Least-squares fit ``Y ≈ ReLU(Zhat) α^T + Hin γ^T + c``. Returns ``(α (k, m), γ (k, p), c (k,))``."""
    n, m = Zhat.shape
    D = np.concatenate([np.maximum(Zhat, 0.0), Hin, np.ones((n, 1))], axis=1)
    col = np.linalg.norm(D, axis=0)
    col[col == 0] = 1.0
    coef = lstsq(D / col, Y)
    coef = coef / col[:, None]
    return coef[:m].T, coef[m : m + Hin.shape[1]].T, coef[-1]


def affine_relu_residual(
    Zhat: FloatArray, Hin: FloatArray, Y: FloatArray, alpha: FloatArray, gamma: FloatArray, c: FloatArray
) -> FloatArray:
    """Per point, the largest ``|ReLU(Zhat) α^T + Hin γ^T + c - Y|`` over the outputs."""
    return np.asarray(np.max(np.abs(np.maximum(Zhat, 0.0) @ alpha.T + Hin @ gamma.T + c - Y), axis=1))


def fit_dropping_misfits(
    Zhat: FloatArray, Hin: FloatArray, Y: FloatArray, rounds: int = 4
) -> tuple[FloatArray, FloatArray, FloatArray, FloatArray, np.ndarray]:
    """:func:`fit_affine_plus_relu` refitted without its worst points until the fit is clean: where a
    neuron the features lack is on, ``f`` leaves a misfit far above rounding. Returns ``(α, γ, c,
    per-point misfit relative to max |Y|, kept points)``."""
    n = Zhat.shape[0]
    yscale = float(np.max(np.abs(Y))) or 1.0
    keep = np.ones(n, dtype=bool)
    alpha, gamma, c = fit_affine_plus_relu(Zhat, Hin, Y)
    r = affine_relu_residual(Zhat, Hin, Y, alpha, gamma, c) / yscale
    for _ in range(rounds):
        # rounding leaves ~1e-12 relative; a neuron the fit lacks leaves far more where it is on
        new_keep = keep & (r <= max(1e-3 * float(np.max(r[keep])), 1e-9))
        if new_keep.sum() == keep.sum() or new_keep.sum() < Zhat.shape[1] + Hin.shape[1] + 2:
            break
        keep = new_keep
        alpha, gamma, c = fit_affine_plus_relu(Zhat[keep], Hin[keep], Y[keep])
        r = affine_relu_residual(Zhat, Hin, Y, alpha, gamma, c) / yscale
    return alpha, gamma, c, r, keep


def solve_flips(
    alpha: FloatArray,
    gamma: FloatArray,
    W_hat: FloatArray,
    max_enum_bits: int,
    rel_tol: float = 1e-3,
    linear: FloatArray | None = None,
) -> SignSolution:
    """Solve ``A t = -γ`` over ``t ∈ {0,1}^m`` with ``A[(o, :), j] = α[o, j] ŵ_j``.

    ``rel_tol`` is the acceptance threshold of the residual, relative to the smallest column norm of
    the relevant neurons: a wrong bit moves the residual by at least one column norm.

    ``linear`` (rows ``ŵ_i``): neurons on at every point of the fit, left out of its ReLU features.
    Each adds ``e_i ŵ_i`` to ``γ`` with an unknown ``e_i`` per output (``α_i`` if its sign is right,
    0 if not: ``ReLU(-ẑ)`` is 0 where ``ẑ > 0``), so both sides are projected off the span of those
    terms before the binary solve; such neurons' signs stay open here (:func:`linear_row_signs`
    reads them afterwards).
    """
    k, m = alpha.shape
    A = np.concatenate([alpha[o][None, :] * W_hat.T for o in range(k)], axis=0)  # (k p, m)
    g = -gamma.reshape(-1)
    if linear is not None and linear.shape[0]:
        p = W_hat.shape[1]
        B = np.zeros((k * p, k * linear.shape[0]))
        for o in range(k):  # output o's block of γ takes e[o, i] ŵ_i
            B[o * p : (o + 1) * p, o * linear.shape[0] : (o + 1) * linear.shape[0]] = linear.T
        # an orthonormal basis of their span (SVD: the rows may be dependent on the seen coordinates)
        U, sv, _ = svd(B, full_matrices=False)
        Qb = U[:, sv > 1e-10 * max(float(sv.max(initial=0.0)), np.finfo(float).tiny)]
        A = A - Qb @ (Qb.T @ A)
        g = g - Qb @ (Qb.T @ g)
    return solve_binary(A, g, max_enum_bits, rel_tol)


@dataclass(frozen=True)
class LinearSigns:
    """Signs of rows that are on (or off) at every fit point, read from the affine term."""

    flips: np.ndarray
    confidence: FloatArray  # 0 where the sign stays open
    present: np.ndarray  # whose ``e_i`` is non-zero (the true neuron is on at the fit points)
    reason: str  # empty when every row was decided


def linear_row_signs(
    alpha: FloatArray,
    gamma: FloatArray,
    W_hat: FloatArray,
    flips: np.ndarray,
    linear: FloatArray,
    on: np.ndarray,
    threshold: float = 1e-6,
    fit_tol: float = 1e-6,
) -> LinearSigns:
    """The signs of the rows ``linear`` left out of the ReLU features of :func:`solve_flips` (CM24 §5,
    attack-notes §4), once the other rows' ``flips`` are known.

    What the solved rows leave of ``γ`` is ``Σ_i e_i ŵ_i`` over those rows, with ``e_i`` the output
    weights of neuron ``i`` where the true neuron is on at every fit point and 0 where it is off at
    every one. A row on at every point (``on[i]``) keeps its sign when ``e_i ≠ 0``; a row off at every
    point is flipped when ``e_i ≠ 0`` (then ``-ẑ_i`` is on everywhere). ``e_i`` counts as non-zero
    above ``threshold`` times the largest column of the solve (a neuron that reaches no output
    either way has no sign that matters); the confidence is how many decades it sits from that
    threshold, over three. Rows whose terms are dependent, or whose least squares leaves more than
    ``fit_tol`` of ``γ``, stay open (confidence 0, not flipped)."""
    n = linear.shape[0]
    out_flips = np.zeros(n, dtype=bool)
    conf = np.zeros(n)
    present = np.zeros(n, dtype=bool)
    if n == 0:
        return LinearSigns(out_flips, conf, present, "")
    t = np.asarray(flips, dtype=float)
    r = gamma + (alpha * t[None, :]) @ W_hat  # (k, p): Σ_i e_i ŵ_i when the flips are right
    # the solve's column j is α_j ⊗ ŵ_j, of norm |α_j| |ŵ_j|
    colnorm = np.linalg.norm(alpha, axis=0) * np.linalg.norm(W_hat, axis=1)
    scale = max(float(np.max(colnorm, initial=0.0)), float(np.linalg.norm(r)), np.finfo(float).tiny)
    sv = svd(linear, compute_uv=False)
    if sv.size < n or sv[-1] <= 1e-8 * sv[0]:
        return LinearSigns(out_flips, conf, present, f"{n} such rows are dependent on the seen coordinates")
    e = lstsq(linear.T, r.T).T  # (k, n)
    miss = float(np.linalg.norm(e @ linear - r))
    if miss > fit_tol * scale:
        why = f"those rows leave {miss / scale:.1e} of the affine term unexplained (tolerance {fit_tol:.0e})"
        return LinearSigns(out_flips, conf, present, why)
    size = np.linalg.norm(e, axis=0) * np.linalg.norm(linear, axis=1) / scale
    present = size > threshold
    out_flips = np.where(np.asarray(on, dtype=bool), ~present, present)
    with np.errstate(divide="ignore"):
        decades = np.abs(np.log10(np.maximum(size, 1e-300)) - np.log10(threshold))
    conf = np.clip(decades / 3.0, 0.0, 1.0)
    return LinearSigns(out_flips, conf, present, "")


def solve_binary(
    A: FloatArray, g: FloatArray, max_enum_bits: int, rel_tol: float = 1e-3, relevant_rel: float = 1e-9
) -> SignSolution:
    """Solve ``A t = g`` over ``t ∈ {0,1}^m``: one solve when the relevant columns of ``A`` (norm above
    ``relevant_rel`` times the largest) have full rank, else an enumeration of the free bits after a
    pivoted QR. ``rel_tol``: the accepted residual, relative to the smallest relevant column norm."""
    m = A.shape[1]
    colnorm = np.linalg.norm(A, axis=0)
    relevant = colnorm > relevant_rel * max(float(colnorm.max(initial=0.0)), np.finfo(float).tiny)
    flips = np.zeros(m, dtype=bool)
    conf = np.zeros(m)
    if not relevant.any():
        return SignSolution(flips, relevant, 0.0, 0, 1, "none", True, "no neuron reaches the output", conf)
    Ar = A[:, relevant]
    cn = colnorm[relevant]
    unit = float(cn.min())
    An = Ar / cn  # column-normalised for conditioning
    Q, R, piv = scipy.linalg.qr(An, mode="economic", pivoting=True)
    diag = np.abs(np.diag(R))
    rank = int(np.sum(diag > 1e-8 * diag[0])) if diag.size else 0
    mr = Ar.shape[1]
    free = mr - rank
    if free > max_enum_bits:
        return SignSolution(flips, relevant, np.inf, free, 0, "enumeration", False,
                            f"{free} free sign bits exceed max_enum_bits={max_enum_bits}", conf)
    P = piv[:rank]
    Fr = piv[rank:]
    AP = Ar[:, P]
    AF = Ar[:, Fr]
    pinv = np.linalg.pinv(AP)
    base = pinv @ g
    T = pinv @ AF
    best_res = np.inf
    best_t: FloatArray | None = None
    sols: list[FloatArray] = []
    chunk_bits = min(free, 16)
    hi_bits = free - chunk_bits
    lo = np.array(list(itertools.product((0.0, 1.0), repeat=chunk_bits))) if chunk_bits else np.zeros((1, 0))
    for hi in itertools.product((0.0, 1.0), repeat=hi_bits):
        SF = np.concatenate([lo, np.tile(np.asarray(hi, dtype=float), (lo.shape[0], 1))], axis=1)
        SP = base[None, :] - SF @ T.T  # (2^c, rank)
        near = np.max(np.abs(SP - np.round(SP)), axis=1) < 0.25
        inbox = np.all((np.round(SP) == 0) | (np.round(SP) == 1), axis=1)
        for i in np.flatnonzero(near & inbox):
            t = np.empty(mr)
            t[P] = np.round(SP[i])
            t[Fr] = SF[i]
            res = float(np.linalg.norm(Ar @ t - g)) / unit
            if res < rel_tol:
                sols.append(t)
            if res < best_res:
                best_res, best_t = res, t
    if best_t is None:
        return SignSolution(flips, relevant, np.inf, free, 0, "enumeration" if free else "solve", False,
                            "no 0/1 sign vector explains the affine part", conf)
    flips[np.flatnonzero(relevant)] = best_t > 0.5
    # Confidence: how far the best unrounded least-squares value sits from the rounding threshold.
    conf_r = np.ones(mr)
    if free == 0:
        conf_r = np.clip(1.0 - 2.0 * np.abs(base - np.round(base)), 0.0, 1.0)[np.argsort(P)]
    elif len(sols) > 1:
        conf_r[:] = 0.5
    conf[np.flatnonzero(relevant)] = conf_r
    ok = best_res < rel_tol
    reason = "" if ok else f"best sign vector leaves residual {best_res:.2e} (tolerance {rel_tol:.1e})"
    return SignSolution(flips, relevant, best_res, free, len(sols), "enumeration" if free else "solve",
                        ok, reason, conf)
