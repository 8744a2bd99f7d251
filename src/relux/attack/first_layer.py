"""Discovery and refinement of the first hidden layer (attack-notes §2-3, CJM20 §4).

Discovery walks random lines, finds their kinks, and measures the gradient of every affine piece
between kinks once, so that each gradient serves the kinks on both of its sides. Kinks that a known
hyperplane already explains cost nothing more. Refinement then re-measures every row at a point of
its hyperplane chosen far from all other (estimated) hyperplanes, with per-coordinate steps as large
as those hyperplanes allow, which is what brings the rows to float64 precision.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from relux.attack.column_repair import repair_columns
from relux.attack.config import ExtractionConfig
from relux.attack.confirm import crossing_hits
from relux.attack.critical import LineKinks, find_kinks
from relux.attack.gradients import fd_gradients
from relux.attack.hyperplanes import Signature, cluster_signatures, hyperplane_distance, signature_from_jump
from relux.attack.linalg import svd
from relux.attack.probe_check import choose_radii
from relux.oracle.base import FloatArray, QueryFn
from relux.parallel import Executor, SerialExecutor, split_evenly

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class DiscoveryInfo:
    lines: int
    kinks: int
    gradients: int
    signatures: int
    rejected: int
    search_queries: int
    neurons: int


@dataclass(frozen=True)
class RefinedRow:
    """A refined first-layer row ``(w, b)`` (unit ``w``) and how it was measured."""

    w: FloatArray
    b: float
    point: FloatArray  # exact witness on the hyperplane
    jump: FloatArray  # c: gradient jump = c ⊗ w (from the - side to the + side of w)
    clearance: float  # distance from the witness to the nearest other estimated hyperplane
    change: float  # distance between the estimate before and after refinement
    rank_ratio: float
    ok: bool
    reason: str
    noise: float = 0.0  # expected error of the unit row from float64 rounding in the finite differences


def _line_scale(cfg: ExtractionConfig, d: int) -> float:
    return cfg.input_scale * float(np.sqrt(d))


def discover_first_layer(
    query: QueryFn,
    d: int,
    width: int,
    cfg: ExtractionConfig,
    rng: np.random.Generator,
    rel_tol: float,
    sketch_dim: int = 0,
) -> tuple[list[Signature], DiscoveryInfo]:
    """Find a signature for every first-layer neuron visible on random lines.

    Stops when ``width`` distinct hyperplanes are known or after ``cfg.max_search_lines`` lines.
    Neurons never seen are dead (they never change the output) and are reported by the caller.

    ``sketch_dim > 0`` (a deep network with a wide input): most kinks belong to deeper neurons, and a
    full gradient on each side costs ``2 (d + 1)`` queries. Each new kink is first sketched: the jump
    of the directional derivatives along ``sketch_dim`` fixed random directions, ``2 (sketch_dim + 1)``
    queries. A first-layer neuron's jump is ``a ⊗ w`` with the same ``w`` everywhere, so its sketches
    on different lines agree; a deeper neuron's input-space direction changes from region to region.
    Only a kink whose sketch matches one from another line pays for full gradients (attack-notes §3,
    witness classification, done before the expensive measurement).
    """
    known: list[Signature] = []
    # The zero test of a crossing. With a wide input and kinks packed close on a line, the finite
    # differences steps are short and a discovery estimate is good to about 1e-6 only; there the
    # sketches, not the crossings, tell first-layer kinks apart, so the test may be looser.
    zero_tol = 1e-5 if sketch_dim > 0 else 1e-7
    sketch_basis = np.zeros((0, d))
    pool_keys: list[FloatArray] = []
    pool_lines: list[int] = []
    if sketch_dim > 0:
        sketch_basis = rng.normal(size=(sketch_dim, d))
        sketch_basis /= np.linalg.norm(sketch_basis, axis=1, keepdims=True)
    n_lines = kinks_total = grads = rejected = search_q = 0
    n_grid = int(cfg.grid_per_neuron * width) + 16
    t_range = cfg.line_range
    all_lines: list[LineKinks] = []
    while n_lines < cfg.max_search_lines:
        n_lines += 1
        x0 = rng.normal(0.0, cfg.input_scale, size=(1, d))
        u = rng.normal(size=(1, d))
        u *= _line_scale(cfg, d) / np.linalg.norm(u)
        lines, info = find_kinks(query, x0, u, -t_range, t_range, n_grid, rel_tol)
        search_q += info.queries
        line = lines[0]
        all_lines.append(line)
        t = line.t
        kinks_total += t.size
        if t.size == 0:
            t_range *= 2.0
            continue
        # Which kinks are explained by hyperplanes already known?
        new = np.ones(t.size, dtype=bool)
        if known:
            Wk = np.stack([s.w for s in known])
            bk = np.array([s.b for s in known])
            P = line.points()
            Z = np.abs(P @ Wk.T + bk[None, :])  # distance of each kink to each known hyperplane
            # the zero test of crossing_hits: relative to the size of the terms of w·x + b
            scl = np.linalg.norm(P, axis=1)[:, None] + np.abs(bk)[None, :]
            new = np.min(Z / scl, axis=1) > zero_tol
        if not new.any():
            t_range *= 1.5
        # Affine pieces: between consecutive kinks; the two outer ones are as wide as their neighbour.
        bounds = np.concatenate([[t[0] - (t[1] - t[0] if t.size > 1 else 1.0)], t,
                                 [t[-1] + (t[-1] - t[-2] if t.size > 1 else 1.0)]])
        mids = 0.5 * (bounds[:-1] + bounds[1:])
        halves = 0.5 * (bounds[1:] - bounds[:-1])
        need = np.zeros(mids.size, dtype=bool)
        idx_new = np.flatnonzero(new)
        if sketch_dim > 0 and idx_new.size:
            # a kink of a known hyperplane whose estimate is not yet exact: its sketch says so for free
            kk = np.stack([sketch_basis @ s.w for s in known]) if known else np.zeros((0, sketch_dim))
            kk /= np.maximum(np.linalg.norm(kk, axis=1, keepdims=True), np.finfo(float).tiny)
            idx_new, q_sk = _sketch_filter(query, line, idx_new, mids, halves, sketch_basis, cfg, d, n_lines,
                                           pool_keys, pool_lines, kk)
            search_q += q_sk
        need[idx_new] = True
        need[idx_new + 1] = True
        regions = np.flatnonzero(need)
        Gfull: dict[int, FloatArray] = {}
        if regions.size:
            Xr = line.x0[None, :] + mids[regions, None] * line.u[None, :]
            steps = (cfg.fd_rel_step / d) * halves[regions] * np.linalg.norm(line.u)
            G, _ = fd_gradients(query, Xr, steps)
            grads += regions.size
            Gfull = {int(r): G[i] for i, r in enumerate(regions)}
        fresh: list[Signature] = []
        for j in idx_new:
            delta = Gfull[int(j) + 1] - Gfull[int(j)]
            if not np.any(delta):
                rejected += 1
                continue
            sig = signature_from_jump(delta, line.x0 + t[j] * line.u)
            if sig.rank_ratio > 1e-3:
                rejected += 1  # two neurons' kinks too close together on this line
                continue
            fresh.append(sig)
        known = known + fresh
        if not known:
            continue
        # Every crossing a true hyperplane predicts on a search line is a kink found there; a
        # signature measured from a corrupted gradient predicts crossings that are not.
        hits, misses = crossing_hits(np.stack([s.w for s in known]), np.array([s.b for s in known]), all_lines,
                                     rel_tol=zero_tol)
        spurious = (misses >= 2) & (misses > hits)
        if spurious.any():
            rejected += int(spurious.sum())
            known = [s for s, bad in zip(known, spurious, strict=True) if not bad]
            hits, misses = hits[~spurious], misses[~spurious]
        if not known:
            continue
        # Several measurements of one hyperplane: keep the one whose predictions held best.
        groups = cluster_signatures(np.stack([s.key for s in known]), tol=1e-4)
        best = [max(g, key=lambda i: int(hits[i]) - 4 * int(misses[i])) for g in groups]
        known = [known[i] for i in best]
        hits, misses = hits[best], misses[best]
        confirmed = int(np.sum((hits >= 2) & (4 * misses <= hits)))
        log.debug("line %d: %d kinks, %d new, %d hyperplanes known, %d confirmed", n_lines, t.size,
                  int(new.sum()), len(known), confirmed)
        if confirmed >= width:
            break
    if known:
        hits, misses = crossing_hits(np.stack([s.w for s in known]), np.array([s.b for s in known]), all_lines,
                                     rel_tol=zero_tol)
        # Confirmed hyperplanes first: a true one that missed a crossing (its kink hidden where everything
        # after it is off) must still rank above a one-line signature of a deeper neuron.
        confirmed_mask = (hits >= 2) & (4 * misses <= hits)
        order = np.lexsort((-(hits - 4 * misses), ~confirmed_mask))
        known = [known[i] for i in order[:width] if confirmed_mask[i] or hits[i] > misses[i]]
    info_out = DiscoveryInfo(n_lines, kinks_total, grads, len(known), rejected, search_q, len(known))
    return known, info_out


def _sketch_filter(
    query: QueryFn,
    line: LineKinks,
    idx: np.ndarray,
    mids: FloatArray,
    halves: FloatArray,
    P: FloatArray,
    cfg: ExtractionConfig,
    d: int,
    line_id: int,
    pool_keys: list[FloatArray],
    pool_lines: list[int],
    known_keys: FloatArray,
    tol: float = 1e-4,
) -> tuple[np.ndarray, int]:
    """The kinks ``idx`` of ``line`` whose sketched jump direction (see :func:`discover_first_layer`)
    matches a kink of another line and none of ``known_keys`` (the sketches of hyperplanes already
    measured); every sketch joins the pool (``pool_keys``, ``pool_lines``). Returns those kinks and
    the queries spent."""
    regions = np.unique(np.concatenate([idx, idx + 1]))
    Xr = line.x0[None, :] + mids[regions, None] * line.u[None, :]
    steps = (cfg.fd_rel_step / d) * halves[regions] * float(np.linalg.norm(line.u))
    S, _ = fd_gradients(query, Xr, steps, basis=P)
    at = {int(r): S[i] for i, r in enumerate(regions)}
    old = np.stack(pool_keys) if pool_keys else np.zeros((0, P.shape[0]))
    old_lines = np.asarray(pool_lines, dtype=int)
    keep: list[int] = []
    for j in map(int, idx):
        delta = at[j + 1] - at[j]  # (k, sketch_dim)
        if not np.any(delta):
            continue
        _, sv, Vt = svd(delta, full_matrices=False)
        if sv.size > 1 and sv[1] > 1e-3 * sv[0]:
            continue  # two kinks in one probe: not one neuron's jump
        key = Vt[0] if Vt[0][np.argmax(np.abs(Vt[0]))] > 0 else -Vt[0]
        if known_keys.shape[0] and float(np.min(hyperplane_distance(key, known_keys))) <= tol:
            continue  # a hyperplane already measured
        if old.shape[0] and np.any((old_lines != line_id) & (hyperplane_distance(key, old) <= tol)):
            keep.append(j)
        pool_keys.append(key)
        pool_lines.append(line_id)
    return np.asarray(keep, dtype=int), int(regions.size * (P.shape[0] + 1))


#: Radii (in units of the line scale) of the rings of candidate base points, and candidates per ring.
_RING_RADII = (0.05, 0.15, 0.4, 1.0)
_RING_SIZE = 12
#: Largest number of float64 elements of the temporary of one step-planning task (64 MiB).
_MAX_STEP_ELEMS = 1 << 23


def _draw_directions(rng: np.random.Generator, n: int, d: int) -> FloatArray:
    """Row by row, the normal draws of the candidate base points (drawn in the parent, in row order)."""
    return rng.normal(size=(n, len(_RING_RADII), _RING_SIZE, d))


def _best_base_point(
    j: int, W: FloatArray, b: FloatArray, start: FloatArray, scale: float, directions: FloatArray
) -> tuple[FloatArray, float]:
    """A point on hyperplane ``j`` near ``start`` with the largest clearance from the other hyperplanes.

    ``directions`` (one ``(_RING_SIZE, d)`` block of standard normal draws per ring) give the
    candidates: projected onto the hyperplane and scaled to the ring's radius around ``start``.
    """
    wj = W[j]
    others = np.ones(W.shape[0], dtype=bool)
    others[j] = False
    cands = [start]
    for radius, V0 in zip(_RING_RADII, directions, strict=True):
        V = V0 - (V0 @ wj)[:, None] * wj[None, :]
        V *= (radius * scale) / np.linalg.norm(V, axis=1, keepdims=True)
        cands.extend(start[None, :] + V)
    C = np.asarray(cands)
    C -= (C @ wj + b[j])[:, None] * wj[None, :]  # project exactly onto the estimated hyperplane
    if not others.any():
        return C[0], scale
    clear = np.min(np.abs(C @ W[others].T + b[others][None, :]), axis=1)
    # Prefer clearance, mildly penalise wandering away (|f| grows, and so does rounding).
    score = clear / (1.0 + np.linalg.norm(C - start[None, :], axis=1) / scale)
    i = int(np.argmax(score))
    return C[i], float(clear[i])


# Pure per-row tasks of the refinement (run through an executor; see relux.parallel). Each carries
# what its rows need, including every random draw, so the result never depends on the workers.
@dataclass(frozen=True)
class _BaseTask:
    rows: tuple[int, ...]  # indices into W
    W: FloatArray
    b: FloatArray
    starts: FloatArray  # (m, d): the start of each row
    directions: FloatArray  # (m, rings, ring size, d): standard normal draws
    scale: float


def _plan_bases(task: _BaseTask) -> tuple[FloatArray, FloatArray]:
    """Base points ``(m, d)`` and their clearances ``(m,)`` for the task's rows."""
    m = len(task.rows)
    bases = np.empty((m, task.W.shape[1]))
    clears = np.empty(m)
    for i, j in enumerate(task.rows):
        bases[i], clears[i] = _best_base_point(j, task.W, task.b, task.starts[i], task.scale, task.directions[i])
    return bases, clears


