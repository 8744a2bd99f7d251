"""Weights of the last hidden layer on an input coordinate that none of its witnesses saw on, read from
the output just inside that coordinate's on-region (attack-notes §3 on rarely active neurons, §5 on the
output layer).

Coordinate ``m`` of the last hidden layer's input is neuron ``m`` of the layer before. Where it is off, the
weights ``W[:, m]`` do nothing, so a rarely active neuron (one a resumed attempt found late) leaves them
unseen by every witness, and often by the kinks that :func:`relux.attack.complete.complete_row` reads
weights from. At an exact point ``p`` of neuron ``m``'s own boundary, a short step along its normal into
its on-side makes ``h_m`` grow linearly from zero while every other known neuron keeps its state. There the
output moves by ``A[:, S] W[S, m] h_m``, with ``A`` the output layer and ``S`` the last-layer neurons on at
``p``: the slope of ``f - f̂`` against ``h_m`` (two queries) gives ``k`` linear equations in the unknown column.
Points of the boundary with different ``S`` determine it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from relux.attack import prefix as pfx
from relux.attack.clouds import moved_copies
from relux.attack.config import ExtractionConfig
from relux.attack.linalg import lstsq, svd
from relux.attack.polish import bisect_to_boundary
from relux.oracle.base import FloatArray, QueryFn

log = logging.getLogger(__name__)

#: the steps into a coordinate's on-side, as shares of the distance to the nearest other known boundary, tried
#: in turn: the longer step reads the slope with less rounding, the shorter one stays linear when an unknown
#: weight of order one switches a last-layer neuron on the way
STEP_SHARES = (0.1, 1e-3)

#: coordinates on at fewer than this share of random inputs may have weights the output does not determine
#: (:attr:`ColumnRead.undetermined`); for the others the points read are too local to tell
RARE_SHARE = 1e-2

#: depths past a coordinate's boundary (in units of the typical input norm) where its column is then fitted
INSIDE_DEPTHS = (0.01, 0.03, 0.1, 0.3)


@dataclass(frozen=True)
class ColumnRead:
    """What :func:`read_unseen_columns` did: the weights it read, per coordinate the points it used, and
    why each coordinate left unread was (``reasons``)."""

    filled: int
    points: dict[int, int] = field(default_factory=dict)
    reasons: dict[int, str] = field(default_factory=dict)
    #: (row, coordinate) of the weights of rarely on coordinates (:data:`RARE_SHARE`) that the output does not
    #: determine where the coordinate is on: rows off at every point used (nothing the weight does shows), or
    #: seen only in combinations with others (they keep the least-squares values, right where it was seen)
    undetermined: tuple[tuple[int, int], ...] = ()


def _output_layer(query: QueryFn, layers: Sequence[pfx.Layer], cols: np.ndarray, d0: int, cfg: ExtractionConfig,
                  rng: np.random.Generator) -> tuple[FloatArray, FloatArray, str, bool]:
    """The output layer, fitted at random inputs where every coordinate in ``cols`` is off (so the unseen
    weights play no part); a reason instead when those inputs are too few (then the last item is true: no
    query was made) or the fit is not exact there."""
    prefix, (W, b) = list(layers[:-1]), layers[-1]
    need = 2 * (W.shape[0] + 1) + 32
    X = rng.normal(0.0, cfg.input_scale, size=(4 * need, d0))
    _, Hp = pfx.forward(prefix, X)
    X, Hp = X[np.all(Hp[:, cols] <= 0.0, axis=1)], Hp[np.all(Hp[:, cols] <= 0.0, axis=1)]
    none = np.zeros((0, 0)), np.zeros(0)
    if X.shape[0] < need:
        return *none, f"the coordinates are off together at only {X.shape[0]} of {4 * need} random inputs", True
    X, Hp = X[:need], Hp[:need]
    Y = query(X)
    D = np.concatenate([np.maximum(Hp @ W.T + b, 0.0), np.ones((need, 1))], axis=1)
    coef = lstsq(D, Y)
    miss = float(np.max(np.abs(D @ coef - Y))) / (float(np.max(np.abs(Y))) + 1e-300)
    # exact rows leave a misfit at float64 rounding of the design's condition; a wrong row leaves one of order one
    if miss > 1e-6:
        return (*none, f"the output fit where the coordinates are off misses by {miss:.1e} (relative): a known row is "
                "wrong", False)
    return coef[:-1].T, coef[-1], "", False


def spread_boundary_points(before: Sequence[pfx.Layer], w: FloatArray, b: float, P: FloatArray, n: int, reach: float,
                           rng: np.random.Generator) -> FloatArray:
    """Up to ``n`` more points of the boundary ``w·h + b = 0`` behind the known layers ``before``, spread
    around its known points ``P`` (no query): bisection between random inputs on either side of it, drawn
    at distances up to ``reach`` from those points (a rarely active neuron's on-side is small: random
    inputs seldom reach it)."""
    X = moved_copies(P, 8 * n, reach, (0.01, 0.1, 0.5), rng)
    z = (pfx.forward(before, X)[1] if before else X) @ w + b
    pos, neg = X[z > 0], X[z <= 0]
    m = min(n, pos.shape[0], neg.shape[0])
    if m == 0:
        return np.zeros((0, P.shape[1]))
    return bisect_to_boundary(before, w, b, pos[:m], neg[rng.integers(neg.shape[0], size=m)])


def pushed_boundary_points(before: Sequence[pfx.Layer], w: FloatArray, b: float, X0: FloatArray, steps: int = 30
                           ) -> FloatArray:
    """Points of the boundary ``w·h + b = 0`` behind the known layers ``before`` reached from the inputs ``X0``
    (no query): Newton steps on the piecewise linear pre-activation along its own gradient, 1.5 times as far as
    its local zero so as to cross it, then bisection between the last two iterates. Starts anywhere in the
    input space reach parts of the boundary where other neurons are in other states."""
    out = []
    for x in X0:
        z = float(((pfx.forward(before, x[None, :])[1] if before else x[None, :]) @ w)[0] + b)
        for _ in range(steps):
            g = pfx.unit_normal(before, w, x)
            if g is None:
                break
            gz = float(g @ (pfx.jacobian(before, x)[0].T @ w)) if before else float(g @ w)
            if gz == 0.0:
                break
            y = x - 1.5 * z / gz * g
            zy = float(((pfx.forward(before, y[None, :])[1] if before else y[None, :]) @ w)[0] + b)
            if (zy > 0) != (z > 0):
                P, Q = (y, x) if zy > 0 else (x, y)
                out.append(bisect_to_boundary(before, w, b, P[None, :], Q[None, :])[0])
                break
            x, z = y, zy
    return np.asarray(out) if out else np.zeros((0, X0.shape[1]))


def _slopes(query: QueryFn, prefix: Sequence[pfx.Layer], W: FloatArray, b: FloatArray, A: FloatArray, a0: FloatArray,
            P: FloatArray, G: FloatArray, t: FloatArray, m: int) -> tuple[FloatArray, np.ndarray]:
    """Per boundary point ``P[i]`` of coordinate ``m``, the slope of ``f - f̂`` against it along ``G[i]`` (steps
    ``t[i]`` and ``2 t[i]``, one batch of queries), and whether the two steps agree on a line through zero
    (where not, a neuron switched on the way)."""
    X = np.concatenate([P + t[:, None] * G, P + 2.0 * t[:, None] * G])
    _, Hx = pfx.forward(prefix, X)
    h1, h2 = Hx[: P.shape[0], m], Hx[P.shape[0]:, m]
    ok = (h2 > h1) & (h1 > 0.0)
    slopes = np.zeros((P.shape[0], A.shape[0]))
    if not ok.any():
        return slopes, ok
    sel = np.concatenate([ok, ok])
    Y = query(X[sel])
    r = Y - (np.maximum(Hx[sel] @ W.T + b, 0.0) @ A.T + a0)
    n = int(ok.sum())
    r1, r2 = r[:n], r[n:]
    sl = (r2 - r1) / (h2[ok] - h1[ok])[:, None]
    # off the line by more than its own rounding: a millionth of the move, or ~1e4 ulps of f where the weights
    # guessed already move f by almost nothing
    tol = 1e-6 * np.max(np.abs(r2), axis=1) + 1e-12 * np.max(np.abs(Y), axis=1).reshape(2, n).max(axis=0)
    line = np.max(np.abs(r1 - sl * h1[ok][:, None]), axis=1) <= tol
    idx = np.flatnonzero(ok)
    ok[idx[~line]] = False
    slopes[idx] = sl
    return slopes, ok


#: singular values below this share of the largest count as directions the points do not see: slopes read
#: from float64 outputs carry relative errors of 1e-10 or so, which smaller ones would blow up into weights
RCOND = 1e-6


def _tsvd_solve(M: FloatArray, s: FloatArray) -> tuple[FloatArray, int, np.ndarray]:
    """The least-squares solution of ``M x = s`` within the directions ``M`` sees (singular values above
    :data:`RCOND` of the largest; none along the others), that rank, and which unknowns those others leave
    alone (the ones ``M`` determines)."""
    U, sv, Vt = svd(M, full_matrices=False)
    rank = int(np.sum(sv > RCOND * sv[0])) if sv.size else 0
    x: FloatArray = Vt[:rank].T @ ((U[:, :rank].T @ s) / sv[:rank])
    null = Vt[rank:]
    fixed = np.linalg.norm(null, axis=0) <= 1e-6 if null.shape[0] else np.ones(M.shape[1], dtype=bool)
    return x, rank, fixed


def _misfit(Y: FloatArray, H: FloatArray, W: FloatArray, b: FloatArray, A: FloatArray, a0: FloatArray) -> float:
    return float(np.max(np.abs(Y - (np.maximum(H @ W.T + b, 0.0) @ A.T + a0)), initial=0.0))


def _fit_column(Y: FloatArray, H: FloatArray, W: FloatArray, b: FloatArray, A: FloatArray, a0: FloatArray, m: int,
                rows: np.ndarray, Mb: FloatArray, sb: FloatArray, steps: int = 30
                ) -> tuple[FloatArray, FloatArray] | None:
    """Gauss-Newton on the weights ``c = W[rows, m]`` so that ``A ReLU(W h + b) + a0`` meets the outputs ``Y`` at
    the layer inputs ``H`` (activation patterns from the current weights at each step) and the boundary slopes
    ``Mb c = sb`` hold (weighted by the typical ``h_m`` of ``H``, so both speak in units of ``f``); a step that
    raises the misfit is halved. Returns the layer's weights and the final Jacobian (the points' outputs, then
    the weighted slopes), or None when the misfit stays above float64 rounding."""
    W = W.copy()
    scale = float(np.max(np.abs(Y))) + 1e-300
    h = H[:, m]
    wb = float(np.median(h))

    def resid(Wc: FloatArray) -> FloatArray:
        r = Y - (np.maximum(H @ Wc.T + b, 0.0) @ A.T + a0)
        out: FloatArray = np.concatenate([r.ravel(), wb * (sb - Mb @ Wc[rows, m])])
        return out

    def jac(Wc: FloatArray) -> FloatArray:
        on = (H @ Wc.T + b) > 0.0
        out: FloatArray = (A[None, :, :][:, :, rows] * on[:, None, rows] * h[:, None, None]).reshape(-1, rows.size)
        return out

    r = resid(W)
    cur = float(np.max(np.abs(r)))
    for _ in range(steps):
        delta = _tsvd_solve(np.concatenate([jac(W), wb * Mb]), r)[0]
        t = 1.0
        while t > 1e-3:
            Wt = W.copy()
            Wt[rows, m] += t * delta
            rt = resid(Wt)
            new = float(np.max(np.abs(rt)))
            if new < cur:
                break
            t *= 0.5
        else:
            break
        W, r, cur = Wt, rt, new
        if cur <= 1e-13 * scale:
            break
    # exact weights leave rounding (1e-15 of f); 1e-9 is far below a wrong pattern's or weight's misfit
    if cur > 1e-9 * scale:
        return None
    return W, np.concatenate([jac(W), wb * Mb])


def read_unseen_columns(
    query: QueryFn,
    layers: Sequence[pfx.Layer],
    coverage: np.ndarray,
    points: FloatArray,
    d0: int,
    cfg: ExtractionConfig,
    rng: np.random.Generator,
    max_points: int = 64,
) -> tuple[list[pfx.Layer], np.ndarray, ColumnRead]:
    """The weights of the last hidden layer ``layers[-1]`` marked unseen in ``coverage`` (rows x its inputs),
    read column by column from exact points of the coordinate's own boundary among ``points`` (input
    coordinates). Returns the layers, the coverage after (read weights marked seen) and a diagnostics record.
    Section: attack-notes §3 (rarely active neurons), the output fit of §5."""
    prefix, (W0, b0) = list(layers[:-1]), layers[-1]
    W, b = np.array(W0, dtype=float), np.array(b0, dtype=float)
    cov = np.array(coverage, dtype=bool)
    cols = np.flatnonzero(~cov.all(axis=0))
    if cols.size == 0 or not prefix:
        return [*prefix, (W, b)], cov, ColumnRead(0)
    # one output fit where every unseen coordinate is off; else one per coordinate (where it alone is off:
    # exact only if the other unseen weights do not matter there, which the fit's own check tells)
    shared = _output_layer(query, layers, cols, d0, cfg, rng)
    before, (Wm, bm) = prefix[:-1], prefix[-1]
    Zs, _ = pfx.forward(prefix, points)
    H_before = pfx.forward(before, points)[1] if before else points
    filled = 0
    used: dict[int, int] = {}
    reasons: dict[int, str] = {}
    undetermined: list[tuple[int, int]] = []
    # how often each coordinate is on at random inputs (prefix only): the points read near a common
    # coordinate's boundary see too little of where a rarely active row is on to call its weight undetermined
    on_share = np.mean(pfx.forward(prefix, rng.normal(0.0, cfg.input_scale, size=(4096, d0)))[1] > 0.0, axis=0)
    for m in (int(c) for c in cols):
        A, a0, why, _ = shared if not shared[3] else _output_layer(query, layers, np.array([m]), d0, cfg, rng)
        if why:
            reasons[m] = why
            continue
        # a row off at every output-fit input has no output weights to read (its column of A is zero): its
        # weights on m are left as they are, neither read nor judged
        unknown = np.flatnonzero(~cov[:, m] & (np.abs(A).max(axis=0) > 0.0))
        if unknown.size < int((~cov[:, m]).sum()):
            reasons[m] = "a row with an unseen weight is off at every output-fit input"
        if not unknown.size:
            continue
        size = float(np.linalg.norm(Wm[m])) * np.linalg.norm(H_before, axis=1) + abs(float(bm[m]))
        # exact points of neuron m's boundary: |z_m| at float64 rounding of its terms
        on_m = np.flatnonzero(np.abs(Zs[-1][:, m]) <= 1e-9 * size)
        if on_m.size == 0:
            reasons[m] = "no exact point of the coordinate's own boundary"
            continue
        want = max(max_points, 4 * unknown.size)
        P = points[rng.permutation(on_m)[:want]]
        if P.shape[0] < want:
            # more of its boundary, where other last-layer neurons are on: each adds equations; half about the
            # points known, half from random inputs pushed onto it (other parts of the input space)
            far = pushed_boundary_points(before, Wm[m], float(bm[m]),
                                         rng.normal(0.0, cfg.input_scale, size=((want - P.shape[0]) // 2, d0)))
            more = spread_boundary_points(before, Wm[m], float(bm[m]), P, want - P.shape[0] - far.shape[0],
                                          cfg.input_scale * float(np.sqrt(d0)), rng)
            P = np.concatenate([P, far, more])
        full = [*prefix, (W, b)]
        G = pfx.unit_normals(before, Wm[m], P) if before else np.tile(Wm[m] / np.linalg.norm(Wm[m]), (P.shape[0], 1))
        dist = np.full(P.shape[0], np.inf)
        for i, p in enumerate(P):
            Zp, _ = pfx.forward(full, p[None, :])
            _, jacs = pfx.jacobian(full, p)
            for li, (Z, J) in enumerate(zip(Zp, jacs, strict=True)):
                d = np.abs(Z[0]) / np.maximum(np.linalg.norm(J, axis=1), 1e-300)
                if li == len(prefix) - 1:
                    d[m] = np.inf  # its own boundary, where p lies
                dist[i] = min(dist[i], float(np.min(d)))
        good = np.isfinite(dist) & (dist > 0.0) & (np.linalg.norm(G, axis=1) > 0.0)
        P, G, dist = P[good], G[good], dist[good]
        slope = np.zeros((P.shape[0], A.shape[0]))
        done = np.zeros(P.shape[0], dtype=bool)
        for share in STEP_SHARES:
            todo = np.flatnonzero(~done)
            if not todo.size:
                break
            sl, ok = _slopes(query, prefix, W, b, A, a0, P[todo], G[todo], share * dist[todo], m)
            slope[todo[ok]] = sl[ok]
            done[todo[ok]] = True
        _, Hp = pfx.forward(prefix, P)
        on_last = (Hp @ W.T + b) > 0.0  # the last-layer neurons on at each point (h_m = 0 there)
        eqs: list[FloatArray] = []
        rhs: list[FloatArray] = []
        for k in np.flatnonzero(done):
            S = on_last[k]
            row = np.zeros((A.shape[0], unknown.size))
            row[:, S[unknown]] = A[:, unknown[S[unknown]]]
            eqs.append(row)
            rhs.append(slope[k])
        used[m] = len(eqs)
        if not eqs:
            reasons[m] = f"no step into the coordinate's on-side stayed linear ({P.shape[0]} boundary points)"
            continue
        M, s = np.concatenate(eqs), np.concatenate(rhs)
        seen = np.linalg.norm(M, axis=0) > 0.0
        # the slopes' own scale, or what a weight error of a billionth of the layer's largest would move them by
        ref = max(float(np.max(np.abs(s))), 1e-3 * float(np.max(np.abs(A))) * float(np.max(np.abs(W))))
        s_abs = s + M @ W[unknown, m]  # the slopes as equations in the column itself
        before_read = W[unknown, m].copy()
        if seen.any():
            delta = _tsvd_solve(M[:, seen], s)[0]
            miss = float(np.max(np.abs(M[:, seen] @ delta - s))) / (ref + 1e-300)
            if miss > 1e-6:
                reasons[m] = f"the points' slopes disagree by {miss:.1e} (relative)"
                continue
            W[unknown[seen], m] += delta
        # Deeper in, the last layer's pattern changes with the weights read (each row's boundary enters the
        # on-region where its weight says): a Gauss-Newton fit of the column to f there, from the slopes' values.
        # deeper by steps, each fit starting from the one before (continuation: at a depth the patterns the
        # weights fitted so far predict are mostly right)
        reach = cfg.input_scale * float(np.sqrt(d0))
        J = M
        fitted_inside = False
        Ds: list[FloatArray] = []
        Ys: list[FloatArray] = []
        for depth in INSIDE_DEPTHS:
            D = P[done] + depth * reach * G[done]
            D = D[pfx.forward(prefix, D)[0][-1][:, m] > 0.0]
            if not D.shape[0]:
                continue
            Ds.append(D)
            Ys.append(query(D))
            Dall = np.concatenate(Ds)
            fit = _fit_column(np.concatenate(Ys), pfx.forward(prefix, Dall)[1], W, b, A, a0, m, unknown, M, s_abs)
            if fit is None:
                log.debug("unseen column %d: the fit %.2g deep in its on-region did not converge", m, depth)
                break
            W, J = fit
            fitted_inside = True
        seen = np.linalg.norm(J, axis=0) > 0.0
        if not seen.any():
            reasons[m] = f"{unknown.size} unseen weight(s) left: no row with one is on where the coordinate was seen"
            if on_share[m] < RARE_SHARE and fitted_inside:
                undetermined += [(int(j), m) for j in unknown]
            else:
                W[unknown, m] = before_read
            continue
        rank, fixed = _tsvd_solve(J[:, seen], np.zeros(J.shape[0]))[1:]
        rows = unknown[seen][fixed]
        cov[rows, m] = True
        filled += rows.size
        left = np.setdiff1d(unknown, rows)
        if on_share[m] < RARE_SHARE and fitted_inside:
            # the rest keep the least-squares values: right wherever the coordinate was seen on (a fit inside
            # its on-region that failed says some of them matter there: then they are not judged)
            undetermined += [(int(j), m) for j in left]
        else:
            # the rest go back to what they were, for the output fit and polish after this
            back = np.isin(unknown, left)
            W[unknown[back], m] = before_read[back]
        if left.size:
            reasons[m] = (f"{left.size} of {unknown.size} unseen weight(s) left: off wherever the coordinate was "
                          f"seen on, or seen only in combinations ({rank} of {int(seen.sum())})")
        log.debug("unseen column %d: %d weight(s) read from %d boundary points and %d inside", m, rows.size,
                  len(eqs), sum(D_.shape[0] for D_ in Ds))
    return [*prefix, (W, b)], cov, ColumnRead(filled, used, reasons, tuple(undetermined))
