"""Finite-difference gradients of a piecewise-linear oracle (attack-notes §3).

On an affine piece a forward difference is exact up to rounding, whose error is about
``eps * |f| / h``; so callers pass the largest steps that stay inside the piece.
"""

from __future__ import annotations

import numpy as np

from relux.oracle.base import FloatArray, QueryFn

#: Largest number of float64 elements of one finite-difference batch (64 MiB).
_MAX_BATCH_ELEMS = 1 << 23


def fd_gradients(
    query: QueryFn,
    X: FloatArray,
    steps: FloatArray,
    basis: FloatArray | None = None,
) -> tuple[FloatArray, FloatArray]:
    """Forward-difference Jacobians of ``f`` at every row of ``X``.

    Args:
        query: the oracle's batched query function.
        X: base points, shape ``(n, d)``.
        steps: step per point and direction, shape ``(n, r)`` (or ``(n,)`` for one step per point).
        basis: directions as rows, shape ``(r, d)``; ``None`` means the ``d`` coordinate directions.

    Returns:
        ``(J, F)``: ``J`` of shape ``(n, k, r)`` holds the directional derivatives of each output
        along each basis row (the gradient itself when ``basis`` is ``None``); ``F`` of shape
        ``(n, k)`` holds ``f(X)``. Costs ``n * (r + 1)`` queries.
    """
    X = np.asarray(X, dtype=np.float64)
    n, d = X.shape
    r = d if basis is None else basis.shape[0]
    S = np.asarray(steps, dtype=np.float64)
    if S.ndim == 1:
        S = np.repeat(S[:, None], r, axis=1)
    per_point = (r + 1) * d
    chunk = max(1, _MAX_BATCH_ELEMS // per_point)
    Js: list[FloatArray] = []
    Fs: list[FloatArray] = []
    for s in range(0, n, chunk):
        Xc = X[s : s + chunk]
        Sc = S[s : s + chunk]
        m = Xc.shape[0]
        P = np.repeat(Xc[:, None, :], r + 1, axis=1)  # (m, r+1, d)
        if basis is None:
            idx = np.arange(r)
            P[:, 1 + idx, idx] += Sc
            # The step actually taken is the difference of the representable numbers.
            H = P[:, 1 + idx, idx] - Xc
        else:
            P[:, 1:, :] += Sc[:, :, None] * basis[None, :, :]
            H = Sc
        Y = query(P.reshape(-1, d)).reshape(m, r + 1, -1)
        F0 = Y[:, 0, :]
        J = (Y[:, 1:, :] - F0[:, None, :]) / H[:, :, None]  # (m, r, k)
        Js.append(np.transpose(J, (0, 2, 1)))
        Fs.append(F0)
    return np.concatenate(Js), np.concatenate(Fs)