@dataclass(frozen=True)
class _StepTask:
    Z: FloatArray  # (m, n): |w_k . x + b_k| at each probe point, for every estimated hyperplane k
    absW: FloatArray  # (n, d)
    cap: FloatArray  # (m,): largest step of each probe point
    safety: float
    reach: float


def _plan_steps(task: _StepTask) -> FloatArray:
    """Per-coordinate steps ``(m, d)``: a fraction of the distance along each coordinate to the nearest hyperplane."""
    with np.errstate(divide="ignore"):
        # distance along coordinate i to hyperplane k is |z_k| / |W_ki|
        steps = task.safety * np.min(task.Z[:, :, None] / task.absW[None, :, :], axis=1)
    out: FloatArray = np.minimum(task.reach * steps, task.cap[:, None])
    return out


@dataclass(frozen=True)
class _SolveTask:
    W: FloatArray  # (m, d): the estimated rows
    b: FloatArray  # (m,)
    bases: FloatArray  # (m, d)
    radii: FloatArray  # (m,)
    clears: FloatArray  # (m,)
    Gp: FloatArray  # (m, k, d): gradients at x+
    Gm: FloatArray  # (m, k, d): gradients at x-
    Fp: FloatArray  # (m, k): f(x+)
    Fm: FloatArray  # (m, k): f(x-)
    Sp: FloatArray  # (m, d): the coordinate steps at x+
    Sm: FloatArray  # (m, d): the coordinate steps at x-


