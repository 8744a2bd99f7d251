"""Witnesses of a hidden layer behind a known prefix, and their partial signatures (attack-notes §3).

At a witness ``x*`` of neuron ``j`` of layer ``i`` the gradient of ``f`` jumps by ``c ⊗ (M^T w_j)``,
where ``M`` is the known prefix's local Jacobian. Finite differences therefore run only along a basis
of the row space of ``M`` (the space of control), and ``w_j`` restricted to the layer-``(i-1)``
neurons active at ``x*`` solves ``M_A^T w_A = jump``. Kinks of known neurons are recognised from
the prefix and set aside.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from relux.attack import prefix as pfx
from relux.attack.config import ExtractionConfig
from relux.attack.critical import LineKinks, find_kinks
from relux.attack.linalg import lstsq
from relux.oracle.base import FloatArray, QueryFn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Witness:
    """A kink of an unknown neuron, with what one measurement says about that neuron.

    ``active`` marks the layer-input coordinates visible here; ``w`` (zero outside ``active``) and
    ``b`` are the partial signature normalised to unit norm (meaningful when ``full_rank``);
    ``A_ctrl`` (``r x d_in``) and ``v_ctrl`` (``r``) state the measurement as the homogeneous
    constraint ``A_ctrl w ∥ v_ctrl`` for unification; ``h`` is the layer input at ``x``.
    """

    x: FloatArray
    active: np.ndarray
    w: FloatArray
    b: float
    full_rank: bool
    A_ctrl: FloatArray
    v_ctrl: FloatArray
    h: FloatArray
    rank_ratio: float
    line: int
    normal: FloatArray  # unit normal of the kink's local hyperplane, in input space

    @cached_property
    def constraint_rows(self) -> FloatArray:
        """The measurement as homogeneous linear constraints on ``(w, b)``: the control image of ``w``
        has no component orthogonal to the jump, and ``w·h + b = 0`` here. Shape ``(r + 1, d_in + 1)``."""
        A = self.A_ctrl / (float(np.linalg.norm(self.A_ctrl)) or 1.0)
        v = self.v_ctrl / (float(np.linalg.norm(self.v_ctrl)) or 1.0)
        PA = A - np.outer(v, v @ A)
        hb = np.append(self.h, 1.0)
        R = np.zeros((A.shape[0] + 1, A.shape[1] + 1))
        R[:-1, :-1] = PA
        R[-1] = hb / float(np.linalg.norm(hb))
        return R


@dataclass(frozen=True)
class WitnessInfo:
    lines: int
    kinks: int
    prefix_kinks: int
    witnesses: int
    rejected: int
    search_queries: int
    gradient_queries: int
    lines_found: tuple[LineKinks, ...] = ()


#: Memory for the witnesses measured together (local Jacobians, bases and probes): 256 MB.
WITNESS_CHUNK_BYTES = 256 * 2**20

_Meta = tuple[int, FloatArray, FloatArray, FloatArray, FloatArray, FloatArray, FloatArray, FloatArray]


def witness_bytes(witnesses: Sequence[Witness]) -> int:
    """Memory the witnesses' arrays take, counting the cached constraint rows (about the control image's
    size) whether or not they were built yet."""
    return sum(2 * w.A_ctrl.nbytes + w.x.nbytes + w.normal.nbytes + w.h.nbytes + w.w.nbytes for w in witnesses)


def collect_witnesses(
    query: QueryFn,
    layers: Sequence[pfx.Layer],
    d0: int,
    n_lines: int,
    n_grid: int,
    cfg: ExtractionConfig,
    rng: np.random.Generator,
    rel_tol: float,
    line_offset: int = 0,
    lines_given: tuple[FloatArray, FloatArray] | None = None,
    t_range: float | None = None,
    known: tuple[FloatArray, FloatArray] | None = None,
    max_bytes: int | None = None,
) -> tuple[list[Witness], WitnessInfo]:
    """Walk ``n_lines`` random lines (or the lines ``lines_given = (x0, u)``) and measure a partial
    signature at every kink the prefix does not explain (those belong to the layer being extracted or
    to deeper ones). Kinks on a row of ``known = (W, b)`` (rows of this layer already confirmed) cost
    nothing more either. ``max_bytes``: stop measuring once the witnesses hold that much memory
    (:func:`witness_bytes`; checked between chunks)."""
    scale = cfg.input_scale * float(np.sqrt(d0))
    t_range = cfg.line_range if t_range is None else t_range
    if lines_given is not None:
        x0, u = lines_given
        n_lines = x0.shape[0]
    else:
        x0 = rng.normal(0.0, cfg.input_scale, size=(n_lines, d0))
        u = rng.normal(size=(n_lines, d0))
    u = u * (scale / np.linalg.norm(u, axis=1, keepdims=True))
    lines, kinfo = find_kinks(query, x0, u, -t_range, t_range, n_grid, rel_tol)
    out: list[Witness] = []
    n_kinks = n_prefix = rejected = grad_q = n_known = 0
    # First pass: every unknown kink on every line and its two probe points (no queries).
    cands: list[tuple[int, FloatArray, FloatArray, FloatArray, float, float, float]] = []
    for li, line in enumerate(lines):
        t = line.t
        n_kinks += t.size
        if t.size == 0:
            continue
        P = line.points()
        bounds = np.concatenate([[t[0] - (t[1] - t[0] if t.size > 1 else 1.0)], t,
                                 [t[-1] + (t[-1] - t[-2] if t.size > 1 else 1.0)]])
        mids = 0.5 * (bounds[:-1] + bounds[1:])
        halves = 0.5 * (bounds[1:] - bounds[:-1])
        unorm = float(np.linalg.norm(line.u))
        tol_dist = 1e-6 * unorm * max(float(np.min(halves)), 1e-12) + 1e-9 * scale
        for j in range(t.size):
            x = P[j]
            if layers and pfx.boundary_distance(layers, x) <= tol_dist:
                n_prefix += 1
                continue
            if known is not None and known[0].size:
                _, Hx = pfx.forward(layers, x[None, :])
                zk = np.abs(known[0] @ Hx[0] + known[1])
                zs = np.linalg.norm(known[0], axis=1) * float(np.linalg.norm(Hx[0])) + np.abs(known[1])
                if np.any(zk <= 1e-7 * zs):
                    n_known += 1
                    continue
            cands.append((li, x, line.x0 + mids[j] * line.u, line.x0 + mids[j + 1] * line.u,
                          float(halves[j]), float(halves[j + 1]), unorm))
    # Then the measurements, a chunk of witnesses at a time: each holds its local Jacobian and basis
    # (d_in x d0 and r x d0 floats) and 2 (r + 1) probes, which at CIFAR scale (3,072 inputs behind
    # 256 neurons, thousands of kinks a line) would not fit in memory all at once. Results and query
    # counts do not depend on the chunking (no random draws here).
    d_in = layers[-1][0].shape[0] if layers else d0
    per_witness = (4 * d_in + 6) * d0 * 8  # M, B, the 2 (r + 1) probes (r <= d_in), x and two probe points
    chunk = max(1, WITNESS_CHUNK_BYTES // per_witness)
    held = 0  # bytes of the witnesses measured so far (summed as they come, not recounted per chunk)
    for c0 in range(0, len(cands), chunk):
        if max_bytes is not None and held > max_bytes:
            log.warning("witnesses: %d measured hold more than %.0f MB; the other %d kinks of these lines are "
                        "left unmeasured", len(out), max_bytes / 2**20, len(cands) - c0)
            break
        part = cands[c0 : c0 + chunk]
        meta: list[_Meta] = []
        for li, x, pl, pr, half_l, half_r, unorm in part:
            M, _ = pfx.jacobian(layers, x)
            # Orthonormal basis of the row space of M (the space of control).
            _, S, Vt = np.linalg.svd(M, full_matrices=False)
            r = int(np.sum(S > 1e-10 * (S[0] if S.size else 0.0)))
            if r == 0:
                rejected += 1
                continue
            B = Vt[:r].copy()  # a copy: a view would keep the whole Vt of this witness alive
            rel = cfg.fd_rel_step / r  # unknown boundaries: the crossing risk grows with every direction
            st_l = np.minimum(rel * half_l * unorm, 0.25 * pfx.safe_steps(layers, pl, B))
            st_r = np.minimum(rel * half_r * unorm, 0.25 * pfx.safe_steps(layers, pr, B))
            meta.append((li, x, M, B, pl, pr, st_l, st_r))
        before = len(out)
        q, rej = _measure(query, meta, layers, d0, line_offset, out)
        held += witness_bytes(out[before:])
        grad_q += q
        rejected += rej
    info = WitnessInfo(lines=n_lines, kinks=n_kinks, prefix_kinks=n_prefix, witnesses=len(out), rejected=rejected,
                       search_queries=kinfo.queries, gradient_queries=grad_q, lines_found=tuple(lines))
    return out, info


def _measure(
    query: QueryFn,
    meta: Sequence[_Meta],
    layers: Sequence[pfx.Layer],
    d0: int,
    line_offset: int,
    out: list[Witness],
) -> tuple[int, int]:
    """Measure the witnesses of ``meta`` in one batched oracle call and append those that pass to
    ``out``: the jump of the gradients in the space of control on the two sides of each kink, and from
    it the partial signature (CM24 §3.2). Returns the queries made and the witnesses rejected."""
    blocks: list[FloatArray] = []
    for _li, _x, _M, B, pl, pr, st_l, st_r in meta:
        blocks.append(np.concatenate([pl[None, :], pl[None, :] + st_l[:, None] * B,
                                      pr[None, :], pr[None, :] + st_r[:, None] * B]))
    Yall = query(np.concatenate(blocks)) if blocks else np.zeros((0, 1))
    queries = sum(blk.shape[0] for blk in blocks)
    rejected = 0
    pos = 0
    for li, x, M, B, _pl, _pr, st_l, st_r in meta:
        r = B.shape[0]
        Yb = Yall[pos : pos + 2 * (r + 1)]
        pos += 2 * (r + 1)
        Jl = (Yb[1 : r + 1] - Yb[0]) / st_l[:, None]  # (r, k)
        Jr = (Yb[r + 2 :] - Yb[r + 1]) / st_r[:, None]
        delta = (Jr - Jl).T  # (k, r)
        if not np.any(delta):
            rejected += 1
            continue
        _, S, Vt = np.linalg.svd(delta, full_matrices=False)
        ratio = float(S[1] / S[0]) if S.size > 1 else 0.0
        if ratio > 1e-3:
            rejected += 1
            continue
        v_ctrl = Vt[0]
        V = v_ctrl @ B  # jump direction in input space
        _, H = pfx.forward(layers, x[None, :])
        h = H[0]
        active = (h > 0) if layers else np.ones(d0, dtype=bool)
        A_ctrl = B @ M.T  # (r, d_in): control-space image of each layer-input coordinate
        MA = M[active]
        w = np.zeros(M.shape[0])
        full = False
        if MA.shape[0] > 0:
            sv = np.linalg.svd(MA, compute_uv=False)
            full = bool(sv.size == MA.shape[0] and sv[-1] > 1e-8 * sv[0])
            if full:
                wa = lstsq(MA.T, V)
                w[active] = wa
        b = float(-(w @ h))
        nrm = float(np.linalg.norm(np.append(w, b)))
        if full and nrm > 0:
            w, b = w / nrm, b / nrm
            if w[np.argmax(np.abs(w))] < 0:
                w, b = -w, -b
        out.append(Witness(x=x, active=active, w=w, b=b, full_rank=full, A_ctrl=A_ctrl, v_ctrl=v_ctrl,
                           h=h, rank_ratio=ratio, line=line_offset + li,
                           normal=V / max(float(np.linalg.norm(V)), np.finfo(float).tiny)))
    return queries, rejected
