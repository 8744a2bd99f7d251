"""Ground-truth-free checks: the oracle's noise floor and the self-check on fresh queries."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from relux.attack.result import SelfCheck
from relux.model import MLP
from relux.oracle.base import FloatArray

QueryFn = Callable[[FloatArray], FloatArray]


def measure_noise_floor(query: QueryFn, d: int, scale: float, rng: np.random.Generator, n: int = 8) -> float:
    """Relative disagreement of the oracle with itself: the same points asked alone, in a shuffled
    batch and padded with other points (real BLAS answers differ slightly across batch sizes).

    Returns ``max |Δf| / max |f|`` (0 for a deterministic oracle). Costs ``n + 3 n + ...`` queries.
    """
    X = rng.normal(0.0, scale, size=(n, d))
    pad = rng.normal(0.0, scale, size=(2 * n, d))
    Y1 = query(X)
    perm = rng.permutation(3 * n)
    B = np.concatenate([X, pad])[perm]
    Y2 = query(B)[np.argsort(perm)][:n]
    Y3 = np.concatenate([query(X[i : i + 1]) for i in range(min(n, 4))])
    ref = float(np.max(np.abs(Y1)))
    if ref == 0:
        return 0.0
    dev = max(float(np.max(np.abs(Y1 - Y2))), float(np.max(np.abs(Y1[: Y3.shape[0]] - Y3))))
    return dev / ref


def self_check(
    query: QueryFn,
    model: MLP,
    witnesses: FloatArray,
    normals: FloatArray,
    radii: FloatArray,
    n_random: int,
    scale: float,
    tol: float,
    noise_floor: float,
    rng: np.random.Generator,
) -> SelfCheck:
    """Compare ``model`` with the oracle on fresh points: random ones, and points along lines through
    every witness (random points miss neurons whose active region is small).

    Passes when ``max |f - f_hat| <= max(tol, 100 * noise_floor) * max |f|``.
    """
    d = model.input_dim
    pts = [rng.normal(0.0, scale, size=(n_random, d))]
    if witnesses.size:
        m = witnesses.shape[0]
        for f in (-1.5, -0.5, 0.5, 1.5):
            pts.append(witnesses + (f * radii)[:, None] * normals)
        V = rng.normal(size=(m, d))
        V *= (radii / np.linalg.norm(V, axis=1))[:, None]
        pts.append(witnesses + V)
        pts.append(witnesses - V)
    X = np.concatenate(pts)
    Y = query(X)
    Yh = model.forward(X)
    err = float(np.max(np.abs(Y - Yh)))
    ref = max(float(np.max(np.abs(Y))), np.finfo(float).tiny)
    thr = max(tol, 100.0 * noise_floor)
    rel = err / ref
    return SelfCheck(points=X.shape[0], max_abs_error=err, max_rel_error=rel, tolerance=thr,
                     noise_floor=noise_floor, passed=bool(rel <= thr))
