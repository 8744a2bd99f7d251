"""The last hidden layer behind a layer whose signs are open (attack-notes §3-4; CM24 §5 carried one
layer back).

Let layer ``i`` be the last hidden layer and layer ``i - 1`` known up to the sign of each row:
``ẑ_k = ±z_k``. Since ``ReLU(-ẑ) = ReLU(ẑ) - ẑ``, every pre-activation of layer ``i`` is exactly
affine in the *augmented* layer input ``[ReLU(ẑ), h]`` (``h``: the output of layer ``i - 2``)::

    y_j = Σ_k α_jk ReLU(ẑ_k) + β_j·h + γ_j,      β_j = -Σ_k t_k α_jk ŵ_k,

with ``t_k = 1`` where row ``k`` has the wrong sign. As ``h ≥ 0``, ``h = ReLU(h)``: the augmented input
is the output of a prefix whose last layer is layer ``i - 1`` stacked on the identity, so witnesses
measured behind that prefix (:mod:`relux.attack.witnesses`) fit these rows with no sign assumption.

Nothing non-linear follows the last hidden layer, so every kink of its neuron ``j`` moves the
output along the same direction, column ``j`` of the output layer, whatever the activation pattern:
the witnesses group exactly by that direction (:func:`group_by_output`). Within a group, a
coordinate of layer ``i - 1`` that is on at every witness is confounded with ``β`` and one off at
every witness is not seen, so only the switched ones are fitted (:func:`free_row`). The flips then
solve ``β_j = -Σ_k t_k α_jk ŵ_k`` for all fitted rows at once (:func:`decode_flips`; the unswitched
neurons' terms are projected out), and each row is refitted over the signed layer ``i - 1``
(:func:`signed_row`), which needs half the unknowns.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from relux.attack import prefix as pfx
from relux.attack.config import ExtractionConfig
from relux.attack.linalg import svd
from relux.attack.missing import unexplained_lines
from relux.attack.signs import SignSolution, solve_binary
from relux.attack.unify import NeuronRow, robust_unify, shadowed_rows, trimmed_unify
from relux.attack.witnesses import Witness, collect_witnesses, witness_bytes
from relux.oracle.base import FloatArray, QueryFn
from relux.parallel import Executor

log = logging.getLogger(__name__)


def augment(layers: Sequence[pfx.Layer]) -> list[pfx.Layer]:
    """The prefix whose output is ``[ReLU(ẑ_{i-1}), h_{i-2}]``: the last known layer stacked on the
    identity of its input (exact, as that input is a ReLU output). Needs two known layers or more."""
    if len(layers) < 2:
        raise ValueError(f"augment needs at least two known layers, got {len(layers)}")
    W, b = layers[-1]
    d = W.shape[1]
    return [*layers[:-1], (np.vstack([W, np.eye(d)]), np.concatenate([b, np.zeros(d)]))]


def group_by_output(witnesses: Sequence[Witness], rel_tol: float = 100.0) -> list[np.ndarray]:
    """Witnesses grouped by the direction of their output jump (up to sign), largest group first.

    A witness joins the group whose first member's direction is nearest, when the angle between them
    is below ``rel_tol`` times the sum of their measured noise (the second singular value of each jump
    over its first, which is what a finite difference's error leaves), and below 1e-2 in any case;
    else it starts a group. One pass, against one direction per group: O(witnesses x groups)."""
    if not witnesses:
        return []
    D = np.stack([np.asarray(w.out_dir) for w in witnesses])
    noise = np.array([max(w.rank_ratio, np.finfo(float).eps) for w in witnesses])
    reps = np.zeros((0, D.shape[1]))
    rep_noise = np.zeros(0)
    members: list[list[int]] = []
    for i in range(D.shape[0]):
        if members:
            # the chord between the directions (signs aligned): from 1 - cos, rounding alone would
            # leave angles of 1e-8
            sgn = np.where(reps @ D[i] < 0, -1.0, 1.0)
            angle = np.linalg.norm(reps - sgn[:, None] * D[i], axis=1)
            tol = np.minimum(rel_tol * (rep_noise + noise[i]) + 1e3 * np.finfo(float).eps, 1e-2)
            j = int(np.argmin(angle - tol))
            if angle[j] <= tol[j]:
                members[j].append(i)
                continue
        reps = np.vstack([reps, D[i]])
        rep_noise = np.append(rep_noise, noise[i])
        members.append([i])
    groups = [np.array(m) for m in members]
    groups.sort(key=lambda m: -m.size)
    return groups


def _masked(w: Witness, keep: np.ndarray) -> Witness:
    return dataclasses.replace(w, active=w.active & keep)


def free_row(witnesses: Sequence[Witness], members: Sequence[int], d_prev: int) -> tuple[NeuronRow, np.ndarray]:
    """The augmented row ``([α, β], γ)`` of one group (unit norm), and the switched layer-``i - 1``
    coordinates it fits. ``NeuronRow.gap`` says whether the group determines it."""
    act = np.stack([witnesses[i].active[:d_prev] for i in members])
    switched = np.asarray(act.any(axis=0) & ~act.all(axis=0), dtype=bool)
    keep = np.concatenate([switched, np.ones(witnesses[members[0]].active.size - d_prev, dtype=bool)])
    sub = [_masked(witnesses[i], keep) for i in members]
    return robust_unify(sub, list(range(len(sub)))), switched


def decode_flips(
    rows: Sequence[tuple[NeuronRow, np.ndarray]], W_prev: FloatArray, max_enum_bits: int, rel_tol: float = 0.1,
    relevant_rel: float = 1e-4,
) -> SignSolution:
    """Flips ``t`` of layer ``i - 1`` from fitted augmented rows: ``β_j + Σ_k t_k α_jk ŵ_k`` must lie in
    the span of the unswitched rows' ``ŵ_k`` (their coefficients are unknown), for every row ``j``,
    restricted to the coordinates its witnesses saw. One binary solve over the stacked projections.

    The fitted rows carry finite-difference noise, stacked over every row: the accepted residual is a
    tenth of the smallest relevant column (a wrong bit moves it by a whole column), and a neuron whose
    column is below ``relevant_rel`` of the largest, which barely moves layer ``i``, is left open."""
    d_prev = W_prev.shape[0]
    blocks_A: list[FloatArray] = []
    blocks_g: list[FloatArray] = []
    for row, switched in rows:
        alpha, beta = row.w[:d_prev], row.w[d_prev:]
        seen = row.coverage[d_prev:]
        A = (W_prev.T * alpha[None, :])[seen][:, switched]
        F = W_prev[~switched][:, seen].T
        g = -beta[seen]
        # scaled before the projection: a row whose unswitched neurons span what it saw says nothing,
        # and its projected remainder (rounding only) must not be blown up
        scale = float(np.linalg.norm(g)) + float(np.linalg.norm(A)) or 1.0
        if F.shape[1]:
            Q, S, _ = svd(F, full_matrices=False)
            Q = Q[:, S > 1e-10 * (S[0] if S.size else 0.0)]
            A = A - Q @ (Q.T @ A)
            g = g - Q @ (Q.T @ g)
        full = np.zeros((A.shape[0], d_prev))
        full[:, switched] = A
        blocks_A.append(full / scale)
        blocks_g.append(g / scale)
    return solve_binary(np.concatenate(blocks_A), np.concatenate(blocks_g), max_enum_bits, rel_tol, relevant_rel)


def signed_witness(w: Witness, W_prev: FloatArray, b_prev: FloatArray) -> Witness:
    """A witness measured behind the augmented prefix, restated over the signed layer ``i - 1``: its
    control image of ``ŵ_k`` is that of ``h`` times ``ŵ_k``, where neuron ``k`` is on (no query)."""
    d_prev = W_prev.shape[0]
    h_in = w.h[d_prev:]
    z = W_prev @ h_in + b_prev
    on = z > 0
    A = (w.A_ctrl[:, d_prev:] @ W_prev.T) * on[None, :]
    return dataclasses.replace(w, A_ctrl=A, h=np.maximum(z, 0.0), active=on, w=np.zeros(d_prev), full_rank=False)


def signed_row(
    witnesses: Sequence[Witness], members: Sequence[int], W_prev: FloatArray, b_prev: FloatArray
) -> NeuronRow:
    """One group's row over the signed layer ``i - 1`` (unit norm, up to sign)."""
    sub = [signed_witness(witnesses[i], W_prev, b_prev) for i in members]
    return robust_unify(sub, list(range(len(sub))))


@dataclass(frozen=True)
class FreeLast:
    """Outcome of :func:`free_last_layer`.

    ``flips``/``confidence``/``decided``: layer ``i - 1``'s signs (``sign`` the binary solve);
    ``W, b``: unit rows of layer ``i`` over the *corrected* layer ``i - 1``, with ``coverage`` (the
    layer-input coordinates some witness of the row saw on), their ``points`` (witnesses) and
    ``residual``; ``reason`` names what stopped it short of ``width`` rows or of decided signs."""

    flips: np.ndarray
    confidence: FloatArray
    decided: np.ndarray
    sign: SignSolution | None
    W: FloatArray
    b: FloatArray
    coverage: np.ndarray
    points: tuple[FloatArray, ...]
    residual: FloatArray
    witnesses: int
    lines: int
    groups: int
    free_rows: int
    reason: str

    @property
    def ok(self) -> bool:
        return self.sign is not None and self.sign.ok


def _settle_open(
    witnesses: Sequence[Witness], groups: Sequence[np.ndarray], layer: pfx.Layer, flips: np.ndarray,
    open_: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Signs the solve left open, one at a time, by which choice lets the largest groups' signed rows
    fit their witnesses. Such a neuron switched in no group: on (or off) at every witness, its linear
    term hides in ``β``. With the wrong sign a neuron nearly always on is off in the model, and its
    term is then missing from every row it feeds; a neuron that changes no fit stays open. Returns
    the flips and the neurons settled."""
    W, b = layer
    groups = [g for g in groups if g.size >= 2]
    flips = flips.copy()

    def misfit(fl: np.ndarray) -> float:
        sgn = np.where(fl, -1.0, 1.0)
        res = [signed_row(witnesses, list(g), W * sgn[:, None], b * sgn).residual for g in groups]
        return float(np.median(res)) if res else 0.0

    settled: list[int] = []
    base = misfit(flips)
    for k in (int(j) for j in open_):
        alt = flips.copy()
        alt[k] = ~alt[k]
        other = misfit(alt)
        # rounding leaves residuals alike; a missing term leaves them orders of magnitude apart
        if other < 1e-2 * base:
            flips, base = alt, other
            settled.append(k)
        elif base < 1e-2 * other:
            settled.append(k)
    return flips, np.array(settled, dtype=int)


def _distinct(rows: Sequence[tuple[NeuronRow, np.ndarray]]) -> list[tuple[NeuronRow, np.ndarray]]:
    """Determined rows, one per neuron (most witnesses first): one neuron's witnesses split into two
    groups give the same hyperplane twice."""
    from relux.attack.hyperplanes import hyperplane_distance

    out: list[tuple[NeuronRow, np.ndarray]] = []
    for r, g in sorted(rows, key=lambda p: -p[1].size):
        key = np.append(r.w, r.b)
        if out and np.min(hyperplane_distance(key, np.stack([np.append(x.w, x.b) for x, _ in out]))) < 1e-4:
            continue
        out.append((r, g))
    return out


def free_last_layer(
    query: QueryFn,
    layers: Sequence[pfx.Layer],
    width: int,
    d0: int,
    total_hidden: int,
    cfg: ExtractionConfig,
    rng: np.random.Generator,
    rel_tol: float,
    executor: Executor | None = None,
    min_free_rows: int = 4,
    max_free_rows: int = 64,
    max_settle_lines: int = 48,
    hints: FloatArray | None = None,
) -> FreeLast:
    """The last hidden layer (``width`` rows) and the signs of the layer before it, from witnesses on
    random lines behind the augmented prefix (see the module docstring).

    Search lines come four at a time. Until the signs settle, the largest groups (at most
    ``max_free_rows``, three witnesses or more) fit their augmented rows, and once ``min_free_rows``
    of them are determined the signs are solved; they are settled when two solves in a row give one
    exact solution with the same flips (else it gives up after ``max_settle_lines`` lines: the walks
    then take over). Then every group's signed row is fitted, until ``width``
    distinct rows are determined with at most 1% of their weights unseen (or two rounds after all
    rows are there), or four rounds bring no new row (after up to four rounds of lines aimed where the
    rows found cannot explain ``f``; ``hints`` are looked at first: inputs where an earlier
    attempt's model was wrong)."""
    d_prev = layers[-1][0].shape[0]
    aug = augment(layers)
    n_grid = int(cfg.grid_per_neuron * total_hidden) + 16
    max_lines = cfg.max_search_lines * 8
    mem_limit = cfg.witness_memory_mb * 2**20
    witnesses: list[Witness] = []
    held = lines = stall = full_rounds = 0
    best = -1
    sol: SignSolution | None = None
    settled = False
    n_free = 0
    free_cache: dict[tuple[int, ...], tuple[NeuronRow, np.ndarray]] = {}
    signed_cache: dict[tuple[int, ...], NeuronRow] = {}
    done: list[tuple[NeuronRow, np.ndarray]] = []
    groups: list[np.ndarray] = []
    reason = ""
    flips = decided = np.zeros(d_prev, dtype=bool)
    prefix = aug
    aimed: tuple[FloatArray, FloatArray] | None = None
    aimed_rounds = 0
    while True:
        if lines >= max_lines:
            reason = f"search-line limit ({max_lines}) reached"
            break
        if held > mem_limit:
            reason = f"witness memory limit ({cfg.witness_memory_mb} MB) after {lines} lines"
            break
        whole = [r for r, _ in done if r.complete]
        known = (np.stack([r.w for r in whole]), np.array([r.b for r in whole])) if whole else None
        new, _ = collect_witnesses(query, prefix, d0, 4, n_grid, cfg, rng, rel_tol, line_offset=lines,
                                   lines_given=aimed, known=known, max_bytes=max(mem_limit - held, 0),
                                   executor=executor)
        lines += 4 if aimed is None else aimed[0].shape[0]
        aimed = None
        witnesses += [w for w in new if w.out_dir is not None]
        held += witness_bytes(new)
        groups = group_by_output(witnesses)
        if not settled:
            fits = []
            for g in [g for g in groups if g.size >= 3][:max_free_rows]:
                key = tuple(int(i) for i in g)
                if key not in free_cache:
                    free_cache[key] = free_row(witnesses, key, d_prev)
                fits.append(free_cache[key])
            good = [f for f in fits if f[0].gap >= 1e3]
            if good:
                # rows whose witnesses agree: within 30x the typical residual
                limit = 30.0 * float(np.median([r.residual for r, _ in good]))
                good = [f for f in good if f[0].residual <= limit]
            n_free = len(good)
            if n_free >= min_free_rows:
                new_sol = decode_flips(good, layers[-1][0], cfg.max_enum_bits)
                settled = (sol is not None and new_sol.ok and sol.ok and new_sol.solutions == 1
                           and bool(new_sol.relevant.any())
                           and bool(np.array_equal(new_sol.flips, sol.flips))
                           and bool(np.array_equal(new_sol.relevant, sol.relevant)))
                sol = new_sol
            log.debug("free last layer: %d lines, %d witnesses, %d groups, %d free rows, signs %s", lines,
                      len(witnesses), len(groups), n_free, "settled" if settled else
                      (sol.reason or "solved once") if sol is not None else "not solved yet")
            if not settled:
                if lines >= max_settle_lines:
                    reason = f"signs not settled after {lines} lines"
                    break
                continue
            assert sol is not None
            flips = np.array(sol.flips, dtype=bool)
            decided = sol.relevant & (sol.confidence >= 0.5)
            open_ = np.flatnonzero(~decided)
            if open_.size:
                flips, by_fit = _settle_open(witnesses, groups[:8], layers[-1], flips, open_)
                decided[by_fit] = True
                log.debug("free last layer: open signs %s, settled by the signed fits: %s", list(open_),
                          list(by_fit))
            sgn = np.where(flips, -1.0, 1.0)
            Ws, bs = layers[-1][0] * sgn[:, None], layers[-1][1] * sgn
            # from here on the signed prefix: the witnesses so far restated over it, new ones measured
            # behind it (half the unknowns, and kinks of finished rows cost nothing more)
            witnesses = [signed_witness(w, Ws, bs) for w in witnesses]
            prefix = [*layers[:-1], (Ws, bs)]
        # a lone witness may be two kinks at once, whose jump matches no column: two at least
        # (a group whose members did not change keeps its fit: the witness list only grows)
        fitted = []
        for g in (g for g in groups if g.size >= 2):
            key = tuple(int(i) for i in g)
            if key not in signed_cache:
                r = robust_unify(witnesses, list(key))
                if (r.residual > 1e-8 or r.gap < 1e3) and len(key) >= 4:
                    # a few witnesses of another boundary mixed in: trimmed one at a time
                    t = trimmed_unify(witnesses, list(key))
                    if t.residual <= 1e-8 and t.gap >= 1e3:
                        r = t
                signed_cache[key] = r
            fitted.append((signed_cache[key], g))
        det = [(r, g) for r, g in fitted if r.gap >= 1e3]
        limit = max(1e-8, 30.0 * float(np.median([r.residual for r, _ in det]))) if det else 0.0
        done = _distinct([(r, g) for r, g in det if r.residual <= limit])
        # a group whose every witness lies on another group's row: that neuron's witnesses again
        # (split off by a poor jump direction), fitted wrong in a weight one stray witness fixes
        gone = shadowed_rows([r for r, _ in done], witnesses)
        done = [d for i, d in enumerate(done) if i not in gone][:width]
        unseen = int(sum(int((~r.coverage).sum()) for r, _ in done))
        log.debug("free last layer: %d lines, %d groups, %d signed rows, %d weights unseen", lines,
                  len(groups), len(done), unseen)
        full_rounds = full_rounds + 1 if len(done) >= width else 0
        # with every row there, two more rounds for the unseen weights; the rest are filled along
        # each row's boundary (relux.attack.complete), which costs far less than lines that rarely
        # switch a neuron on
        if len(done) >= width and (unseen <= 0.01 * width * d_prev or full_rounds > 2):
            break
        # progress is a new row; seen weights alone do not pay for more lines
        stall = stall + 1 if len(done) <= best else 0
        best = max(best, len(done))
        if len(done) < width and done and stall >= 2 and aimed_rounds < 4:
            # a neuron rarely on shows where the rows found cannot explain f: aim lines there
            aimed = unexplained_lines(query, prefix, np.stack([r.w for r, _ in done]),
                                      np.array([r.b for r, _ in done]), d0, cfg, rng, hints=hints)
            aimed_rounds += 1
            if aimed is not None:
                log.debug("free last layer: %d lines aimed at unexplained outputs", aimed[0].shape[0])
                continue
        if stall >= 4:
            reason = (f"{len(done)}/{width} rows, {unseen} weights unseen, after {lines} lines "
                      "(4 rounds without progress)")
            break
    if sol is None or not settled:
        why = "signs never solved" if sol is None else (sol.reason or "two solves in a row disagreed")
        # signs that never settled are no verdict: no sign solution goes out (``ok`` is False)
        return FreeLast(np.zeros(d_prev, dtype=bool), np.zeros(d_prev), np.zeros(d_prev, dtype=bool), None,
                        np.zeros((0, d_prev)), np.zeros(0), np.zeros((0, d_prev), dtype=bool), (),
                        np.zeros(0), len(witnesses), lines, len(groups), n_free, f"{reason}; {why}" if reason else why)
    W = np.stack([r.w for r, _ in done]) if done else np.zeros((0, d_prev))
    b = np.array([r.b for r, _ in done])
    cov = np.stack([r.coverage for r, _ in done]) if done else np.zeros((0, d_prev), dtype=bool)
    # the witnesses each row's fit kept (robust_unify may drop a few): exact points of its boundary
    pts = tuple(np.stack([witnesses[i].x for i in r.members]) for r, _ in done)
    res = np.array([r.residual for r, _ in done])
    conf = np.where(decided, np.maximum(sol.confidence, 0.5), sol.confidence)
    return FreeLast(flips, conf, decided, sol, W, b, cov, pts, res, len(witnesses), lines, len(groups), n_free,
                    reason)
