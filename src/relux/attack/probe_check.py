"""Choosing a probe radius across a hyperplane that no unseen boundary crosses (attack-notes §3).

A first-layer row is measured from the gradients at ``x± = x_c ± r w`` (CJM20 §4.2). In a deep
network, the boundary of a deeper neuron may cross the segment between them; the measured jump then
mixes two neurons. Along the normal line ``f`` must be two affine pieces meeting on the hyperplane
itself, and six queries show whether it is: three collinear values on each side, and the two lines
meeting where the estimate puts the hyperplane. The largest radius that passes is kept, before
``2 (d + 1)`` queries are spent on gradients there.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from relux.oracle.base import FloatArray, QueryFn

#: Offsets along the normal, in units of the radius: three points on each side.
OFFSETS = (-1.0, -0.75, -0.5, 0.5, 0.75, 1.0)


@dataclass(frozen=True)
class RadiusChoice:
    """Per row: the radius chosen (the smallest tried when none passed) and whether one passed."""

    radii: FloatArray
    clean: np.ndarray
    queries: int


def line_is_clean(F: FloatArray, r: float, tol: float) -> bool:
    """Whether the values ``F`` (``(6, k)``, at :data:`OFFSETS` times ``r``) are two affine pieces that
    meet within ``r / 8`` of the middle. ``tol`` bounds the rounding of one value."""
    left = F[1] - 0.5 * (F[0] + F[2])
    right = F[4] - 0.5 * (F[3] + F[5])
    if np.max(np.abs(left)) > tol or np.max(np.abs(right)) > tol:
        return False
    sl = (F[2] - F[0]) / (0.5 * r)
    sr = (F[5] - F[3]) / (0.5 * r)
    ds = sr - sl
    # f(-r/2) + sl (t + r/2) = f(r/2) + sr (t - r/2)  ->  ds t = f(-r/2) - f(r/2) + (sl + sr) r / 2
    rhs = F[2] - F[3] + 0.5 * r * (sl + sr)
    den = float(ds @ ds)
    if den * r * r <= (16.0 * tol) ** 2:
        return False  # no visible kink: the row's jump is lost in rounding here
    t = float(ds @ rhs) / den
    # every output's lines must meet at the same t (a second kink in the middle breaks that)
    miss = float(np.max(np.abs(ds * t - rhs)))
    return abs(t) <= r / 8.0 and miss <= 16.0 * tol


def choose_radii(
    query: QueryFn,
    bases: FloatArray,
    normals: FloatArray,
    radii: FloatArray,
    shrink: float = 4.0,
    levels: int = 3,
) -> RadiusChoice:
    """For each row, the largest of ``radii / shrink**i`` (``i < levels``) whose normal line is clean.

    ``bases`` ``(n, d)`` lie on the estimated hyperplanes, ``normals`` ``(n, d)`` are their unit normals.
    Costs ``6 * levels`` queries per row, in one batch.
    """
    n = bases.shape[0]
    scales = shrink ** -np.arange(levels, dtype=float)
    R = radii[:, None] * scales[None, :]  # (n, levels)
    offsets = np.asarray(OFFSETS)
    T = R[:, :, None] * offsets[None, None, :]  # (n, levels, 6)
    P = bases[:, None, None, :] + T[..., None] * normals[:, None, None, :]
    Y = np.asarray(query(P.reshape(-1, bases.shape[1])), dtype=np.float64).reshape(n, levels, offsets.size, -1)
    eps = float(np.finfo(float).eps)
    out = R[:, -1].copy()
    clean = np.zeros(n, dtype=bool)
    for j in range(n):
        for i in range(levels):
            # rounding of one value of f: a few ulps of the largest value on the line
            tol = 64.0 * eps * max(float(np.max(np.abs(Y[j, i]))), float(np.finfo(float).tiny))
            if line_is_clean(Y[j, i], float(R[j, i]), tol):
                out[j], clean[j] = R[j, i], True
                break
    return RadiusChoice(out, clean, int(P.shape[0] * levels * offsets.size))
