"""Which weights of a ReLU network its function determines, computed from the network itself (for
:mod:`relux.align` and :mod:`relux.verify`; attack-notes §3 on rarely active neurons).

The weight ``W[j, m]`` from hidden neuron ``m`` to neuron ``j`` of the next layer acts on ``f`` only where
``m`` is on, and there only through ``∂f/∂z_j``: at an input ``x`` it moves ``f`` by ``∂f/∂z_j(x) h_m(x)``
per unit. Where ``m`` is on at a small region only (a neuron on at one input in 10^5), the next layer's
neurons may all be off there but a few, and those few always on together: then some of the weights
leaving ``m`` change nothing anywhere the region reaches, and others only in fixed combinations. No query
can recover them, so a weight error that counts them measures nothing an extraction could do.

:func:`undetermined_weights` finds them for the rarely active neurons of a reference network: points of the
neuron's on-region (from its own boundary, found by bisection, spread around it and stepped into the
on-side), the sensitivity ``∂f/∂z(x) h_m(x)`` of every weight leaving it at each point, and the weights
that the null space of those sensitivities moves. The region is sampled, not proven: inputs out to a few
times the typical input norm.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray

from relux.attack import prefix as pfx
from relux.attack.clouds import moved_copies
from relux.attack.linalg import svd
from relux.attack.polish import bisect_to_boundary
from relux.model import MLP, FloatArray

BoolArray = NDArray[np.bool_]

#: neurons on at fewer than this share of the sample inputs are examined (the others are on together with
#: every neuron of the next layer somewhere, in practice)
RARE_SHARE = 1e-3


def _pre(layers: Sequence[tuple[FloatArray, FloatArray]], X: FloatArray) -> list[FloatArray]:
    """Pre-activations of every one of ``layers`` at the rows of ``X``."""
    return pfx.forward(layers, X)[0]


def _grads(layers: Sequence[tuple[FloatArray, FloatArray]], X: FloatArray, m: int) -> FloatArray:
    """Input gradients of the pre-activation of neuron ``m`` of the last of ``layers`` at the rows of ``X``."""
    return np.array(pfx.gradients(layers[:-1], layers[-1][0][m], X), dtype=float)


def _on_points(layers: Sequence[tuple[FloatArray, FloatArray]], m: int, X: FloatArray, z: FloatArray,
               rng: np.random.Generator, n: int, reach: float) -> FloatArray:
    """Points where neuron ``m`` of the last of ``layers`` is on: the samples where it is, else the samples
    where it is highest pushed up along its gradient (Newton steps on a piecewise linear function), then
    points of its boundary (bisection between on and off samples), spread about and stepped into the on-side."""
    on = X[z > 0]
    if on.shape[0] == 0:
        # the samples where it is highest, pushed up together by Newton steps (1.5 times past the local zero)
        x = X[np.argsort(-z)[:16]].copy()
        for _ in range(30):
            zx = _pre(layers, x)[-1][:, m]
            if (zx > 0).all():
                break
            g = _grads(layers, x, m)
            gg = np.einsum("ij,ij->i", g, g)
            move = (zx <= 0) & (gg > 0)
            x[move] += ((1e-3 * reach - 1.5 * zx[move]) / gg[move])[:, None] * g[move]
        on = x[_pre(layers, x)[-1][:, m] > 0]
        if on.shape[0] == 0:
            return np.zeros((0, X.shape[1]))
    off = X[z <= 0]
    w = layers[-1][0][m]
    b = float(layers[-1][1][m])
    prefix = layers[:-1]
    B = bisect_to_boundary(prefix, w, b, on[rng.integers(on.shape[0], size=n)], off[rng.integers(off.shape[0], size=n)])
    # spread about the boundary found: clouds of three sizes, bisected again
    C = moved_copies(B, 4 * n, reach, (0.01, 0.1, 0.5), rng)
    zc = _pre(layers, C)[-1][:, m]
    if (zc > 0).any() and (zc <= 0).any():
        P, Q = C[zc > 0], C[zc <= 0]
        B = np.concatenate([B, bisect_to_boundary(prefix, w, b, P[rng.integers(P.shape[0], size=n)],
                                                  Q[rng.integers(Q.shape[0], size=n)])])
    G = _grads(layers, B, m)
    ng = np.linalg.norm(G, axis=1)
    B, G = B[ng > 0], G[ng > 0] / ng[ng > 0][:, None]
    Pa = np.concatenate([*(B + depth * reach * G for depth in (1e-3, 1e-2, 0.1, 0.3)), on[:n]])
    out: FloatArray = Pa[_pre(layers, Pa)[-1][:, m] > 0]
    return out


def _output_jacobians(model: MLP, X: FloatArray, li: int) -> FloatArray:
    """``∂f/∂z`` of layer ``li`` (0-based over ``model.layers``) at each row of ``X``: ``(n, k, width)``."""
    layers = model.layers
    Zs = _pre(layers[:-1], X)
    k = model.output_dim
    if li == len(layers) - 1:
        return np.broadcast_to(np.eye(k), (X.shape[0], k, k)).copy()
    G = np.broadcast_to(layers[-1][0], (X.shape[0], *layers[-1][0].shape)).copy()  # ∂f/∂h of the last hidden
    for t in range(len(layers) - 2, li, -1):
        G = (G * (Zs[t] > 0)[:, None, :]) @ layers[t][0]  # ∂f/∂h_{t-1}
    out: FloatArray = G * (Zs[li] > 0)[:, None, :]
    return out


def undetermined_weights(model: MLP, rng: np.random.Generator | None = None, samples: int = 20000,
                         points: int = 96, max_neurons: int = 64) -> list[BoolArray]:
    """Per layer of ``model`` (over ``model.layers``), a mask of its weights that ``f`` does not determine:
    weights leaving a hidden neuron on at fewer than :data:`RARE_SHARE` of ``samples`` N(0, I) and
    ``samples`` U[0, 1]^d inputs (fewer for wide inputs: at most 128 MB of them) that the sensitivities on
    its on-region (``points`` boundary points, each stepped four depths into it) leave free (the module
    docstring). At most ``max_neurons`` per layer are examined, the rarest first; the weights leaving the
    others count as determined. The first layer's mask is all false."""
    gen = rng if rng is not None else np.random.default_rng(0)
    layers = model.layers
    d0 = model.input_dim
    masks = [np.zeros(W.shape, dtype=bool) for W, _ in layers]
    n = max(1000, min(samples, 2**23 // d0))
    X = np.concatenate([gen.normal(size=(n, d0)), gen.random((n, d0))])
    Zs = _pre(layers[:-1], X)
    reach = float(np.sqrt(d0))
    for li in range(len(layers) - 1):
        share = np.mean(Zs[li] > 0, axis=0)
        rare = np.flatnonzero(share < RARE_SHARE)
        for m in (int(j) for j in rare[np.argsort(share[rare], kind="stable")][:max_neurons]):
            P = _on_points(layers[: li + 1], m, X, Zs[li][:, m], gen, points, reach)
            if P.shape[0] == 0:
                masks[li + 1][:, m] = True  # never on where we looked: nothing it sends shows
                continue
            h = np.maximum(_pre(layers[: li + 1], P)[-1][:, m], 0.0)
            S = (_output_jacobians(model, P, li + 1) * h[:, None, None]).reshape(-1, layers[li + 1][0].shape[0])
            seen = np.linalg.norm(S, axis=0) > 0.0
            free = ~seen
            if seen.any():
                _, sv, Vt = svd(S[:, seen], full_matrices=False)
                rank = int(np.sum(sv > 1e-9 * sv[0]))
                null = Vt[rank:]
                if null.shape[0]:
                    idx = np.flatnonzero(seen)
                    free[idx[np.linalg.norm(null, axis=0) > 1e-6]] = True
            masks[li + 1][:, m] = free
    return masks
