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
from relux.attack.linalg import lstsq, svd
from relux.oracle.base import FloatArray, QueryFn
from relux.parallel import Executor, SerialExecutor, split_evenly

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
    #: unit direction of the jump in output space (up to sign): for a last-hidden-layer neuron it is
    #: that neuron's column of the output layer, the same at every one of its kinks
    out_dir: FloatArray | None = None

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


@dataclass(frozen=True)
class Candidate:
    """A kink the prefix does not explain, not yet measured: its point on search line ``line``, the
    middles of the two segments of that line around it and their half lengths (in units of ``u``, of
    norm ``unorm``)."""

    line: int
    x: FloatArray
    left: FloatArray
    right: FloatArray
    half_left: float
    half_right: float
    unorm: float


@dataclass(frozen=True)
class CandidateInfo:
    """What a candidate search found: lines walked, kinks on them, kinks the prefix or a known row of
    the layer explains (set aside), and the queries of the kink search."""

    lines: int
    kinks: int
    prefix_kinks: int
    known_kinks: int
    search_queries: int
    lines_found: tuple[LineKinks, ...] = ()


def witness_bytes(witnesses: Sequence[Witness]) -> int:
    """Memory the witnesses' arrays take, counting the cached constraint rows (about the control image's
    size) whether or not they were built yet."""
    return sum(2 * w.A_ctrl.nbytes + w.x.nbytes + w.normal.nbytes + w.h.nbytes + w.w.nbytes for w in witnesses)


def find_candidates(
    query: QueryFn,
    layers: Sequence[pfx.Layer],
    d0: int,
    n_lines: int,
    n_grid: int,
    cfg: ExtractionConfig,
    rng: np.random.Generator,
    rel_tol: float,
    lines_given: tuple[FloatArray, FloatArray] | None = None,
    t_range: float | None = None,
    known: tuple[FloatArray, FloatArray] | None = None,
) -> tuple[list[Candidate], CandidateInfo]:
    """The kinks on ``n_lines`` random lines (or the lines ``lines_given = (x0, u)``) that neither the
    prefix nor a row of ``known = (W, b)`` (rows of this layer already confirmed) explains: those
    belong to the layer being extracted or to deeper ones (CM24 §3.1). Only the kink search queries."""
    scale = cfg.input_scale * float(np.sqrt(d0))
    t_range = cfg.line_range if t_range is None else t_range
    if lines_given is not None:
        x0, u = lines_given
        n_lines = x0.shape[0]
    else:
        x0 = rng.normal(0.0, cfg.input_scale, size=(n_lines, d0))
        u = rng.normal(size=(n_lines, d0))
    u = u * (scale / np.linalg.norm(u, axis=1, keepdims=True))
    # the kinks of the known neurons are located without confirming queries (critical.find_kinks)
    predicted = (pfx.line_crossings(layers, x0, u, -t_range, t_range,
                                    known if known is not None and known[0].size else None) if layers else None)
    lines, kinfo = find_kinks(query, x0, u, -t_range, t_range, n_grid, rel_tol, predicted=predicted)
    n_kinks = n_prefix = n_known = 0
    red = pfx.input_space(layers)
    first = red[1] if red is not None else None
    cands: list[Candidate] = []
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
        on_prefix = (pfx.boundary_distances(layers, P, first=first) <= tol_dist if layers
                     else np.zeros(t.size, dtype=bool))
        for j in range(t.size):
            x = P[j]
            if on_prefix[j]:
                n_prefix += 1
                continue
            if known is not None and known[0].size:
                _, Hx = pfx.forward(layers, x[None, :])
                zk = np.abs(known[0] @ Hx[0] + known[1])
                zs = np.linalg.norm(known[0], axis=1) * float(np.linalg.norm(Hx[0])) + np.abs(known[1])
                if np.any(zk <= 1e-7 * zs):
                    n_known += 1
                    continue
            cands.append(Candidate(li, x, line.x0 + mids[j] * line.u, line.x0 + mids[j + 1] * line.u,
                                   float(halves[j]), float(halves[j + 1]), unorm))
    info = CandidateInfo(lines=n_lines, kinks=n_kinks, prefix_kinks=n_prefix, known_kinks=n_known,
                         search_queries=kinfo.queries, lines_found=tuple(lines))
    return cands, info


