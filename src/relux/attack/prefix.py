"""The known prefix: hidden layers already recovered, with their signs, as a local linear map.

Everything here is computed from estimates only (no queries): pre-activations, the layer input of
the layer being extracted, and the local Jacobian ``M_x`` from the network input to that layer input
(attack-notes §3, "space of control").
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from relux.attack.linalg import svd
from relux.oracle.base import FloatArray

Layer = tuple[FloatArray, FloatArray]


def forward(layers: Sequence[Layer], X: FloatArray) -> tuple[list[FloatArray], FloatArray]:
    """Pre-activations of every known layer and the post-activation of the last, for rows of ``X``."""
    H = X
    Zs: list[FloatArray] = []
    for W, b in layers:
        Z = H @ W.T + b
        Zs.append(Z)
        H = np.maximum(Z, 0.0)
    return Zs, H


def input_space(layers: Sequence[Layer]) -> tuple[FloatArray, FloatArray] | None:
    """Orthonormal rows ``V`` (``r1 x d0``) spanning the first layer's row space, and ``W1 V^T``, when
    that space is smaller than the input; else None.

    Every input-space gradient behind the prefix is a combination of first-layer rows, so Jacobians,
    spaces of control and distances along them can all be computed in these ``r1`` coordinates
    (:func:`jacobian` with ``first``) and lifted by ``@ V`` only where a query point is formed. At
    CIFAR scale (3,072 inputs, 256 first-layer rows) that makes each local Jacobian and its SVD about
    ten times cheaper.
    """
    if not layers:
        return None
    W1 = layers[0][0]
    if W1.shape[0] >= W1.shape[1]:
        return None
    _, S, Vt = svd(W1, full_matrices=False)
    r = int(np.sum(S > W1.shape[1] * np.finfo(float).eps * (S[0] if S.size else 0.0)))
    if r == 0 or r >= W1.shape[1]:
        return None
    V = Vt[:r].copy()
    return V, W1 @ V.T


def jacobian(
    layers: Sequence[Layer], x: FloatArray, first: FloatArray | None = None
) -> tuple[FloatArray, list[FloatArray]]:
    """Local Jacobian ``M_x`` (``d_last x d0``) of the last known layer's output at one point, and the
    Jacobian of every known layer's pre-activation (for distances to its boundaries). With ``first``
    (``W1 V^T`` from :func:`input_space`) both are in the coordinates of ``V``'s rows: multiply by
    ``V`` for the input-space ones (the activation pattern still comes from the full layers at ``x``)."""
    if not layers:
        return np.eye(x.shape[0]), []
    M: FloatArray | None = None  # the identity, never formed (d0 x d0 would dominate the cost)
    h = x
    pre_jacs: list[FloatArray] = []
    for W, b in layers:
        z = W @ h + b
        if M is None:
            Jz = np.array(W if first is None else first, dtype=float)
        else:
            Jz = W @ M
        pre_jacs.append(Jz)
        M = (z > 0)[:, None] * Jz
        h = np.maximum(z, 0.0)
    assert M is not None
    return M, pre_jacs


def unit_normal(layers: Sequence[Layer], w: FloatArray, x: FloatArray) -> FloatArray | None:
    """Unit input-space gradient at ``x`` of the pre-activation ``w·h(x) + b`` of a row behind the
    prefix (the normal of its boundary there); None where it vanishes."""
    if layers:
        M, _ = jacobian(layers, x)
        n = w @ M
    else:
        n = np.asarray(w, dtype=float)  # a first-layer row: no d0 x d0 identity to multiply by
    nn = float(np.linalg.norm(n))
    if nn == 0.0:
        return None
    out: FloatArray = n / nn
    return out


def gradients(layers: Sequence[Layer], w: FloatArray, X: FloatArray) -> FloatArray:
    """Input gradients of the pre-activation ``w·h(x) + b`` of a row behind the prefix at every row of
    ``X`` (reverse mode through each row's activation pattern)."""
    Zs, _ = forward(layers, X)
    G: FloatArray = np.broadcast_to(np.asarray(w, dtype=float), (X.shape[0], w.size))
    for (W, _), Z in zip(reversed(layers), reversed(Zs), strict=True):
        G = (G * (Z > 0)) @ W
    return G


def unit_normals(layers: Sequence[Layer], w: FloatArray, X: FloatArray) -> FloatArray:
    """:func:`unit_normal` at every row of ``X`` at once (:func:`gradients`, normalised); a row is all
    zero where the gradient vanishes."""
    G = gradients(layers, w, X)
    nn = np.linalg.norm(G, axis=1, keepdims=True)
    out: FloatArray = np.divide(G, nn, out=np.zeros_like(G), where=nn > 0)
    return out


def directional(layers: Sequence[Layer], w: FloatArray, b: float, X: FloatArray, N: FloatArray
                ) -> tuple[FloatArray, FloatArray]:
    """The pre-activation ``w·h(x) + b`` at every row of ``X`` and its derivative along the matching row
    of ``N`` (forward mode through the activation patterns at ``X``)."""
    H, D = X, N
    for W, bl in layers:
        Z = H @ W.T + bl
        on = Z > 0
        H = np.where(on, Z, 0.0)
        D = np.where(on, D @ W.T, 0.0)
    return H @ w + b, D @ w


def _patterns(Zs: Sequence[FloatArray]) -> tuple[np.ndarray, np.ndarray]:
    """The distinct activation patterns of the layers before the last (which fix every known neuron's
    gradient) among the points whose pre-activations are ``Zs``: a representative point of each, and
    each point's pattern."""
    n = Zs[0].shape[0]
    if len(Zs) == 1:  # the first layer's gradients are its rows, wherever the point is
        return np.zeros(min(n, 1), dtype=int), np.zeros(n, dtype=int)
    keys = np.packbits(np.concatenate([Z > 0 for Z in Zs[:-1]], axis=1), axis=1)
    _, rep, inv = np.unique(keys, axis=0, return_index=True, return_inverse=True)
    return np.asarray(rep), np.asarray(inv).reshape(-1)


#: The screen of :func:`boundary_distances`: per round, each point's next ``SCREEN_BATCH`` neurons by
#: lower bound get their exact gradient norms; after ``SCREEN_ROUNDS`` rounds the points still open
#: take every gradient.
SCREEN_BATCH = 8
SCREEN_ROUNDS = 8


def boundary_distances(
    layers: Sequence[Layer], X: FloatArray, chunk: int | None = None, first: FloatArray | None = None
) -> FloatArray:
    """:func:`boundary_distance` at every row of ``X`` (``first`` as in :func:`jacobian`), without
    forming every neuron's gradient. The gradient of a layer-``l`` neuron is its row, masked by the
    layer before's pattern, times the Jacobian before it, whose norm is at most the product of the
    earlier layers' spectral norms; so ``|z| / (|masked row| · product)`` bounds its distance from
    below. The exact norm (one vector-Jacobian product) is formed only for neurons whose bound is
    below the best distance found so far, which gives the minimum of forming them all, to rounding.
    Points the screen leaves open after ``SCREEN_ROUNDS`` rounds form every gradient once per
    activation pattern (``chunk`` patterns, or products, at a time; by default as many as fit in
    32 MB)."""
    n = X.shape[0]
    out = np.full(n, np.inf)
    if not layers or n == 0:
        return out
    Zs, _ = forward(layers, X)
    mats = [layers[0][0] if first is None else first] + [W for W, _ in layers[1:]]
    with np.errstate(divide="ignore", invalid="ignore"):
        n1 = np.linalg.norm(mats[0], axis=1)
        out[:] = np.min(np.where(n1 > 0, np.abs(Zs[0]) / n1, np.inf), axis=1)
    if len(layers) == 1:
        return out
    ons = [Z > 0 for Z in Zs[:-1]]
    bounds: list[FloatArray] = []
    reach = 1.0  # the product of the spectral norms before the layer (no bound past a non-finite one)
    for li in range(1, len(layers)):
        prev = mats[li - 1]
        reach *= float(np.linalg.norm(prev, 2)) if prev.size and np.all(np.isfinite(prev)) else np.inf
        # |row masked by the pattern before|, each row scaled by its largest entry so that no square
        # underflows
        top = np.max(np.abs(mats[li]), axis=1, initial=0.0)
        unit = np.divide(mats[li], top[:, None], out=np.zeros_like(mats[li]), where=top[:, None] > 0)
        masked = np.sqrt(ons[li - 1].astype(float) @ (unit.T ** 2)) * top  # (n, d_l)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            bounds.append(np.where(masked * reach > 0, np.abs(Zs[li]) / (masked * reach), np.inf))
    lb = np.concatenate(bounds, axis=1)
    layer_of = np.concatenate([np.full(B.shape[1], li + 1) for li, B in enumerate(bounds)])
    neuron = np.concatenate([np.arange(B.shape[1]) for B in bounds])
    order = np.argsort(lb, axis=1)
    step = max(1, 2**22 // max(M.shape[1] for M in mats))  # products formed at a time (32 MB)
    done = 0
    while done < lb.shape[1]:
        cols = order[:, done : done + SCREEN_BATCH]
        P, K = np.nonzero(np.take_along_axis(lb, cols, axis=1) < out[:, None])
        if P.size == 0:
            return out
        if done >= SCREEN_BATCH * SCREEN_ROUNDS:
            break
        c = cols[P, K]
        for li in np.unique(layer_of[c]):
            sel = np.flatnonzero(layer_of[c] == li)
            for s0 in range(0, sel.size, step):
                pts, idx = P[sel[s0 : s0 + step]], neuron[c[sel[s0 : s0 + step]]]
                G = mats[li][idx]
                for k in range(li - 1, -1, -1):
                    G = (G * ons[k][pts]) @ mats[k]
                nrm = np.linalg.norm(G, axis=1)
                with np.errstate(divide="ignore", invalid="ignore"):
                    np.minimum.at(out, pts, np.where(nrm > 0, np.abs(Zs[li][pts, idx]) / nrm, np.inf))
        done += SCREEN_BATCH
    else:
        return out  # every neuron screened or formed
    left = np.unique(P)
    Zl = [Z[left] for Z in Zs]
    rep, inv = _patterns(Zl)
    norms = _pattern_norms(layers, [Z[rep] for Z in Zl], chunk, first)
    for Z, N in zip(Zl[1:], norms[1:], strict=True):
        Np = N[inv]
        with np.errstate(divide="ignore", invalid="ignore"):
            out[left] = np.minimum(out[left], np.min(np.where(Np > 0, np.abs(Z) / Np, np.inf), axis=1))
    return out


def _pattern_norms(
    layers: Sequence[Layer], Zs: Sequence[FloatArray], chunk: int | None, first: FloatArray | None
) -> list[FloatArray]:
    """Per layer, the norms of its neurons' input gradients (``(patterns, d_l)``) under the activation
    patterns of the pre-activations ``Zs`` (one row per pattern)."""
    n = Zs[0].shape[0]
    if chunk is None:
        d_in = first.shape[1] if first is not None else layers[0][0].shape[1]
        chunk = max(1, 2**22 // (max(W.shape[0] for W, _ in layers) * d_in))
    out = [np.empty((n, W.shape[0])) for W, _ in layers]
    for c0 in range(0, n, chunk):
        M: FloatArray | None = None  # (patterns, d_l, d0): Jacobian of the layer output
        m = min(chunk, n - c0)
        for li, ((W, _), Z) in enumerate(zip(layers, Zs, strict=True)):
            if M is None:
                W0 = W if first is None else first
                J = np.broadcast_to(W0, (m, *W0.shape))
            else:
                _, d_prev, d_in = M.shape  # one product for the whole chunk
                J = (W @ M.transpose(1, 0, 2).reshape(d_prev, m * d_in)).reshape(W.shape[0], m, d_in).transpose(1, 0, 2)
            out[li][c0 : c0 + m] = np.linalg.norm(J, axis=2)
            M = J * (Z[c0 : c0 + m] > 0)[:, :, None]
    return out


def boundary_distance(layers: Sequence[Layer], x: FloatArray, first: FloatArray | None = None) -> float:
    """Distance (to first order) from ``x`` to the nearest boundary of any known neuron (``first``: as
    in :func:`jacobian`; the gradients' norms do not change)."""
    if not layers:
        return float("inf")
    Zs, _ = forward(layers, x[None, :])
    _, pre_jacs = jacobian(layers, x, first)
    best = float("inf")
    for Z, J in zip(Zs, pre_jacs, strict=True):
        norms = np.linalg.norm(J, axis=1)
        ok = norms > 0
        if ok.any():
            best = min(best, float(np.min(np.abs(Z[0, ok]) / norms[ok])))
    return best


def safe_steps(
    layers: Sequence[Layer], x: FloatArray, basis: FloatArray, first: FloatArray | None = None
) -> FloatArray:
    """Per basis direction, the distance from ``x`` along it to the nearest known boundary (``basis``
    in the coordinates of :func:`input_space` when ``first`` is given)."""
    out = np.full(basis.shape[0], np.inf)
    if not layers:
        return out
    Zs, _ = forward(layers, x[None, :])
    _, pre_jacs = jacobian(layers, x, first)
    for Z, J in zip(Zs, pre_jacs, strict=True):
        rate = np.abs(J @ basis.T)  # (d_l, r)
        with np.errstate(divide="ignore", invalid="ignore"):
            # a row that does not move along a direction never reaches its boundary that way
            dist = np.where(rate > 0, np.abs(Z[0])[:, None] / rate, np.inf)
        out = np.minimum(out, np.min(dist, axis=0))
    return out


def safe_steps_many(
    layers: Sequence[Layer], X: FloatArray, basis: FloatArray, first: FloatArray | None = None
) -> FloatArray:
    """:func:`safe_steps` at every row of ``X``: ``(n, r)``, to rounding. Each activation pattern's
    gradients are formed once; the pieces on either side of a line's kinks behind an all-on prefix all
    share one."""
    out = np.full((X.shape[0], basis.shape[0]), np.inf)
    if not layers or X.shape[0] == 0:
        return out
    Zs, _ = forward(layers, X)
    rep, inv = _patterns(Zs)
    rates: list[list[FloatArray]] = [[] for _ in layers]  # per layer, per pattern: (d_l, r)
    for k in rep:
        # the pattern as the batch saw it (a lone product may round a value at a boundary the other
        # way, and the whole group would take its gradients)
        M: FloatArray | None = None
        for li, ((W, _), Z) in enumerate(zip(layers, Zs, strict=True)):
            J = np.asarray(W if first is None else first, dtype=float) if M is None else W @ M
            rates[li].append(np.abs(J @ basis.T))
            M = (Z[k] > 0)[:, None] * J
    for Z, R in zip(Zs, rates, strict=True):
        Rs = np.stack(R)
        step = max(1, 2**22 // max(1, Rs.shape[1] * Rs.shape[2]))
        for c0 in range(0, X.shape[0], step):
            rate = Rs[inv[c0 : c0 + step]]
            with np.errstate(divide="ignore", invalid="ignore"):
                # a row that does not move along a direction never reaches its boundary that way
                dist = np.where(rate > 0, np.abs(Z[c0 : c0 + step])[:, :, None] / rate, np.inf)
            out[c0 : c0 + step] = np.minimum(out[c0 : c0 + step], np.min(dist, axis=1))
    return out


def forms(layers: Sequence[Layer], x: FloatArray) -> tuple[FloatArray, FloatArray]:
    """Pre-activation and its input-space gradient for every prefix neuron at ``x``."""
    Zs, _ = forward(layers, x[None, :])
    _, J = jacobian(layers, x)
    return np.concatenate([Z[0] for Z in Zs]), np.concatenate(J, axis=0)


def reach(z: FloatArray, G: FloatArray, v: FloatArray) -> float:
    """Distance from a point along ``+v`` to the first prefix boundary (``z, G``: :func:`forms` there;
    both hold in the point's whole region, where the prefix is affine)."""
    rate = G @ v
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(np.min(np.where(z * rate < 0, -z / rate, np.inf)))


def region_radius(z: FloatArray, G: FloatArray, v: FloatArray) -> float:
    """Distance from a point along ``±v`` to the nearest prefix boundary (``z, G``: :func:`forms` there)."""
    rate = np.abs(G @ v)
    with np.errstate(divide="ignore"):
        return float(np.min(np.where(rate > 0, np.abs(z) / rate, np.inf)))


def line_crossings(layers: Sequence[Layer], x0: FloatArray, u: FloatArray, t_lo: float, t_hi: float,
                   rows: Layer | None = None, max_steps: int = 100_000) -> list[FloatArray]:
    """Where the prefix's neurons (and the rows ``rows = (W, b)`` behind it) switch on the lines
    ``x0[i] + t u[i]``, ``t_lo < t < t_hi``: the kinks these known neurons put on each line, computed
    without a query. Along a line every pre-activation is affine between two switches, so the next
    switch is the nearest zero of the current affine pieces; each step starts just past the last one
    (two switches closer than ``1e-12`` of the span count as one). After ``max_steps`` steps the lines not
    done yet keep the switches found so far (a kink left out is only searched for as any other)."""
    chain = [*layers, *([rows] if rows is not None else [])]
    x0 = np.atleast_2d(np.asarray(x0, dtype=float))
    u = np.atleast_2d(np.asarray(u, dtype=float))
    n = x0.shape[0]
    eps = 1e-12 * (t_hi - t_lo)
    t = np.full(n, float(t_lo))
    out: list[list[float]] = [[] for _ in range(n)]
    live = np.arange(n)
    for _ in range(max_steps):
        if not live.size:
            break
        ts = t[live] + eps
        H, dH = x0[live] + ts[:, None] * u[live], u[live]
        zs: list[FloatArray] = []
        dzs: list[FloatArray] = []
        for W, b in chain:
            Z, dZ = H @ W.T + b, dH @ W.T
            zs.append(Z)
            dzs.append(dZ)
            on = Z > 0
            H, dH = np.where(on, Z, 0.0), np.where(on, dZ, 0.0)
        Z, dZ = np.concatenate(zs, axis=1), np.concatenate(dzs, axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            s = np.where(Z * dZ < 0, -Z / dZ, np.inf)
        tn = ts + np.min(s, axis=1)
        inside = tn < t_hi
        for j in np.flatnonzero(inside):
            out[int(live[j])].append(float(tn[j]))
        t[live] = tn
        live = live[inside]
    return [np.array(o) for o in out]
