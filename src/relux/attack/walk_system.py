"""One walk's exact points as a growing linear system on its row, solved step by step (attack-notes
§4: a walk along a next-layer boundary, CM24 §5's features one layer down).

A neuron of layer ``i+1`` is ``z' = Σ_j u_j ReLU(ẑ_j) + a·h + c`` on the features of the known prefix
(:mod:`relux.attack.walk_fit`). Written relative to the walk's start ``x0``, with
``s_j = -sign(ẑ_j(x0))``, each neuron enters as ``ReLU(s_j ẑ_j)`` (zero at ``x0``; the difference is
affine in ``h`` and absorbed into ``a`` and ``c``). A neuron the walk has not switched yet is then zero
at every point so far, and a column is added only when one switches. The rows so far are kept as the
triangular factor ``R`` of their QR decomposition, updated with Givens rotations as the walk adds two
points per step (``O(p²)`` instead of an SVD of every point, ``O(n p²)``), and the row is the null
vector of ``R`` by inverse iteration from the previous step's.

The start's measured normal joins as weak equations (its complement: the gradient of ``z'`` at
``x0`` must be parallel to it). Without them the row is undetermined for the walk's first ``d`` steps
(one unknown per coordinate of ``h``), and a direction carried from step to step gains error at every
step: on the CM24 100-200x3-10 network it grew from 1e-8 to 1e-4 in about 75 steps, and walks died
there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.linalg
import scipy.linalg.lapack

from relux.attack import prefix as pfx
from relux.attack.linalg import svd
from relux.oracle.base import FloatArray


@dataclass(frozen=True)
class StepFit:
    """The walk's row after a tentative step: the unit normal of its piece at the step's point (None
    while the equations do not fix the row), and the largest relative misfit of any point (exact
    points fit to rounding; a point of another neuron misfits by far more)."""

    normal: FloatArray | None
    residual: float
    prior: float = 0.0  # sine of the angle between the row's gradient at x0 and the measured normal


class WalkSystem:
    """The growing system of one walk (module docstring). ``try_points`` solves with new points
    without keeping them; ``commit`` keeps the last tried points."""

    def __init__(
        self, layers: Sequence[pfx.Layer], x0: FloatArray, normal: FloatArray, weight: float = 1e-3,
        signed: bool = False,
    ) -> None:
        """``x0``: the walk's start (an exact kink); ``normal``: the boundary's measured normal there;
        ``weight``: of its equations, relative to a point's (the normal is measured to about 1e-8,
        points are exact to rounding). ``signed``: layer ``i``'s signs are known, so the row is
        ``z' = Σ_j u_j ReLU(ẑ_j) + c`` (``a = 0``): a column per neuron of layer ``i`` on at some point,
        and no ``h`` columns."""
        self.layers = list(layers)
        self.signed = signed
        Z0, H0 = self._state(x0[None, :])
        h0 = H0[0]
        self.cols: list[tuple[str, int]]
        if signed:
            # columns: ("n", j) for the neurons on at x0, ("c", 0), then ("n", m) as neurons turn on
            self.s = np.ones(Z0.shape[1])
            on = np.flatnonzero(Z0[0] > 0)
            self.cols = [("n", int(j)) for j in on] + [("c", 0)]
            hs = float(np.linalg.norm(Z0[0, on])) / max(np.sqrt(on.size), 1.0)
        else:
            # columns: ("h", j) for coordinates of h non-zero at x0, ("c", 0), then ("n", m) as neurons switch
            self.s = np.where(Z0[0] > 0, -1.0, 1.0)
            self.cols = [("h", int(j)) for j in np.flatnonzero(h0 != 0)] + [("c", 0)]
            hs = float(np.linalg.norm(h0)) / max(np.sqrt(np.count_nonzero(h0)), 1.0)
        self.scale = np.array([hs] * (len(self.cols) - 1) + [1.0]) if hs > 0 else np.ones(len(self.cols))
        M, _ = pfx.jacobian(self.layers[:-1], x0)  # the identity when layer i is the first
        g = normal / float(np.linalg.norm(normal))
        hj = np.array([j for k, j in self.cols if k != "c"], dtype=int)
        if not hj.size:
            B = np.zeros((0, x0.size))
        else:  # the gradients of the columns' features at x0
            B = self.layers[-1][0][hj] @ M if signed else M[hj]
        C = np.zeros((x0.size, len(self.cols)))
        C[:, : hj.size] = (B - np.outer(B @ g, g)).T / self.scale[: hj.size]
        # the row's gradient at x0 from its first columns (the columns added later are zero near x0)
        self._grad0: FloatArray = B.T / self.scale[: hj.size]
        self._g = g
        r0 = self._values(np.maximum(Z0 * self.s, 0.0), H0, self.cols)[0] / self.scale
        cn = float(np.max(np.linalg.norm(C, axis=1))) if C.size else 0.0
        if cn > 0:
            C *= weight * float(np.linalg.norm(r0)) / cn
        p = len(self.cols)
        R0 = np.asarray(scipy.linalg.qr(np.concatenate([C, r0[None, :]]), mode="r")[0])[:p]
        self.R: FloatArray = np.zeros((p, p))
        self.R[: R0.shape[0]] = R0
        self.F: FloatArray = r0[None, :]  # every point's row so far (for the misfit of each)
        self.theta = self._solve(self.R, np.ones(p))
        self._tried: tuple[list[tuple[str, int]], FloatArray, FloatArray, FloatArray, FloatArray, bool] | None = None
        self._determined: bool | None = None
        # signed normals: the columns' neuron indices and the offset's column, for the list they index
        self._col_cache: tuple[Sequence[tuple[str, int]], np.ndarray, int] | None = None

    def _state(self, P: FloatArray) -> tuple[FloatArray, FloatArray]:
        """Layer ``i``'s pre-activations and its input ``h`` at the rows of ``P`` (one forward pass)."""
        Zs, _ = pfx.forward(self.layers, P)
        return Zs[-1], (np.maximum(Zs[-2], 0.0) if len(Zs) > 1 else P)

    @staticmethod
    def _values(Zs: FloatArray, H: FloatArray, cols: Sequence[tuple[str, int]]) -> FloatArray:
        """The columns ``cols`` of the features, from ``ReLU(s ẑ)`` (``Zs``) and ``h`` (``H``)."""
        out = np.ones((H.shape[0], len(cols)))
        kind = np.array([k for k, _j in cols])
        idx = np.array([j for _k, j in cols], dtype=int)
        for name, src in (("h", H), ("n", Zs)):
            sel = np.flatnonzero(kind == name)
            if sel.size:
                out[:, sel] = src[:, idx[sel]]
        return out

    @staticmethod
    def _solve(R: FloatArray, start: FloatArray) -> FloatArray:
        """Null vector of ``R`` by two steps of inverse iteration on ``RᵀR`` from ``start`` (unit; an
        exactly zero pivot is raised to 1e-15 of the largest, and a step that overflows is undone)."""
        d = np.abs(np.diag(R))
        floor = max(float(np.max(d)) if d.size else 1.0, np.finfo(float).tiny) * 1e-15
        Rg = R.copy()
        idx = np.flatnonzero(d < floor)
        Rg[idx, idx] = floor
        v = start / float(np.linalg.norm(start))
        for _ in range(2):
            with np.errstate(over="ignore", invalid="ignore"):
                y = scipy.linalg.solve_triangular(Rg, v, trans="T", check_finite=False)
                ny = float(np.linalg.norm(y))
                if not np.isfinite(ny) or ny == 0.0:
                    break
                w = scipy.linalg.solve_triangular(Rg, y / ny, check_finite=False)
                nw = float(np.linalg.norm(w))
            if not np.isfinite(nw) or nw == 0.0:
                break
            v = w / nw
        return np.asarray(v)

    @staticmethod
    def _ambiguous(R: FloatArray, theta: FloatArray) -> bool:
        """Whether ``R`` has a second null direction besides ``theta``: the equations so far do not fix
        the row (behind a previous layer wider than the input, the start's normal fixes only its image
        under the prefix Jacobian). Inverse iteration from a start orthogonal to ``theta`` returns to
        ``±theta`` when the null vector is unique."""
        p = theta.size
        if p < 2:
            return False
        s = np.cos(np.arange(1, p + 1, dtype=float))
        s -= float(s @ theta) * theta
        if float(np.linalg.norm(s)) == 0.0:
            return False
        v = WalkSystem._solve(R, s)
        r = v - float(v @ theta) * theta
        nr = float(np.linalg.norm(r))
        if nr < 1e-3:
            return False
        # a determined direction is held by a point (or, 1e-3 weaker, by the start's normal): far above
        # the 1e-9 of the rows' size a null direction reaches, rounding aside
        return float(np.linalg.norm(R @ (r / nr))) <= 1e-9 * float(np.linalg.norm(R))

    @staticmethod
    def _givens(R: FloatArray, r: FloatArray) -> None:
        """Fold row ``r`` into the upper-triangular ``R`` (in place)."""
        r = r.copy()
        nz = np.flatnonzero(r)
        for j in range(int(nz[0]) if nz.size else r.size, r.size):
            if r[j] == 0.0:
                continue
            a, b = R[j, j], r[j]
            hyp = float(np.hypot(a, b))
            c, s = a / hyp, b / hyp
            Rj = R[j, j:].copy()
            R[j, j:] = c * Rj + s * r[j:]
            r[j:] = c * r[j:] - s * Rj
            r[j] = 0.0

    def try_points(self, P: FloatArray, x: FloatArray) -> StepFit:
        """The row with the points ``P`` added (not kept until :meth:`commit`), its normal at ``x``."""
        cols = list(self.cols)
        Z, H = self._state(P)
        Zs = np.maximum(Z * self.s, 0.0)
        have = set(cols)
        new = [("n", int(m)) for m in np.flatnonzero((Zs > 0).any(axis=0)) if ("n", int(m)) not in have]
        if not self.signed:
            new += [("h", int(j)) for j in np.flatnonzero((H != 0).any(axis=0)) if ("h", int(j)) not in have]
        cols += new
        vals = self._values(Zs, H, new)
        scale = np.concatenate([self.scale, [max(float(np.max(np.abs(vals[:, c]))), np.finfo(float).tiny)
                                             for c in range(len(new))]])
        p = len(cols)
        R = np.zeros((p, p))
        R[: self.R.shape[0], : self.R.shape[1]] = self.R
        rows_new = self._values(Zs, H, cols) / scale
        if self.signed:  # LAPACK's triangular-pentagonal QR folds the rows at once
            # (the block size must lie in [1, columns]; the end check folds in more rows than that)
            nb = max(1, min(rows_new.shape[0], p))
            out, _, _, info = scipy.linalg.lapack.dtpqrt(0, nb, R, rows_new)
            if info != 0:
                raise ValueError(f"dtpqrt failed with info={info}")
            R = np.triu(out)
        else:  # (one Givens rotation at a time: the sign-free walks' results stay bit for bit as they were)
            for r in rows_new:
                self._givens(R, r)
        start = np.concatenate([self.theta, np.full(len(new), 1e-3)])
        theta = self._solve(R, start)
        F = np.zeros((self.F.shape[0] + rows_new.shape[0], p))
        F[: self.F.shape[0], : self.F.shape[1]] = self.F
        F[self.F.shape[0] :] = rows_new
        rn = np.linalg.norm(F, axis=1) + 1e-300
        resid = float(np.max(np.abs(F @ theta) / rn))
        ambiguous = self._ambiguous(R, theta)
        self._tried = (cols, scale, R, F, theta, ambiguous)
        normal = None if ambiguous else self._normal(cols, scale, theta, x)
        return StepFit(normal, resid, self._prior_misfit(theta))

    def _prior_misfit(self, theta: FloatArray) -> float:
        """How far the row's gradient at ``x0`` turns from the measured normal (the sine of the
        angle): the points alone may leave directions that only the weak normal equations hold, and a
        point of another neuron could turn the row there at little cost in the least squares."""
        grad = self._grad0 @ theta[: self._grad0.shape[1]]
        ng = float(np.linalg.norm(grad))
        if ng == 0.0:
            return 1.0
        return float(np.linalg.norm(grad - float(grad @ self._g) * self._g)) / ng

    def commit(self) -> None:
        """Keep the points of the last :meth:`try_points`."""
        assert self._tried is not None
        self.cols, self.scale, self.R, self.F, self.theta, ambiguous = self._tried
        self._tried = None
        self._determined = not ambiguous

    def _normal(self, cols: Sequence[tuple[str, int]], scale: FloatArray, theta: FloatArray,
                x: FloatArray) -> FloatArray | None:
        z = self._state(x[None, :])[0][0] * self.s
        t = theta / scale
        if not self.signed:
            # (term by term: the sign-free walks' results stay bit for bit as they were)
            M, _ = pfx.jacobian(self.layers[:-1], x)  # the identity when layer i is the first
            Gi = self.layers[-1][0] @ M
            g0 = np.zeros(M.shape[1])
            for c, (kind, j) in enumerate(cols):
                if kind == "h":
                    g0 += t[c] * M[j]
                elif kind == "n" and z[j] > 0:
                    g0 += t[c] * self.s[j] * Gi[j]
            n0 = float(np.linalg.norm(g0))
            return g0 / n0 if n0 > 0 else None
        # signed: no h columns; Σ over the neurons on at x of t_c ŵ_j M (s = 1); the columns are the
        # neurons' then c's, then neurons' again
        if self._col_cache is None or self._col_cache[0] is not cols:
            ci = next(c for c, (k, _j) in enumerate(cols) if k == "c")
            self._col_cache = (cols, np.array([j for _k, j in cols], dtype=int), ci)
        _, idx, ci = self._col_cache
        ns = np.ones(len(cols), dtype=bool)
        ns[ci] = False
        ns[ns] = z[idx[ns]] > 0
        coef = np.zeros(self.layers[-1][0].shape[0])
        coef[idx[ns]] = t[ns]
        grad = coef @ self.layers[-1][0]
        if len(self.layers) > 1:
            grad = grad @ pfx.jacobian(self.layers[:-1], x)[0]
        nrm = float(np.linalg.norm(grad))
        return grad / nrm if nrm > 0 else None

    @property
    def determined(self) -> bool:
        """Whether the equations so far fix the row (one null direction); a commit keeps what its try
        found."""
        if self._determined is None:
            self._determined = not self._ambiguous(self.R, self.theta)
        return self._determined

    def has_column(self, j: int) -> bool:
        """Whether neuron ``j`` of layer ``i`` has a column (switched, or on in signed mode)."""
        return ("n", int(j)) in self.cols

    def normal_at(self, x: FloatArray) -> FloatArray | None:
        """The unit normal at ``x`` of the current row's boundary piece there."""
        return self._normal(self.cols, self.scale, self.theta, x)

    def row(self, theta: FloatArray | None = None) -> tuple[FloatArray, float]:
        """Signed mode: the row on layer ``i``'s outputs (zero on a neuron never on at any point) and its
        offset, from ``theta`` (the system's current solution by default)."""
        t = (self.theta if theta is None else theta) / self.scale
        u = np.zeros(self.s.size)
        c = 0.0
        for k, (kind, j) in enumerate(self.cols):
            if kind == "n":
                u[j] = t[k] * self.s[j]
            elif kind == "c":
                c = float(t[k])
        return u, c

    def final(self) -> tuple[FloatArray, float, float]:
        """The row from the exact points alone (the null vector of their rows, without the start's
        normal), the misfit ``σ_min / σ_max`` and the gap ``σ_2nd / σ_min`` (with fewer points than
        unknowns the points alone do not fix the row: the system's solution, misfit 0 and gap 0)."""
        p = len(self.cols)
        if self.F.shape[0] < p:
            return self.theta, 0.0, 0.0
        _, sv, Vt = svd(self.F, full_matrices=False)
        theta = Vt[-1] * (1.0 if float(Vt[-1] @ self.theta) >= 0 else -1.0)
        top = float(sv[0]) if sv[0] > 0 else 1.0
        gap = float(sv[-2] / sv[-1]) if sv[-1] > 0 else np.inf
        return theta, float(sv[-1] / top), gap