def _rounding_noise(F: FloatArray, steps: FloatArray, jump: float) -> float:
    """Expected error of a unit row measured from forward differences (CJM20 §4.3): each difference
    carries the rounding of ``f`` (``eps |f|``) divided by its step, relative to the jump's size."""
    eps = float(np.finfo(float).eps)
    return float(2.0 * eps * float(np.max(np.abs(F))) * np.sqrt(np.sum(steps ** -2.0)) / max(jump, 1e-300))


def _solve_rows(task: _SolveTask) -> list[RefinedRow]:
    """The refined rows from the gradients on both sides of each estimated hyperplane."""
    W, b, bases, radii, clears = task.W, task.b, task.bases, task.radii, task.clears
    Gp, Gm, Fp, Fm = task.Gp, task.Gm, task.Fp, task.Fm
    rows: list[RefinedRow] = []
    for j in range(W.shape[0]):
        delta = Gp[j] - Gm[j]
        if not np.any(delta):
            rows.append(RefinedRow(W[j], float(b[j]), bases[j], np.zeros(Fp.shape[1]), clears[j], np.inf,
                                   1.0, False, "no gradient jump across the estimated hyperplane"))
            continue
        U, S, Vt = svd(delta, full_matrices=False)
        w = Vt[0] * np.sign(Vt[0] @ W[j])
        c = delta @ w  # (k,): the jump per output
        ratio = float(S[1] / S[0]) if S.size > 1 else 0.0
        # Exact witness: intersect the two affine pieces along the normal line x_c + tau * w_j.
        sp = Gp[j] @ W[j]
        sm = Gm[j] @ W[j]
        r = radii[j]
        # Fp + sp (tau - r) = Fm + sm (tau + r)  ->  (sp - sm) tau = Fm - Fp + (sp + sm) r
        ds = sp - sm
        rhs = Fm[j] - Fp[j] + (sp + sm) * r
        den = float(ds @ ds)
        tau = float(rhs @ ds) / den if den > 0 else np.nan
        point = bases[j] + tau * W[j]
        bj = float(-(w @ point))
        change = float(min(np.linalg.norm(np.append(w - W[j], bj - b[j])),
                           np.linalg.norm(np.append(w + W[j], bj + b[j]))))
        ok, reason = True, ""
        if not np.isfinite(tau) or abs(tau) >= r:
            ok, reason = False, "the two affine pieces do not meet between the probe points"
        elif ratio > 1e-6:
            ok, reason = False, f"gradient jump is not rank one (ratio {ratio:.1e})"
        elif change > 1e-3:
            ok, reason = False, f"refined row moved by {change:.1e} from its estimate"
        noise = _rounding_noise(np.concatenate([Fp[j], Fm[j]]), np.concatenate([task.Sp[j], task.Sm[j]]),
                                float(np.linalg.norm(c)))
        rows.append(RefinedRow(w, bj, point, c, float(clears[j]), change, ratio, ok, reason, noise))
    return rows


