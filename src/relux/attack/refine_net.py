"""Joint refinement of every extracted weight on the oracle's outputs (CJM20 §4.4's precision step,
applied to the whole network).

Once every neuron is known, the network is multilinear in its parameters wherever the activation
pattern is fixed: Gauss-Newton on fresh outputs, at points whose pattern is unambiguous (every
pre-activation far from zero relative to its size), converges to the true parameters up to the
ReLU symmetries (per-neuron scale, which the minimum-norm step leaves alone). Errors left by the
layer-by-layer extraction (a weight seen only at few witnesses, an imprecise earlier layer that the
later ones inherited) shrink to what the oracle's rounding allows. A step is kept only if it lowers
the misfit on held-out points.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import scipy.linalg

from relux.attack.clouds import moved_copies
from relux.attack.clouds import pair_points as cloud_pair_points
from relux.attack.probes import pair_points
from relux.oracle.base import FloatArray, QueryFn

log = logging.getLogger(__name__)
Layer = tuple[FloatArray, FloatArray]

#: relative misfit under which a step that the normal equations cannot improve is not tried again with a
#: pivoted QR: 1e4 times below the self-check's default tolerance (1e-8), a hundred ulps of max |f|
EXACT_BELOW = 1e-12


@dataclass(frozen=True)
class NetRefinement:
    """Outcome of :func:`refine_network`: misfits are max |f̂ - f| / max |f| on random held-out points."""

    misfit_before: float
    misfit_after: float
    steps: int
    points: int
    reason: str
    fixed_layers: int = 0  # leading layers kept as extracted (over the parameter budget)
    #: held-out inputs where the returned layers miss ``f`` by more than ``accept_misfit`` (relative),
    #: the 16 worst: queried answers that contradict the model, for the self-check to look at again
    misses: FloatArray = field(default_factory=lambda: np.zeros((0, 0)))
    #: root mean square misses at the held-out points in rarely active neurons' on-regions and at held-out
    #: pair points (0 without them); ``misfit_*`` are the largest at the random held-out points
    rare_before: float = 0.0
    rare_after: float = 0.0


def _forward(layers: Sequence[Layer], X: FloatArray) -> tuple[list[FloatArray], list[FloatArray], FloatArray]:
    """Inputs of every layer, pre-activations of every hidden layer, output."""
    H = X
    ins: list[FloatArray] = []
    pres: list[FloatArray] = []
    for W, b in layers[:-1]:
        ins.append(H)
        Z = H @ W.T + b
        pres.append(Z)
        H = np.maximum(Z, 0.0)
    ins.append(H)
    W, b = layers[-1]
    return ins, pres, H @ W.T + b


def _jacobian(
    layers: Sequence[Layer], ins: Sequence[FloatArray], pres: Sequence[FloatArray], first: int = 0
) -> FloatArray:
    """d output / d parameters of layers ``first`` onwards at fixed activation patterns: ``(n k, P)``,
    parameters ordered layer by layer as ``W`` (row-major) then ``b``."""
    n = ins[0].shape[0]
    k = layers[-1][0].shape[0]
    G = np.broadcast_to(np.eye(k), (n, k, k)).copy()  # d out / d z of the output layer
    blocks: list[FloatArray] = []
    for li in range(len(layers) - 1, first - 1, -1):
        W, _ = layers[li]
        Hin = ins[li]
        JW = np.einsum("nki,nj->nkij", G, Hin).reshape(n * k, -1)
        blocks.append(np.concatenate([JW, G.reshape(n * k, -1)], axis=1))
        if li > first:
            G = (G @ W) * (pres[li - 1] > 0)[:, None, :]
    return np.concatenate(blocks[::-1], axis=1)


def _gn_step(J: FloatArray, r: FloatArray, exact: bool = False) -> FloatArray:
    """The Gauss-Newton step ``J s ≈ -r``: semi-normal equations on the column-scaled ``J`` (its Gram
    matrix costs a tenth of a QR factorisation), with one step of iterative refinement, and a ridge
    of 1e-12 (relative) so that the symmetry directions (per-neuron scale, exactly singular) get no
    step. A solve this inexact still converges: each Gauss-Newton step re-measures the residual.
    ``exact``: a pivoted QR instead (minimum-norm, singular values down to 1e-12 of the largest)."""
    col = np.linalg.norm(J, axis=0)
    col[col == 0] = 1.0
    Jn = J / col
    if exact:
        return np.asarray(scipy.linalg.lstsq(Jn, -r, cond=1e-12, lapack_driver="gelsy")[0] / col)
    G = Jn.T @ Jn
    G[np.diag_indices_from(G)] += 1e-12 * float(np.max(np.diag(G), initial=1.0))
    cho = scipy.linalg.cho_factor(G, check_finite=False)
    s = scipy.linalg.cho_solve(cho, Jn.T @ -r, check_finite=False)
    s += scipy.linalg.cho_solve(cho, Jn.T @ (-r - Jn @ s), check_finite=False)
    return np.asarray(s / col)


def _balanced_points(
    layers: Sequence[Layer],
    X: FloatArray,
    first: int,
    budget: int,
    d0: int,
    input_scale: float,
    rng: np.random.Generator,
    draws: int = 20,
) -> FloatArray:
    """Inputs where the refined hidden neurons that ``X`` rarely switches on are on, chosen with the
    current estimate (no queries): a neuron's weights are seen only where it is on, and a neuron on
    at 1% of random inputs would otherwise steer its fit from a dozen points. Each neuron gets up to
    ``2 (fan-in + 1)`` such points, ``budget`` in all, from at most ``draws`` batches of candidates."""
    hidden = range(max(first, 0), len(layers) - 1)
    need = {i: 2 * (layers[i][0].shape[1] + 1) for i in hidden}

    def on(P: FloatArray) -> list[np.ndarray]:
        _, pres, _ = _forward(layers, P)
        return [pres[i] > 0 for i in hidden]

    have = [m.sum(axis=0) for m in on(X)]
    picked: list[FloatArray] = []
    total = 0
    for _ in range(draws):
        short = [np.maximum(need[i] - h, 0) for i, h in zip(hidden, have, strict=True)]
        if total >= budget or not any(s.any() for s in short):
            break
        C = rng.normal(0.0, input_scale, size=(max(budget, 256), d0))
        masks = on(C)
        # a candidate is taken if it switches on a neuron still short of points
        useful = np.zeros(C.shape[0], dtype=bool)
        for m, sh in zip(masks, short, strict=True):
            useful |= (m & (sh > 0)[None, :]).any(axis=1)
        take = np.flatnonzero(useful)[: budget - total]
        if take.size == 0:
            continue
        picked.append(C[take])
        total += take.size
        have = [h + m[take].sum(axis=0) for h, m in zip(have, masks, strict=True)]
    return np.concatenate(picked) if picked else np.zeros((0, d0))


def _covering_points(
    layers: Sequence[Layer], X: FloatArray, first: int, target: int, rng: np.random.Generator
) -> FloatArray:
    """A subset of ``X`` for the Gauss-Newton rows: for every refined hidden neuron (and every neuron
    feeding the first refined layer), up to ``2 (fan-in + 1)`` points where it is on (its incoming
    weights show there only) and as many where it is off (a neuron on at every point is linear there, and
    its bias trades with the next layer's); for a refined neuron on at under a tenth of them, two where it
    is on together with each coordinate of its input; rarest first, then random others up to ``target``
    points. Each row costs ``P^2`` flops in the Gram matrix, and the pool (witness
    neighbourhoods, straddle points of every boundary) is several times larger than the rank needs: at
    3,690 parameters (digits 64-40x4-10) a step over the whole pool took 40 s."""
    # the layer before the first refined one too: a column of the first refined layer shows only where
    # its neuron is on (CM24 unitary: the output layer alone is refined, over 200 last-layer neurons)
    hidden = range(max(first - 1, 0), len(layers) - 1)
    if X.shape[0] <= target or not len(hidden):
        return X
    ins, pres, _ = _forward(layers, X)
    on = np.concatenate([pres[i] > 0 for i in hidden], axis=1)
    fan = np.concatenate([np.full(layers[i][0].shape[0], layers[i][0].shape[1] + 1) for i in hidden])
    # and each weight of a neuron on at under a tenth of the pool, where it and the weight's coordinate
    # are on together (common neurons have such points in plenty)
    pairs = [(pres[i][:, j] > 0)[:, None] & (ins[i] > 0) for i in hidden if i >= max(first, 1)
             for j in np.flatnonzero(np.mean(pres[i] > 0, axis=0) < 0.1)]
    S = np.concatenate([on, ~on, *pairs], axis=1)
    n_pair = S.shape[1] - 2 * on.shape[1]
    need = np.minimum(np.concatenate([2 * fan, 2 * fan, np.full(n_pair, 2)]), S.sum(axis=0))
    chosen = np.zeros(X.shape[0], dtype=bool)
    have = np.zeros(S.shape[1], dtype=int)
    for c in np.argsort(S.sum(axis=0), kind="stable"):
        short = int(need[c] - have[c])
        if short <= 0:
            continue
        cand = np.flatnonzero(S[:, c] & ~chosen)
        take = rng.permutation(cand)[:short]
        chosen[take] = True
        have += S[take].sum(axis=0)
    rest = rng.permutation(np.flatnonzero(~chosen))[: max(target - int(chosen.sum()), 0)]
    chosen[rest] = True
    return X[chosen]


def _rare_clouds(
    layers: Sequence[Layer], X: FloatArray, first: int, reach: float, rng: np.random.Generator, rounds: int = 6,
    batch: int = 256,
) -> FloatArray:
    """Inputs in the on-region of every refined hidden neuron that ``X`` switches on at fewer than
    ``2 (fan-in + 1)`` points (no queries): ``X``'s points where it is on, moved by random steps of 1% to 30%
    of ``reach``, kept where it is still on and another coordinate of its input is on with it. A rarely
    active neuron's weight on a coordinate is seen only where both are on: its witnesses and their
    neighbours (the pool) show some coordinates, and a weight left wrong where the neuron is on at 3e-4 of
    inputs and the coordinate with it at 1e-5 (digits 64-40x4-10, last hidden layer) is what a self-check
    of 10^5 points finds."""
    hidden = range(max(first, 0), len(layers) - 1)
    if not len(hidden) or not X.shape[0]:
        return np.zeros((0, X.shape[1]))
    ins, pres, _ = _forward(layers, X)
    out: list[FloatArray] = []
    for i in hidden:
        need = 2 * (layers[i][0].shape[1] + 1)
        on = pres[i] > 0
        for j in np.flatnonzero((on.sum(axis=0) > 0) & (on.sum(axis=0) < need)):
            seeds = X[on[:, j]]
            seen = ((ins[i][on[:, j]] > 0).sum(axis=0) if i else np.full(X.shape[1], need)).astype(int)
            got = int(on[:, j].sum())
            for _ in range(rounds):
                C = moved_copies(seeds, batch, reach, (0.01, 0.03, 0.1, 0.3), rng)
                ci, cp, _ = _forward(layers, C)
                hit = cp[i][:, j] > 0
                if not hit.any():
                    continue
                # a candidate is taken while the neuron is short of points, or when it shows a coordinate seen
                # fewer than twice with it
                new = (ci[i] > 0) & (seen < 2)[None, :] if i else np.zeros((C.shape[0], 1), dtype=bool)
                take = np.flatnonzero(hit & (new.any(axis=1) | (np.cumsum(hit) <= need - got)))
                if take.size:
                    out.append(C[take])
                    got += take.size
                    if i:
                        seen += (ci[i][take] > 0).sum(axis=0)
                if got >= need and (not i or np.all(seen >= 2)):
                    break
            if i and np.any(seen < 2):
                P = cloud_pair_points(layers, i, int(j), seeds, np.flatnonzero(seen < 2), rng)
                out.append(P)
    return np.concatenate(out) if out else np.zeros((0, X.shape[1]))


def _unpack(layers: Sequence[Layer], theta: FloatArray) -> list[Layer]:
    out: list[Layer] = []
    pos = 0
    for W, b in layers:
        nw = W.size
        out.append((theta[pos : pos + nw].reshape(W.shape), theta[pos + nw : pos + nw + b.size].copy()))
        pos += nw + b.size
    return out


def _margin_ok(
    layers: Sequence[Layer], pres: Sequence[FloatArray], ins: Sequence[FloatArray], rel: float
) -> np.ndarray:
    """Points whose every hidden pre-activation is farther than ``rel`` (relative) from zero."""
    ok = np.ones(pres[0].shape[0], dtype=bool) if pres else np.ones(ins[0].shape[0], dtype=bool)
    for (W, b), Z, Hin in zip(layers[:-1], pres, ins[:-1], strict=True):
        size = np.linalg.norm(Hin, axis=1, keepdims=True) * np.linalg.norm(W, axis=1) + np.abs(b)
        ok &= np.all(np.abs(Z) > rel * size, axis=1)
    return ok


def refine_network(
    query: QueryFn,
    layers: Sequence[Layer],
    d0: int,
    input_scale: float,
    rng: np.random.Generator,
    max_steps: int = 5,
    margin: float = 1e-4,
    extra: FloatArray | None = None,
    max_params: int = 5000,
    max_misfit: float = 1e-2,
    min_misfit: float = 4 * float(np.finfo(float).eps),
    accept_misfit: float = 1e-8,
) -> tuple[list[Layer], NetRefinement]:
    """Gauss-Newton on the parameters of ``layers`` (hidden layers and output layer) against fresh
    outputs; see the module docstring. Only the longest tail of layers with at most ``max_params``
    parameters moves (the output layer always; its Jacobian holds about ``3 P^2`` numbers). Its points
    are random ones, the ``extra`` points (where rarely active neurons are on) and clouds in rarely active
    neurons' on-regions, of which :func:`_covering_points` keeps ``3 P / k + 128`` or more (``P`` refined
    parameters, ``k`` outputs); a quarter as many random ones and a fifth of the clouds are held out. A
    misfit above ``max_misfit`` (relative to ``max |f|``) is left alone: it comes from a missing neuron or a
    wrong sign, which steps at fixed activation patterns cannot repair, and the steps would cost minutes at
    5,000 parameters. One at or below ``min_misfit`` is float64 rounding already: nothing to gain either (a
    misfit of 1e-14 is not: steps from there still took 30-20-20-12-4 from 2^-43 to 2^-49). Steps that end above
    ``accept_misfit`` are undone: they bent every weight around a structural error (a rarely active neuron
    missing took random 20-10-10-10-2 seed 2's first layer from 2^-43 to 2^-12), while a model that is only
    imprecise, even by 7e-3, ends near rounding. A fifth of the points in rarely active neurons' on-regions
    (:func:`_rare_clouds`) is held out too, as is a fifth of the points where a refined row and an input
    coordinate seldom on together are on together (:func:`relux.attack.probes.pair_points`, at most ``2 n``
    for ``n`` random ones: the first probe of the rarest pairs; the rest with an unambiguous pattern join the
    fit whatever the covering keeps): a step is taken when it lowers the sum of the largest miss at the
    random held-out points and the root mean square one at those, without raising the former above where it
    was (or ``accept_misfit``)."""
    start = list(layers)
    layers = [(np.array(W, dtype=float), np.array(b, dtype=float)) for W, b in layers]
    k = layers[-1][0].shape[0]
    # the longest tail of layers within the parameter budget is refined; the layers before it stay fixed
    sizes = [W.size + b.size for W, b in layers]
    first = len(layers) - 1
    while first > 0 and sum(sizes[first - 1 :]) <= max_params:
        first -= 1
    P = sum(sizes[first:])
    n = 3 * P // k + 128
    X = rng.normal(0.0, input_scale, size=(n, d0))
    if extra is not None and extra.size:
        X = np.concatenate([X, extra])
    X = np.concatenate([X, _balanced_points(layers, X, first, n, d0, input_scale, rng)])
    # rarely active neurons' on-regions: four fifths for the fit, a fifth held out (random held-out points
    # would not see a step that bends their weights)
    cloud = rng.permutation(_rare_clouds(layers, X, first, input_scale * float(np.sqrt(d0)), rng))
    # and where a refined row and an input coordinate seldom on together are on together (the only inputs
    # where its weight on that coordinate shows): four fifths for the fit, those with an unambiguous pattern
    # kept whatever the covering takes
    pairs = pair_points(layers, 2 * n, input_scale, rng, first=first).points
    held = np.concatenate([cloud[: cloud.shape[0] // 5], pairs[: pairs.shape[0] // 5]])
    X = np.concatenate([X, cloud[cloud.shape[0] // 5:]])
    ins, pres, _ = _forward(layers, X)
    X = _covering_points(layers, X[_margin_ok(layers, pres, ins, margin)], first, n, rng)
    pairs = pairs[pairs.shape[0] // 5:]
    ins, pres, _ = _forward(layers, pairs)
    X = np.concatenate([X, pairs[_margin_ok(layers, pres, ins, margin)]])
    n_g = n // 4 + 32
    Xv = np.concatenate([rng.normal(0.0, input_scale, size=(n_g, d0)), held])
    Yv = query(Xv)
    # the fit points are queried only if a step will be tried (see max_misfit and min_misfit)
    yscale = max(float(np.max(np.abs(Yv))), np.finfo(float).tiny)

    def misfit(ls: Sequence[Layer]) -> tuple[float, float]:
        """The largest miss at the random held-out points, and the root mean square one at the others (in
        rarely active neurons' on-regions, and pair points: some may stay wrong, where a row's pattern is,
        while the rest improve)."""
        e = np.max(np.abs(_forward(ls, Xv)[2] - Yv), axis=1) / yscale
        e = np.where(np.isfinite(e), e, np.inf)
        return float(np.max(e[:n_g])), float(np.sqrt(np.mean(e[n_g:] ** 2))) if e.size > n_g else 0.0

    before, rare_before = misfit(layers)
    best, rare_best = before, rare_before
    steps = 0
    reason = ""
    if before > max_misfit:
        reason = f"misfit {before:.1e} above {max_misfit:.0e}: a structural error, not imprecision"
        max_steps = 0
    elif before + rare_before <= min_misfit:
        reason = f"misfit {before:.1e}: float64 rounding already"
        max_steps = 0
    Y = query(X) if max_steps > 0 else np.zeros((0, k))
    for _ in range(max_steps):
        ins, pres, out = _forward(layers, X)
        keep = _margin_ok(layers, pres, ins, margin)
        if keep.sum() * k < P:
            reason = f"too few points with an unambiguous pattern ({int(keep.sum())})"
            break
        J = _jacobian(layers, [h[keep] for h in ins], [z[keep] for z in pres], first)
        r = (out[keep] - Y[keep]).reshape(-1)
        theta = np.concatenate([np.concatenate([W.ravel(), b]) for W, b in layers[first:]])
        # The normal equations lose the directions with singular values below ~1e-6 of the largest
        # (a rarely active neuron's weights): when their step does not help, a pivoted QR (to 1e-12),
        # unless the misfit is down to EXACT_BELOW already (far under any self-check's tolerance: the QR
        # costs eight times the normal equations, 23 s at 3,690 parameters, digits 64-40x4-10).
        better = False
        for exact in (False, True) if best + rare_best > EXACT_BELOW else (False,):
            trial = [*layers[:first], *_unpack(layers[first:], theta + _gn_step(J, r, exact))]
            m, mf = misfit(trial)
            better = m + mf < best + rare_best and m <= max(best, accept_misfit)
            if better:
                break
        if not better:
            reason = reason or "no further improvement"
            break
        layers, best, rare_best = trial, m, mf
        steps += 1
        if best + rare_best <= 1e-14:
            break
    if steps and best > accept_misfit:
        reason = (f"{steps} step(s) left the misfit at {best:.1e}, above {accept_misfit:.0e}: undone (a structural "
                  "error, not imprecision)")
        layers = [(np.array(W, dtype=float), np.array(b, dtype=float)) for W, b in start]
        best, rare_best, steps = before, rare_before, 0
    log.debug("network refinement: misfit %.1e -> %.1e in %d steps (%s)", before, best, steps, reason)
    e = np.max(np.abs(_forward(layers, Xv)[2] - Yv), axis=1) / yscale
    e = np.where(np.isfinite(e), e, np.inf)  # a NaN answer is a miss
    worst = np.argsort(e)[::-1][:16]
    return layers, NetRefinement(before, best, steps, int(Y.shape[0] + Xv.shape[0]), reason, first,
                                 Xv[worst[e[worst] > accept_misfit]], rare_before, rare_best)
