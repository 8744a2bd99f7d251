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

from relux.oracle.base import FloatArray, QueryFn

log = logging.getLogger(__name__)
Layer = tuple[FloatArray, FloatArray]


@dataclass(frozen=True)
class NetRefinement:
    """Outcome of :func:`refine_network`: misfits are max |f̂ - f| / max |f| on held-out points."""

    misfit_before: float
    misfit_after: float
    steps: int
    points: int
    reason: str
    fixed_layers: int = 0  # leading layers kept as extracted (over the parameter budget)
    #: held-out inputs where the returned layers miss ``f`` by more than ``accept_misfit`` (relative),
    #: the 16 worst: queried answers that contradict the model, for the self-check to look at again
    misses: FloatArray = field(default_factory=lambda: np.zeros((0, 0)))


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
    parameters moves (the output layer always; its Jacobian holds about ``3 P^2`` numbers). Spends
    ``3 P / k + 128`` queries (``P`` refined parameters, ``k`` outputs), a quarter more held out, and
    the ``extra`` points (where rarely active neurons are on). A misfit above ``max_misfit`` (relative
    to ``max |f|``) is left alone: it comes from a missing neuron or a wrong sign, which steps at fixed
    activation patterns cannot repair, and the steps would cost minutes at 5,000 parameters. One at or
    below ``min_misfit`` is float64 rounding already: nothing to gain either (a misfit of 1e-14 is
    not: steps from there still took 30-20-20-12-4 from 2^-43 to 2^-49). Steps that end above
    ``accept_misfit`` are undone: they bent every weight around a structural error (a rarely active
    neuron missing took random 20-10-10-10-2 seed 2's first layer from 2^-43 to 2^-12), while a model
    that is only imprecise, even by 7e-3, ends near rounding."""
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
    Xv = rng.normal(0.0, input_scale, size=(n // 4 + 32, d0))
    Yv = query(Xv)
    # the fit points are queried only if a step will be tried (see max_misfit and min_misfit)
    yscale = max(float(np.max(np.abs(Yv))), np.finfo(float).tiny)

    def misfit(ls: Sequence[Layer]) -> float:
        return float(np.max(np.abs(_forward(ls, Xv)[2] - Yv))) / yscale

    before = misfit(layers)
    best = before
    steps = 0
    reason = ""
    if before > max_misfit:
        reason = f"misfit {before:.1e} above {max_misfit:.0e}: a structural error, not imprecision"
        max_steps = 0
    elif before <= min_misfit:
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
        # (a rarely active neuron's weights): when their step does not help, a pivoted QR (to 1e-12).
        for exact in (False, True):
            trial = [*layers[:first], *_unpack(layers[first:], theta + _gn_step(J, r, exact))]
            m = misfit(trial)
            if m < best:
                break
        if not m < best:
            reason = reason or "no further improvement"
            break
        layers, best = trial, m
        steps += 1
        if best <= 1e-14:
            break
    if steps and best > accept_misfit:
        reason = (f"{steps} step(s) left the misfit at {best:.1e}, above {accept_misfit:.0e}: undone (a structural "
                  "error, not imprecision)")
        layers = [(np.array(W, dtype=float), np.array(b, dtype=float)) for W, b in start]
        best, steps = before, 0
    log.debug("network refinement: misfit %.1e -> %.1e in %d steps (%s)", before, best, steps, reason)
    e = np.max(np.abs(_forward(layers, Xv)[2] - Yv), axis=1) / yscale
    e = np.where(np.isfinite(e), e, np.inf)  # a NaN answer is a miss
    worst = np.argsort(e)[::-1][:16]
    return layers, NetRefinement(before, best, steps, int(Y.shape[0] + Xv.shape[0]), reason, first,
                                 Xv[worst[e[worst] > accept_misfit]])
