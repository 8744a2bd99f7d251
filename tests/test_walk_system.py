"""The incremental system of one walk (relux.attack.walk_system) against exact references."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from relux.attack.walk_system import WalkSystem


def _net(rng: np.random.Generator, d0: int, n1: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    return rng.normal(size=(n1, d0)), 0.5 * rng.normal(size=n1), rng.normal(size=n1), 0.3


def _z2(W1: np.ndarray, b1: np.ndarray, w2: np.ndarray, b2: float, X: np.ndarray) -> np.ndarray:
    return np.asarray(np.maximum(X @ W1.T + b1, 0.0) @ w2 + b2)


def _grad(W1: np.ndarray, b1: np.ndarray, w2: np.ndarray, x: np.ndarray) -> np.ndarray:
    g = (((W1 @ x + b1) > 0) * w2) @ W1
    return np.asarray(g / np.linalg.norm(g))


def _root(W1: np.ndarray, b1: np.ndarray, w2: np.ndarray, b2: float, p: np.ndarray, v: np.ndarray) -> np.ndarray | None:
    """The boundary point on ``p + t v`` inside ``p``'s region (the neuron is affine there: exact)."""
    with np.errstate(divide="ignore"):
        R = 0.9 * float(np.min(np.abs(W1 @ p + b1) / np.abs(W1 @ v)))
    a, b = _z2(W1, b1, w2, b2, np.stack([p - R * v, p + R * v]))
    if np.sign(a) == np.sign(b):
        return None
    return p + (-R + 2 * R * a / (a - b)) * v


def _walk(seed: int, d0: int, n1: int, steps: int) -> tuple[WalkSystem, list[float], list[float], np.ndarray]:
    """Walk a layer-2 boundary one layer-1 crossing per step, feeding the exact points to the system;
    the error of its normal against the true one after every step, and each step's misfit."""
    rng = np.random.default_rng(seed)
    W1, b1, w2, b2 = _net(rng, d0, n1)
    x0 = None
    while x0 is None:
        p = rng.normal(size=d0)
        x0 = _root(W1, b1, w2, b2, p, _grad(W1, b1, w2, p))
    # the start's normal measured to about 1e-9, like a gradient jump
    ws = WalkSystem([(W1, b1)], x0, _grad(W1, b1, w2, x0) + 1e-9 * rng.normal(size=d0))
    x, errs, resid = x0, [], []
    for _ in range(steps):
        g = _grad(W1, b1, w2, x)
        d = rng.normal(size=d0)
        d -= (d @ g) * g
        d /= np.linalg.norm(d)
        z, rate = W1 @ x + b1, W1 @ d
        with np.errstate(divide="ignore"):
            t = np.sort(np.where(z * rate < 0, -z / rate, np.inf))
        y1 = _root(W1, b1, w2, b2, x + (t[0] + 0.5 * (t[1] - t[0])) * d, g)
        if y1 is None:
            continue
        tg = _grad(W1, b1, w2, y1)
        e = rng.normal(size=d0)
        e -= (e @ tg) * tg
        e /= np.linalg.norm(e)
        with np.errstate(divide="ignore"):
            r = float(np.min(np.abs(W1 @ y1 + b1) / np.abs(W1 @ e)))
        y2 = _root(W1, b1, w2, b2, y1 + 0.3 * r * e, tg)
        if y2 is None:
            continue
        fit = ws.try_points(np.stack([y1, y2]), y1)
        assert fit.normal is not None
        errs.append(min(float(np.linalg.norm(fit.normal - tg)), float(np.linalg.norm(fit.normal + tg))))
        resid.append(fit.residual)
        ws.commit()
        x = y1
    return ws, errs, resid, x


def test_normals_stay_exact_along_a_long_walk() -> None:
    # 60 steps behind 24 neurons in 12 inputs: a direction carried from step to step without the
    # start's normal had lost 4 digits by then on the CM24 network; here every step's normal stays
    # within 1e-7 (the start's is measured to 1e-9, and every point is exact to rounding).
    _, errs, resid, _ = _walk(0, 12, 24, 60)
    assert len(errs) >= 40
    assert max(errs) < 1e-7
    assert max(resid) < 1e-10  # exact points fit to rounding


def test_a_point_off_the_boundary_is_rejected_and_not_kept() -> None:
    ws, _, _, x = _walk(1, 8, 16, 20)
    n_rows = ws.F.shape[0]
    fit = ws.try_points(x[None, :], x)
    assert fit.normal is not None
    # the last point moved off the boundary by 1e-4 of its scale, inside its region (no new unknown)
    off = x + 1e-4 * float(np.linalg.norm(x)) * fit.normal
    # it misfits by orders more than the 1e-8 a walk allows
    assert ws.try_points(off[None, :], off).residual > 1e-6
    assert ws.F.shape[0] == n_rows  # not committed


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(2, 7), st.integers(1, 6))
def test_givens_fold_matches_a_fresh_qr(seed: int, p: int, extra: int) -> None:
    rng = np.random.default_rng(seed)
    A = rng.normal(size=(p + 1, p))
    rows = rng.normal(size=(extra, p))
    R = np.linalg.qr(A, mode="r")
    for r in rows:
        WalkSystem._givens(R, r)
    full = np.concatenate([A, rows])
    # R^T R is the Gram matrix of every row folded in, up to rounding of O(p) rotations
    assert np.allclose(R.T @ R, full.T @ full, rtol=1e-10, atol=1e-10 * float(np.max(np.abs(full.T @ full))))
    assert np.allclose(np.tril(R, -1), 0.0)


def test_a_row_the_equations_do_not_fix_gives_no_normal() -> None:
    # Behind 4 inputs -> 30 -> 10, the walk's row has 30 coordinates of h but the start's normal fixes
    # only their image under the 30x4 prefix Jacobian: many rows fit the first points, and any normal
    # read from one of them would be arbitrary. The system says so (None) instead.
    rng = np.random.default_rng(3)
    layers = [(rng.normal(size=(30, 4)), rng.normal(size=30)), (rng.normal(size=(10, 30)), rng.normal(size=10))]
    x0 = rng.normal(size=4)
    ws = WalkSystem(layers, x0, rng.normal(size=4))
    y = x0 + 1e-6 * rng.normal(size=4)
    assert ws.try_points(y[None, :], y).normal is None
