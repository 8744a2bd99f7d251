"""Signs of a hidden layer from the support of the output's Jacobian (attack-notes §3, "space of
control"; our own test, built on CM24 §4's premise that an off neuron moves nothing).

At a point ``x`` behind the signed prefix, let ``M_x`` be the prefix's Jacobian (rank ``r``) and ``B``
an orthonormal basis of its row space. Along ``B`` the output's Jacobian is

    J = Σ_{k on at x} g_k v_k,   v_k = ŵ_k M_x Bᵀ,   g_k = ∂f/∂h_k (unknown, one per output),

so the rows of ``J`` lie in the span of the ``v_k`` of the neurons on at ``x``. Where fewer neurons are on
than ``r``, the on set is the only set of fewer than ``r`` neurons whose ``v_k`` span ``J``'s rows (for
rows in general position: another set's span meets the on set's in fewer dimensions than ``J``'s rows
fill). Each row's sign is then read at ``x``: ``ŵ_k = s_k λ_k w_k`` (``λ_k > 0``), so the neuron is on
exactly where ``s_k ẑ_k > 0``.

Finding the set (:func:`support_fit`): a group lasso ranks the neurons by their share of ``J``; the
residual of ``J`` on the span of the first ``k`` collapses, by many decades, at the on set's size (or
past it, when the ranking put an off neuron early); a neuron of that set is on when dropping it from
the least-squares fit brings the residual back above the collapse.

No all-on region and no critical point is needed: ``r + 3`` queries per point. Behind the CIFAR-scale
unitary layers 1-4, whose layer-5 neurons no all-on region controls, points where 172-187 layer-4
neurons are on gave ranks above the 117-133 layer-5 neurons on, and the ranking found each on set
exactly (session 36).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from relux.attack import prefix as pfx
from relux.attack.gradients import fd_gradients
from relux.attack.linalg import numerical_rank, svd
from relux.oracle.base import FloatArray, QueryFn

log = logging.getLogger(__name__)

#: The residual must fall by this many decades at the cut between the on set and the rest. Measured
#: at CIFAR scale: from 4e-3-1.4e-2 (one on neuron left out) to 1e-15 (exact Jacobians), 5e-10 (J off
#: by 1e-9 per entry) and 6e-8 (off by 1e-7); a wrong set is never below about 1e-3.
DROP_DECADES = 3.0
#: The on set leaves at least this many of the ``r`` directions free (the uniqueness argument needs
#: fewer on neurons than directions; two spare make a coincidence far less likely).
SPARE = 2
#: Group-lasso weight, relative to ``‖J‖``: small, so that the ranking follows the exact fit; the
#: CIFAR-scale trials ranked every on set exactly at 1e-4 and 1e-5, and missed a few at 1e-3.
LASSO = 1e-5
LASSO_ITERATIONS = 3000
#: Past the cut the residual may fall by at most this many decades more: adding rows in general
#: position shrinks it by a factor ``sqrt((r - k - 1) / (r - k))`` each, while an on neuron ranked past
#: the cut (a weak gain) falls by decades, and would be read off.
AFTER_DECADES = 1.0
#: Rows whose directions agree to ``1 - |cos|`` below this are not read (J cannot tell them apart).
PARALLEL = 1e-8
#: A neuron is read at a point only where ``|ẑ|`` exceeds this share of ``‖ŵ‖ ‖h‖ + |b̂|``: the rows
#: are estimates (pieced rows within about 1e-8 of the truth), and so is the side of a point very near
#: a hyperplane.
SIDE_SHARE = 1e-6
#: The finite-difference step, as a share of the distance to the nearest known boundary from the point
#: (over every direction). Rounding then costs about ``eps |f| / step`` per entry of ``J``, far below the
#: cut's three decades.
STEP_SHARE = 1.0 / 16.0


@dataclass(frozen=True)
class SupportFit:
    """The on set read from one Jacobian (:func:`support_fit`). ``on`` is None unless the fit is
    certified; ``reason`` names why not. ``residual`` is ``J``'s relative residual on the on set and
    ``drop`` the decades it fell at the cut."""

    on: np.ndarray | None
    seen: np.ndarray  # neurons that move the point's controllable space at all, and none in parallel
    rank: int
    size: int
    drop: float
    residual: float
    reason: str


def group_lasso(J: FloatArray, V: FloatArray, lam: float, iterations: int = LASSO_ITERATIONS) -> FloatArray:
    """``argmin_X ½‖J − X V‖² + lam Σ_k ‖X[:, k]‖`` by FISTA (accelerated proximal gradient; Beck and
    Teboulle 2009), from zero. ``J``: outputs × r, ``V``: neurons × r. Returns ``X`` (outputs × neurons)."""
    step = 1.0 / max(float(svd(V, compute_uv=False)[0]) ** 2, np.finfo(float).tiny)
    X = np.zeros((J.shape[0], V.shape[0]))
    Y = X.copy()
    t = 1.0
    for _ in range(iterations):
        Z = Y - step * ((Y @ V - J) @ V.T)
        norms = np.linalg.norm(Z, axis=0)
        X_new = Z * np.maximum(0.0, 1.0 - step * lam / np.maximum(norms, np.finfo(float).tiny))
        t_new = 0.5 * (1.0 + np.sqrt(1.0 + 4.0 * t * t))
        Y = X_new + ((t - 1.0) / t_new) * (X_new - X)
        X, t = X_new, t_new
    return X


def _tails(J: FloatArray, V: FloatArray, order: np.ndarray, kmax: int) -> FloatArray:
    """Relative residual of ``J``'s rows on the span of ``V[order[:k]]``, for ``k = 0 .. kmax``: from one
    complete QR (the tail sums of ``J``'s coordinates in its basis, exact to rounding even when tiny)."""
    Q, _ = np.linalg.qr(V[order[:kmax]].T, mode="complete")
    C2 = np.sum((J @ Q) ** 2, axis=0)
    tails = np.sqrt(np.concatenate([np.cumsum(C2[::-1])[::-1], [0.0]])[: kmax + 1])
    out: FloatArray = tails / max(float(np.linalg.norm(J)), np.finfo(float).tiny)
    return out


def support_fit(J: FloatArray, V: FloatArray, spare: int = SPARE, drop_decades: float = DROP_DECADES) -> SupportFit:
    """The neurons on at a point, from the output's Jacobian ``J`` (outputs × r, along an orthonormal basis
    of the controllable directions) and the layer's rows there ``V`` (neurons × r, ``ŵ_k M_x Bᵀ``), as
    in the module docstring; pure (no queries)."""
    n, r = V.shape
    nrm = np.linalg.norm(V, axis=1)
    seen = nrm > 1e3 * np.finfo(float).eps * max(r, 1) * (float(nrm.max()) if n else 0.0)

    def fail(reason: str, drop: float = 0.0, residual: float = float("nan"), size: int = 0) -> SupportFit:
        return SupportFit(None, seen, r, size, drop, residual, reason)

    if not np.all(np.isfinite(J)) or not np.any(J):
        return fail("the Jacobian is zero or not finite")
    idx = np.flatnonzero(seen)
    kmax = min(idx.size, r - spare)
    if kmax < 1:
        return fail(f"{r} controllable direction(s) leave no room for an on set")
    Vs = V[idx] / nrm[idx, None]
    if idx.size <= kmax:
        order = np.arange(idx.size)  # every neuron fits: the least-squares fit alone decides
    else:
        X = group_lasso(J, Vs, LASSO * float(np.linalg.norm(J)))
        order = np.argsort(-np.linalg.norm(X, axis=0), kind="stable")
    tails = _tails(J, Vs, order, kmax)
    # residuals below rounding are all alike: an exact J reaches 0.0 at some set past the on set
    # (any set holding it), and a fall from rounding to 0.0 must not count as the cut
    floor = 100.0 * np.finfo(float).eps * max(r, 1)
    logs = np.log10(np.maximum(tails, floor))
    falls = logs[:-1] - logs[1:]
    k = int(np.argmax(falls)) + 1
    drop = float(falls[k - 1])
    if drop < drop_decades:
        return fail(f"the residual fell by at most {drop:.1f} decades (need {drop_decades:g})", drop, float(tails[-1]))
    if falls[k:].size and float(np.max(falls[k:])) > AFTER_DECADES:
        # a weak on neuron ranked past the cut leaves its share in the residual: it would be read off
        return fail(f"the residual falls again by {float(np.max(falls[k:])):.1f} decades past the cut", drop,
                    float(tails[k]), k)
    S = order[:k]
    A = Vs[S]  # k x r, k < r: full row rank for rows in general position
    if numerical_rank(svd(A, compute_uv=False)) < k:
        return fail("the rows of the cut are linearly dependent", drop, float(tails[k]), k)
    Ginv = np.linalg.inv(A @ A.T)
    X = (J @ A.T) @ Ginv  # least-squares gains on S
    jn2 = float(np.sum(J**2))
    # dropping member j raises the residual sum of squares by |X_j|² / (G⁻¹)_jj
    without = np.sqrt(tails[k] ** 2 + np.sum(X**2, axis=0) / np.maximum(np.diag(Ginv), np.finfo(float).tiny) / jn2)
    middle = float(10.0 ** (0.5 * (logs[k] + logs[k - 1])))  # floored logs: a residual of exactly 0 too
    keep = without > middle
    on_idx = idx[S[keep]]
    if keep.sum() < k:
        A2 = Vs[S[keep]]
        res = J - (J @ np.linalg.pinv(A2)) @ A2 if A2.size else J
        if float(np.linalg.norm(res)) / np.sqrt(jn2) > middle:
            return fail("the members the fit does not need leave J unexplained without them", drop, float(tails[k]), k)
    on = np.zeros(n, dtype=bool)
    on[on_idx] = True
    # rows parallel here (two rows of one neuron, or a coincidence) show the same in J: neither is read
    cos = np.abs(Vs @ Vs.T)
    np.fill_diagonal(cos, 0.0)
    twins = np.zeros(n, dtype=bool)
    twins[idx] = np.max(cos, axis=1) > 1.0 - PARALLEL if idx.size > 1 else False
    return SupportFit(on, seen & ~twins, r, int(on.sum()), drop, float(tails[k]), "")


@dataclass(frozen=True)
class SupportSigns:
    """Signs read from on sets at several points (:func:`support_signs`). ``votes`` counts the certified
    points that read each neuron; a neuron is decided when they agree, at confidence 1 from two."""

    signs: FloatArray
    confidence: FloatArray
    decided: np.ndarray
    votes: np.ndarray
    points: int
    certified: int
    queries: int
    reasons: tuple[str, ...]


def _point_steps(layers: Sequence[pfx.Layer], W_hat: FloatArray, b_hat: FloatArray, x: FloatArray, B: FloatArray,
                 M: FloatArray, pre_jacs: Sequence[FloatArray]) -> tuple[float, FloatArray, FloatArray]:
    """The length of a move inside the span of ``B``'s rows (orthonormal) in any direction at which a
    known neuron (prefix or this layer) may first reach its boundary: the smallest ``|z| / ‖∇z Bᵀ‖``;
    with ``ẑ`` at ``x`` and the layer input ``h``."""
    Zs, H = pfx.forward(layers, x[None, :])
    zhat = W_hat @ H[0] + b_hat
    lim = np.inf
    for Z, Jz in (*zip(Zs, pre_jacs, strict=True), (zhat[None, :], W_hat @ M)):
        rate = np.linalg.norm(Jz @ B.T, axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            reach = np.nan_to_num(np.abs(Z[0]) / rate, nan=np.inf)
        lim = min(lim, float(np.min(reach)) if reach.size else np.inf)
    return lim, zhat, H[0]


def support_signs(
    query: QueryFn,
    layers: Sequence[pfx.Layer],
    W_hat: FloatArray,
    b_hat: FloatArray,
    points: Callable[[int], FloatArray | None],
    rng: np.random.Generator,
    max_points: int = 12,
    votes_wanted: int = 2,
) -> SupportSigns:
    """Signs of the rows ``(W_hat, b_hat)`` behind the signed ``layers`` from the on sets at up to
    ``max_points`` points (module docstring). ``points(i)``: the ``i``-th point to try (None: no more);
    points where many prefix neurons are on give the most controllable directions. Stops once every
    neuron has ``votes_wanted`` agreeing votes. Each point costs ``r + 3`` queries (r its rank). Behind
    the CIFAR-scale unitary layers 1-5 and 1-6, two of five and two of six points were certified (the
    others had ranks 144-157, below the number of neurons on plus two), hence the default of twelve."""
    m = W_hat.shape[0]
    plus = np.zeros(m, dtype=int)
    minus = np.zeros(m, dtype=int)
    queries = n_pts = n_cert = 0
    reasons: list[str] = []
    tried: list[FloatArray] = []
    eps = float(np.finfo(float).eps)
    for i in range(max_points):
        x = points(i)
        if x is None:
            break
        if any(np.array_equal(x, y) for y in tried):
            continue  # the same point again (the same patterns): it would only repeat its votes
        tried.append(x)
        n_pts += 1
        M, pre_jacs = pfx.jacobian(layers, x)
        _, sv, Vt = svd(M, full_matrices=False)
        r = numerical_rank(sv)
        B = Vt[:r]
        lim, zhat, h = _point_steps(layers, W_hat, b_hat, x, B, M, pre_jacs)
        # one step for every direction, a fraction of the nearest known boundary's distance: the
        # unknown deeper boundaries lie about as far (behind CIFAR-scale unitary layers 1-4, layers
        # 6-8's nearest at 0.5-5 times layer 5's), and the Jacobian is exact only inside the piece
        step = STEP_SHARE * lim
        steps = np.full(r, step)
        if r == 0 or not np.isfinite(step) or step <= 0:
            reasons.append(f"point {i}: on a boundary or no controllable direction")
            continue
        Jb, F = fd_gradients(query, x[None, :], steps[None, :], basis=B)
        J = Jb[0]
        queries += r + 1
        # two random moves of the same length: the point's piece must be affine there
        C = rng.standard_normal((2, r))
        C /= np.linalg.norm(C, axis=1, keepdims=True)
        C *= step
        Y = query(x[None, :] + C @ B)
        queries += 2
        err = float(np.max(np.abs(Y - F[0] - C @ J.T)))
        moved = float(np.max(np.abs(C @ J.T)))
        rounding = 64.0 * eps * (float(np.max(np.abs(F))) + 1.0) * (1.0 + r)
        if not err <= np.sqrt(max(rounding, eps) * max(moved, eps)):
            reasons.append(f"point {i}: not affine within the steps (off by {err:.2g} of a move of {moved:.2g})")
            continue
        fit = support_fit(J, W_hat @ M @ B.T)
        if fit.on is None:
            reasons.append(f"point {i}: {fit.reason} (rank {fit.rank})")
            continue
        n_cert += 1
        read = fit.seen & (np.abs(zhat) > SIDE_SHARE * (np.linalg.norm(W_hat, axis=1) * np.linalg.norm(h)
                                                       + np.abs(b_hat)))
        s = np.where(fit.on == (zhat > 0), 1, -1)
        plus += read & (s > 0)
        minus += read & (s < 0)
        log.debug("support point %d: rank %d, %d on, residual %.2g, drop %.1f decades", i, fit.rank, fit.size,
                  fit.residual, fit.drop)
        if np.all(np.maximum(plus, minus) >= votes_wanted) and not np.any(np.minimum(plus, minus)):
            break
    votes = plus + minus
    decided = (votes > 0) & ((plus == 0) | (minus == 0))
    signs = np.where(minus > plus, -1.0, 1.0)
    confidence = np.where(decided, np.where(votes >= 2, 1.0, 0.5), 0.0)
    return SupportSigns(signs, confidence, decided, votes, n_pts, n_cert, queries, tuple(reasons))


def pattern_points(
    layers: Sequence[pfx.Layer], box: float, rng: np.random.Generator, depth_frac: float = 0.1,
) -> Callable[[int], FloatArray | None]:
    """Points for :func:`support_signs` where many prefix neurons are on, so that the control rank is
    high: the longest run of first layers with an all-on region stays all on, and each later layer in
    turn gets as many neurons on as the linear programs of
    :func:`relux.attack.pattern_layer.choose_pattern` can put there (asked in a fresh random order each
    time, inside the patterns chosen before it, each region ``depth_frac`` as deep as the one before).
    The point is the centre of the last region; None when no region is found."""
    from relux.attack.active_lines import all_on_region, pattern_region
    from relux.attack.pattern_layer import choose_pattern

    on_first = 0  # how many first layers have an all-on region together
    while on_first < len(layers) and all_on_region(list(layers[: on_first + 1]), box) is not None:
        on_first += 1

    def point(_: int) -> FloatArray | None:
        if on_first == len(layers):
            region = all_on_region(list(layers), box)
            return None if region is None else region.centre
        masks = [np.ones(W.shape[0], dtype=bool) for W, _ in layers[:on_first]]
        for level in range(on_first + 1, len(layers) + 1):
            width = layers[level - 1][0].shape[0]
            pat = choose_pattern(layers[:level], box, rng.permutation(width).tolist(), depth_frac,
                                 before=masks if level > 1 else None)
            if pat is None:
                return None
            masks = [*masks[: level - 1], pat.on]
        region = pattern_region(layers, box, masks[-1], masks[:-1] if len(masks) > 1 else None)
        return None if region is None else region.centre

    return point