def _parts(executor: Executor, elems_per_item: int, n_items: int) -> int:
    """How many tasks to cut ``n_items`` into: a few per worker, and within the memory bound.

    Only the amount of work per task depends on this: every row is computed on its own, so the
    results are the same for any split.
    """
    per_worker = 1 if executor.jobs == 1 else 2 * executor.jobs
    by_memory = -(-n_items * elems_per_item // _MAX_STEP_ELEMS)
    return max(per_worker, by_memory)


def refine_first_layer(
    query: QueryFn,
    W: FloatArray,
    b: FloatArray,
    starts: FloatArray,
    cfg: ExtractionConfig,
    rng: np.random.Generator,
    only: list[int] | None = None,
    reach: float = 1.0,
    executor: Executor | None = None,
    check_segments: bool = False,
) -> tuple[list[RefinedRow], FloatArray, FloatArray]:
    """Re-measure every row of ``(W, b)`` (unit rows) at a well-separated point of its hyperplane.

    For row ``j``: a base point ``x_c`` on the estimated hyperplane far from the others; the points
    ``x± = x_c ± r w_j`` (``r`` = half the clearance) lie in the two affine pieces next to the
    hyperplane; their gradients are measured with per-coordinate steps bounded by
    ``cfg.refine_safety`` times the distance, along that coordinate, to the nearest estimated
    hyperplane; the jump gives ``w_j`` and the intersection of the two pieces along the normal gives
    the exact witness and ``b_j``. Costs ``2 (d + 1)`` queries per row.

    ``only`` restricts the work to those rows (the others still bound the steps). ``reach`` (<= 1)
    shrinks the probe radius and the steps, for networks with unseen boundaries (deeper layers).
    ``check_segments`` (deeper layers present) first tests each probe segment for an unseen boundary
    (:func:`relux.attack.probe_check.choose_radii`, 18 queries a row), shrinks the radius until one
    passes, and skips the rows where none does (reported not ok, no gradients paid for); then, with
    two or more outputs, single gradient columns whose step crossed an unseen boundary are re-measured
    (:func:`relux.attack.column_repair.repair_columns`).

    The per-row work (base points, steps, solves) runs on ``executor`` (serial by default); the
    queries are made here, in one batched call, and the random draws are made here, in row order,
    so the result is the same for every executor and number of workers.

    Returns the refined rows (of ``only``, or all) and the samples ``(X, f(X))`` at the points ``x±``
    (with ``check_segments``, of the measured rows only: the skipped ones have no probes).
    """
    ex: Executor = executor if executor is not None else SerialExecutor()
    sel = list(range(W.shape[0])) if only is None else list(only)
    n, d = len(sel), W.shape[1]
    scale = _line_scale(cfg, d)
    directions = _draw_directions(rng, n, d)
    chunks = split_evenly(n, _parts(ex, 1, n))
    planned = ex.map(_plan_bases, [
        _BaseTask(tuple(sel[i] for i in c), W, b, starts[[sel[i] for i in c]], directions[c.start:c.stop], scale)
        for c in chunks
    ])
    bases = np.concatenate([p[0] for p in planned])
    clears = np.concatenate([p[1] for p in planned])
    radii = 0.5 * reach * clears
    Ws = W[sel]
    bs = b[sel]
    if check_segments:
        choice = choose_radii(query, bases, Ws, radii)
        radii, measured = choice.radii, choice.clean
        log.debug("refinement: %d/%d probe segments clean (%d queries)", int(measured.sum()), n, choice.queries)
        keep = np.flatnonzero(measured)
        skipped = [RefinedRow(Ws[i], float(bs[i]), bases[i], np.zeros(0), float(clears[i]), np.inf, 1.0, False,
                              "every probe segment across the hyperplane also crosses another boundary")
                   for i in range(n)]
        if keep.size == 0:
            return skipped, np.empty((0, d)), np.empty((0, 1))
        sub_rows, X, F = _measure_rows(query, W, b, Ws[keep], bs[keep], bases[keep], radii[keep], clears[keep],
                                       cfg, reach, ex, repair=True)
        for i, row in zip(keep, sub_rows, strict=True):
            skipped[int(i)] = row
        return skipped, X, F
    return _measure_rows(query, W, b, Ws, bs, bases, radii, clears, cfg, reach, ex)


def _measure_rows(
    query: QueryFn,
    W: FloatArray,
    b: FloatArray,
    Ws: FloatArray,
    bs: FloatArray,
    bases: FloatArray,
    radii: FloatArray,
    clears: FloatArray,
    cfg: ExtractionConfig,
    reach: float,
    ex: Executor,
    repair: bool = False,
) -> tuple[list[RefinedRow], FloatArray, FloatArray]:
    """Gradients at ``bases ± radii * Ws`` and the rows solved from their jumps (see :func:`refine_first_layer`);
    ``repair``: re-measure gradient columns that crossed an unseen boundary."""
    n, d = Ws.shape
    Xp = bases + radii[:, None] * Ws
    Xm = bases - radii[:, None] * Ws
    X = np.concatenate([Xp, Xm])
    Z = np.abs(X @ W.T + b[None, :])  # (2n, n): distance to every estimated hyperplane
    absW = np.abs(W)
    cap = 4.0 * np.concatenate([radii, radii])
    chunks = split_evenly(2 * n, _parts(ex, W.shape[0] * d, 2 * n))
    steps = np.concatenate(ex.map(_plan_steps, [
        _StepTask(Z[c.start:c.stop], absW, cap[c.start:c.stop], cfg.refine_safety, reach) for c in chunks
    ]))
    G, F = fd_gradients(query, X, steps)
    if repair and G.shape[1] >= 2:
        G, steps, rep = repair_columns(query, X, F, G, steps, n)
        if rep.queries:
            log.debug("refinement: re-measured %s suspect columns (%d queries); %d rows still suspect",
                      list(rep.remeasured), rep.queries, rep.rows_left)
    Gp, Gm = G[:n], G[n:]
    Fp, Fm = F[:n], F[n:]
    chunks = split_evenly(n, _parts(ex, 1, n))
    solved = ex.map(_solve_rows, [
        _SolveTask(Ws[s], bs[s], bases[s], radii[s], clears[s], Gp[s], Gm[s], Fp[s], Fm[s], steps[:n][s],
                   steps[n:][s])
        for s in (slice(c.start, c.stop) for c in chunks)
    ])
    rows = [row for part in solved for row in part]
    return rows, X, F
