"""An always-on neuron in the last hidden layer (attack-notes §4; the CM24 §5 solve, extended).

A last-hidden-layer neuron active at every reachable input has no kink, so no search line finds it,
and its term ``a (r·h + b)`` is affine in the layer input ``h``. The fit of ``f`` on
``[ReLU(ẑ), h, 1]`` then leaves ``γ = Σ β_j ŵ_j + a ⊗ r``, which no 0/1 flip vector explains.

What is identifiable. ``ReLU(z) = ReLU(-z) + z``: flipping a neuron ``j`` moves ``α_j ŵ_j`` into the
always-on term. The result is the same function everywhere whenever the new always-on row ``r'``
stays positive over the *recession cone* of the reachable layer inputs (their directions at infinity,
the bias-free prefix's outputs): then some finite bias keeps it on at every input. Those flips, and the
bias ``b`` (summed with the output bias), are not identifiable from any number of queries. relux reports
the representation with the smallest always-on term ``||a ⊗ r||``, its row oriented into the dual cone,
and lists the neurons whose sign is such a gauge choice.

The bias: when the row is non-negative (a hidden layer's input is a ReLU output, ``h >= 0``) bias 0
keeps the neuron on everywhere; otherwise it is set well above the lowest pre-activation seen at the
sampled reachable inputs (any bias that keeps it on gives the same function, the output bias
absorbing the rest).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from relux.attack.linalg import svd
from relux.oracle.base import FloatArray


@dataclass(frozen=True)
class AlwaysOn:
    """Outcome of :func:`solve_always_on`.

    ``flips[j]``: row ``j`` must be negated; ``w`` (unit, ``p``) and ``b``: the always-on row;
    ``out``: its output weights (``k``); ``representations``: flip vectors giving an equivalent network
    (1 = the signs are identifiable); ``gauge``: neurons whose flip alone gives another one;
    ``margin``: the smallest cosine of ``w`` with a sampled recession direction (>= 0 in the cone).
    """

    flips: np.ndarray
    w: FloatArray
    b: float
    out: FloatArray
    representations: int
    gauge: tuple[int, ...]
    margin: float
    ok: bool
    reason: str
    #: 0 for a neuron on everywhere; else it is off somewhere (:mod:`relux.attack.rarely_off`) and its
    #: bias ``b`` was read from this many inputs where it is off
    off_points: int = 0


def _fail(m: int, p: int, k: int, reason: str) -> AlwaysOn:
    return AlwaysOn(np.zeros(m, dtype=bool), np.zeros(p), 0.0, np.zeros(k), 0, (), float("nan"), False, reason)


def _leftovers(
    alpha: FloatArray, gamma: FloatArray, W_hat: FloatArray, max_bits: int, rank_tol: float
) -> tuple[np.ndarray, FloatArray, FloatArray, FloatArray, FloatArray, np.ndarray] | str:
    """Per flip vector ``t`` of the relevant rows, the leftover ``γ + Σ_j t_j α_j ⊗ ŵ_j`` (``k x p``) and
    its leading singular triple: ``(relevant rows, T, σ_1, unit output directions (t, k), unit rows
    (t, p), rank-one mask)``, or why the enumeration is not done."""
    k, m = alpha.shape
    p = W_hat.shape[1]
    A = (alpha[:, :, None] * W_hat[None, :, :]).reshape(k, m, p)  # A[o, j] = α[o, j] ŵ_j
    colnorm = np.sqrt(np.sum(A**2, axis=(0, 2)))
    relevant = np.flatnonzero(colnorm > 1e-9 * max(float(colnorm.max(initial=0.0)), np.finfo(float).tiny))
    if relevant.size > max_bits or 2.0**relevant.size * k * p > 2.0**25:  # the leftovers fit in 256 MB
        return f"{relevant.size} sign bits over {k} x {p} outputs and inputs are too many to enumerate"
    Ar = A[:, relevant, :]
    T = np.array(list(itertools.product((0.0, 1.0), repeat=relevant.size))) if relevant.size else np.zeros((1, 0))
    L = gamma[None, :, :] + np.einsum("tj,ojp->top", T, Ar)  # leftover always-on term per flip vector
    U, S, Vt = svd(L, full_matrices=False)
    s1 = S[:, 0]
    rank1 = (S[:, 1] <= rank_tol * s1) if k > 1 else np.ones(T.shape[0], dtype=bool)
    return relevant, T, s1, U[:, :, 0], Vt[:, 0, :], rank1


def rank_one_leftovers(
    alpha: FloatArray, gamma: FloatArray, W_hat: FloatArray, max_bits: int = 16, rank_tol: float = 1e-6,
    limit: int = 4,
) -> list[tuple[np.ndarray, FloatArray, FloatArray]]:
    """The flip vectors whose leftover affine term is one neuron's (rank one), smallest first (at most
    ``limit``): ``(flips over all m rows, unit row w (p), output weights (k))`` with the term
    ``out ⊗ w``. Without the dual-cone test of :func:`solve_always_on`: for a neuron on almost
    everywhere (:mod:`relux.attack.rarely_off`)."""
    m = alpha.shape[1]
    left = _leftovers(alpha, gamma, W_hat, max_bits, rank_tol)
    if isinstance(left, str):
        return []
    relevant, T, s1, out_dirs, u, rank1 = left
    order = [int(i) for i in np.argsort(s1) if rank1[i] and s1[i] > 0][:limit]
    out = []
    for i in order:
        flips = np.zeros(m, dtype=bool)
        flips[relevant] = T[i] > 0.5
        out.append((flips, u[i], out_dirs[i] * s1[i]))
    return out


def solve_always_on(
    alpha: FloatArray,
    gamma: FloatArray,
    W_hat: FloatArray,
    recession: FloatArray,
    reachable: FloatArray,
    max_bits: int = 16,
    cone_tol: float = 1e-6,
    rank_tol: float = 1e-6,
) -> AlwaysOn:
    """Flips and one always-on row explaining the affine part ``γ`` (``k x p``) of the last-layer fit.

    ``alpha`` (``k x m``): output weights of the rows ``W_hat`` (``m x p``); ``recession`` (``N x p``):
    layer inputs of the bias-free prefix at random inputs (directions of the reachable set at
    infinity); ``reachable`` (``n x p``): layer inputs at sampled inputs, for the bias. ``cone_tol``:
    how far below 0 a normalised recession direction may project (the row's own precision);
    ``rank_tol``: the second singular value of the leftover allowed, relative to the first (one
    always-on neuron leaves a rank-1 ``k x p`` term). Enumerates the ``2^m`` flip vectors of the
    relevant rows (``m <= max_bits``)."""
    k, m = alpha.shape
    p = W_hat.shape[1]
    left = _leftovers(alpha, gamma, W_hat, max_bits, rank_tol)
    if isinstance(left, str):
        return _fail(m, p, k, left + " for an always-on neuron")
    relevant, T, s1, out_dirs, u, rank1 = left
    rn = np.linalg.norm(recession, axis=1)
    R = recession[rn > 0] / rn[rn > 0, None]
    if R.shape[0] == 0:
        return _fail(m, p, k, "no recession direction of the layer input was sampled")
    proj = u @ R.T  # (t, N)
    lo, hi = proj.min(axis=1), proj.max(axis=1)
    valid = rank1 & (s1 > 0) & ((lo >= -cone_tol) | (hi <= cone_tol))
    if not valid.any():
        return _fail(m, p, k, "no flip vector leaves one always-on term inside the dual cone of the layer input")
    order = np.flatnonzero(valid)
    best = int(order[np.argmin(s1[order])])
    w = u[best]
    out = out_dirs[best] * s1[best]
    margin = float(lo[best])
    if lo[best] < -cone_tol:  # oriented the other way: negate row and output weights together
        w, out, margin = -w, -out, float(-hi[best])
    flips = np.zeros(m, dtype=bool)
    flips[relevant] = T[best] > 0.5
    index = {tuple(t): i for i, t in enumerate(T.astype(bool))}
    gauge = tuple(int(relevant[j]) for j in range(relevant.size)
                  if valid[index[tuple(np.logical_xor(T[best] > 0.5, np.arange(relevant.size) == j))]])
    s = reachable @ w
    if np.all(w >= -cone_tol * float(np.abs(w).max())) and np.all(reachable >= 0):
        b = 0.0  # a non-negative row on a non-negative layer input: on (or at 0) everywhere
    else:
        spread = float(s.max() - s.min()) if s.size else 1.0
        b = max(0.0, -float(s.min(initial=0.0))) + spread
    return AlwaysOn(flips, w, b, out, int(valid.sum()), gauge, margin, True, "")