def measure_candidates(
    query: QueryFn,
    layers: Sequence[pfx.Layer],
    d0: int,
    cands: Sequence[Candidate],
    cfg: ExtractionConfig,
    line_offset: int = 0,
    max_bytes: int | None = None,
    executor: Executor | None = None,
) -> tuple[list[Witness], int, int]:
    """Measure a partial signature at each candidate kink (CM24 §3.2), a chunk at a time: each holds
    its local Jacobian and basis and 2 (r + 1) probes, which at CIFAR scale (3,072 inputs behind 256
    neurons, thousands of kinks a line) would not fit in memory all at once. With an exact oracle the
    results do not depend on the chunking (no random draws here); a piece shared by two kinks of
    different chunks is queried in both. ``max_bytes``: stop once the witnesses hold
    that much memory (:func:`witness_bytes`; checked between chunks). The per-witness work (the space
    of control and the steps before the queries, the signature after) runs on ``executor`` (serial by
    default; the result does not depend on it). Returns the witnesses, the queries made and the
    candidates rejected."""
    ex: Executor = executor if executor is not None else SerialExecutor()
    red = pfx.input_space(layers)
    V, first = red if red is not None else (None, None)
    d_red = V.shape[0] if V is not None else d0
    d_in = layers[-1][0].shape[0] if layers else d0
    # M and its basis in the reduced coordinates, the lifted basis, the 2 (r + 1) probes (r <= d_in), x
    # and two probe points
    per_witness = 8 * (2 * d_in * d_red + 3 * d_in * d0 + 6 * d0)
    chunk = max(1, WITNESS_CHUNK_BYTES // per_witness)
    parts = 1 if ex.jobs == 1 else 2 * ex.jobs
    out: list[Witness] = []
    held = 0  # bytes of the witnesses measured so far (summed as they come, not recounted per chunk)
    grad_q = rejected = 0
    for c0 in range(0, len(cands), chunk):
        if max_bytes is not None and held > max_bytes:
            log.warning("witnesses: %d measured hold more than %.0f MB; the other %d kinks of these lines are "
                        "left unmeasured", len(out), max_bytes / 2**20, len(cands) - c0)
            break
        part = list(cands[c0 : c0 + chunk])
        planned = [p for ps in ex.map(_plan_witnesses, [
            _PlanTask(tuple(layers), first, tuple(part[i] for i in c), cfg.fd_rel_step)
            for c in split_evenly(len(part), parts)
        ]) for p in ps]
        meta = [(c, *p) for c, p in zip(part, planned, strict=True) if p is not None]
        rejected += len(part) - len(meta)
        Y, sides, q = _probe_pieces(query, meta, V)
        grad_q += q
        jumps = [_gradient(Y, *sides[i][1], m[4]) - _gradient(Y, *sides[i][0], m[3]) for i, m in enumerate(meta)]
        solved = [w for ws in ex.map(_solve_witnesses, [
            _SolveTask(tuple(layers), V, d0, line_offset, tuple(meta[i][:3] for i in c), tuple(jumps[i] for i in c))
            for c in split_evenly(len(meta), parts)
        ]) for w in ws]
        new = [w for w in solved if w is not None]
        rejected += len(solved) - len(new)
        out += new
        held += witness_bytes(new)
    return out, grad_q, rejected


@dataclass(frozen=True)
class _PlanTask:
    layers: tuple[pfx.Layer, ...]
    first: FloatArray | None
    cands: tuple[Candidate, ...]
    fd_rel_step: float


#: A candidate's local Jacobian ``M`` and basis ``B`` of its row space (in the coordinates of
#: :func:`relux.attack.prefix.input_space`), and the finite-difference steps on its two sides.
_Plan = tuple[FloatArray, FloatArray, FloatArray, FloatArray]


def _plan_witnesses(task: _PlanTask) -> list[_Plan | None]:
    """Per candidate (pure): the space of control and the steps along it that stay clear of every known
    boundary; None where the prefix leaves no control."""
    layers, first = task.layers, task.first
    out: list[_Plan | None] = []
    for c in task.cands:
        M, _ = pfx.jacobian(layers, c.x, first)
        if not np.all(np.isfinite(M)):  # an overflowing prefix gives no control to plan with
            out.append(None)
            continue
        # Orthonormal basis of the row space of M (the space of control).
        _, S, Vt = svd(M, full_matrices=False)
        r = int(np.sum(S > 1e-10 * (S[0] if S.size else 0.0)))
        if r == 0:
            out.append(None)
            continue
        B = Vt[:r].copy()  # a copy: a view would keep the whole Vt of this witness alive
        rel = task.fd_rel_step / r  # unknown boundaries: the crossing risk grows with every direction
        st_l = np.minimum(rel * c.half_left * c.unorm, 0.25 * pfx.safe_steps(layers, c.left, B, first))
        st_r = np.minimum(rel * c.half_right * c.unorm, 0.25 * pfx.safe_steps(layers, c.right, B, first))
        out.append((M, B, st_l, st_r))
    return out


def _probe_pieces(
    query: QueryFn, meta: Sequence[tuple[Candidate, FloatArray, FloatArray, FloatArray, FloatArray]],
    V: FloatArray | None,
) -> tuple[FloatArray, list[tuple[tuple[int, int], tuple[int, int]]], int]:
    """Query the gradient probes of every witness's two pieces in one call: a base point and one step
    along each basis direction per piece. Two consecutive unknown kinks of a line with no known kink
    between them share the piece between them, its probe point, its space of control (the prefix's
    pattern does not change there) and so its steps: that piece is queried once. Returns the outputs,
    per witness the ``(start, r)`` of its left and right piece, and the queries made."""
    blocks: list[FloatArray] = []
    sides: list[tuple[tuple[int, int], tuple[int, int]]] = []
    at = 0
    prev: tuple[Candidate, FloatArray, FloatArray, int] | None = None  # last witness, its B, steps, right start
    for c, _M, B, st_l, st_r in meta:
        r = B.shape[0]
        Bx = B if V is None else B @ V
        if (prev is not None and prev[0].line == c.line and np.array_equal(prev[0].right, c.left)
                and np.array_equal(prev[1], B) and np.array_equal(prev[2], st_l)):
            left = prev[3]
        else:
            left = at
            blocks.append(np.concatenate([c.left[None, :], c.left[None, :] + st_l[:, None] * Bx]))
            at += r + 1
        blocks.append(np.concatenate([c.right[None, :], c.right[None, :] + st_r[:, None] * Bx]))
        sides.append(((left, r), (at, r)))
        prev = (c, B, st_r, at)
        at += r + 1
    Y = query(np.concatenate(blocks)) if blocks else np.zeros((0, 1))
    return Y, sides, at


def _gradient(Y: FloatArray, start: int, r: int, steps: FloatArray) -> FloatArray:
    """The gradient on one piece in the space of control, ``(k, r)``, from its probes ``Y[start]`` (the
    base point) and ``Y[start + 1 : start + 1 + r]`` (one step along each basis direction)."""
    out: FloatArray = ((Y[start + 1 : start + 1 + r] - Y[start]) / steps[:, None]).T
    return out


@dataclass(frozen=True)
class _SolveTask:
    layers: tuple[pfx.Layer, ...]
    V: FloatArray | None
    d0: int
    line_offset: int
    meta: tuple[tuple[Candidate, FloatArray, FloatArray], ...]  # candidate, M, B
    jumps: tuple[FloatArray, ...]


def _solve_witnesses(task: _SolveTask) -> list[Witness | None]:
    """Per measured candidate (pure): the partial signature from the jump, or None where the jump is
    zero or not rank one (CM24 §3.2)."""
    return [_solve_one(task.layers, task.V, task.d0, task.line_offset, c, M, B, delta)
            for (c, M, B), delta in zip(task.meta, task.jumps, strict=True)]


def _solve_one(
    layers: Sequence[pfx.Layer],
    V: FloatArray | None,
    d0: int,
    line_offset: int,
    c: Candidate,
    M: FloatArray,
    B: FloatArray,
    delta: FloatArray,
) -> Witness | None:
    if not np.any(delta):
        return None
    U, S, Vt = svd(delta, full_matrices=False)
    ratio = float(S[1] / S[0]) if S.size > 1 else 0.0
    if ratio > 1e-3:
        return None
    v_ctrl = Vt[0]
    Vr = v_ctrl @ B  # jump direction, in the coordinates of M
    _, H = pfx.forward(layers, c.x[None, :])
    h = H[0]
    active = (h > 0) if layers else np.ones(d0, dtype=bool)
    A_ctrl = B @ M.T  # (r, d_in): control-space image of each layer-input coordinate
    MA = M[active]
    w = np.zeros(M.shape[0])
    full = False
    if MA.shape[0] > 0:
        sv = svd(MA, compute_uv=False)
        full = bool(sv.size == MA.shape[0] and sv[-1] > 1e-8 * sv[0])
        if full:
            w[active] = lstsq(MA.T, Vr)
    b = float(-(w @ h))
    nrm = float(np.linalg.norm(np.append(w, b)))
    if full and nrm > 0:
        w, b = w / nrm, b / nrm
        if w[np.argmax(np.abs(w))] < 0:
            w, b = -w, -b
    Vx = Vr if V is None else Vr @ V  # the jump direction in input space
    return Witness(x=c.x, active=active, w=w, b=b, full_rank=full, A_ctrl=A_ctrl, v_ctrl=v_ctrl, h=h,
                   rank_ratio=ratio, line=line_offset + c.line,
                   normal=Vx / max(float(np.linalg.norm(Vx)), np.finfo(float).tiny), out_dir=U[:, 0].copy())


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
    executor: Executor | None = None,
) -> tuple[list[Witness], WitnessInfo]:
    """Walk ``n_lines`` random lines (or the lines ``lines_given = (x0, u)``) and measure a partial
    signature at every kink the prefix does not explain (:func:`find_candidates`, then
    :func:`measure_candidates`). Kinks on a row of ``known = (W, b)`` cost nothing more.
    ``max_bytes``: stop measuring once the witnesses hold that much memory; ``executor`` runs the
    per-witness work."""
    cands, ci = find_candidates(query, layers, d0, n_lines, n_grid, cfg, rng, rel_tol, lines_given, t_range, known)
    out, grad_q, rejected = measure_candidates(query, layers, d0, cands, cfg, line_offset, max_bytes, executor)
    info = WitnessInfo(lines=ci.lines, kinks=ci.kinks, prefix_kinks=ci.prefix_kinks, witnesses=len(out),
                       rejected=rejected, search_queries=ci.search_queries, gradient_queries=grad_q,
                       lines_found=ci.lines_found)
    return out, info
