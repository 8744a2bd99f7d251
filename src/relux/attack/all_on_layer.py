"""A hidden layer read on lines where every known neuron is on (attack-notes §3; CM24 §3.2).

On such a line (:mod:`relux.attack.active_lines`) the prefix is one affine map of full rank, so a
single witness of a layer-``i`` neuron shows its whole row. Most kinks there are of deeper neurons,
though (behind a 256-wide first layer, about 55 of layer 2 and 350 deeper per line), and a full
gradient costs ``2 (d + 1)`` queries. So every kink first gets a cheap key: the jump of the gradient
along ``k`` fixed random directions (``2 (k + 1)`` queries at most, pieces shared between neighbouring
kinks). A layer-``i`` neuron's jump is ``c ⊗ (w A)``, whose direction along the fixed directions is
the same at each of its kinks; a deeper neuron's depends on which layer-``i`` neurons are on, which
differs between lines. Keys that agree on two lines, at kinks far apart or with known neurons of the
layer switching between them (:func:`_apart`), make a candidate; one full measurement gives its row,
which must pass through the other kinks of its key and predict the kinks found on every line
(:func:`relux.attack.confirm.crossing_hits`). Chords find most rows; the last are of neurons switched
only in small corners of the region, which short lines from its vertices (*tips*,
:func:`relux.attack.active_lines.tip_lines`) cross twice.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
from scipy.spatial.distance import cdist

from relux.attack import prefix as pfx
from relux.attack.active_lines import (
    AllOnRegion,
    active_lines,
    all_on_map,
    all_on_region,
    corner_scores,
    facet_vertices,
    tip_lines,
)
from relux.attack.config import ExtractionConfig
from relux.attack.confirm import crossing_hits, mostly_confirmed
from relux.attack.critical import LineKinks
from relux.attack.hyperplanes import signature_from_jump
from relux.attack.witnesses import Candidate, find_candidates, measure_candidates
from relux.oracle.base import FloatArray, QueryFn
from relux.parallel import Executor

if TYPE_CHECKING:
    from relux.attack.deep import LayerOutcome

log = logging.getLogger(__name__)

#: Keys of one neuron agree to rounding (exact finite differences inside linear pieces); keys of two
#: neurons are independent directions in ``k`` dimensions, ``|cos|`` about ``1/sqrt(k)``: with the
#: default ``k = 8``, one pair in about ``1e20`` comes within this tolerance.
KEY_TOL = 1e-6
#: A row from one finite-difference gradient (steps of ``fd_rel_step / d`` of a piece) is good to about
#: 1e-6 relative; its other kinks lie that close to its plane, a deeper neuron's kink O(1) away.
PLANE_TOL = 1e-4
#: A row is confirmed on two kinks of different lines at least this fraction of the shorter line's
#: length apart. Kinks of one deeper neuron agree in key and plane wherever the layer's pattern is the
#: same, as near a vertex two chords share; a chord crosses about a hundred of the layer's boundaries,
#: so that stretch is about 1% of its length.
MIN_APART = 0.1
#: ... or where at least this many of the layer's known neurons switch between the two kinks. A
#: deeper neuron's key changes with any one of them unless its weight on it is near zero. Two were
#: not enough: behind the extracted CIFAR layers 1-2, two kinks of a layer-4 neuron whose weights on
#: the two layer-3 neurons switched between them were 5e-4 and 2e-4 (of a unit row; a typical weight
#: is 6e-2) gave a false layer-3 row. A weight that small is about one in a hundred, so four in a row
#: one in 1e8.
MIN_SWITCHED = 4
#: Why :func:`all_on_rows` found no row when no input has every known neuron on.
NO_REGION = "no point where every known neuron is on"
#: Why :func:`all_on_rows` stopped early when its ``precise`` check failed on the first rows.
IMPRECISE = "the region is too thin: its first rows do not refine on exact boundary points"


@dataclass(frozen=True)
class AllOnRows:
    """Rows of layer ``i`` (unit norm, first weight of largest magnitude positive), with the exact
    kinks each was seen at, the largest relative distance of those kinks from its plane, and what the
    search cost."""

    W: FloatArray
    b: FloatArray
    points: tuple[FloatArray, ...]
    residual: FloatArray
    lines: int
    kinks: int
    measured: int
    reason: str = ""
    tips: int = 0  # how many of the lines were tips


@dataclass
class _Cluster:
    members: list[Candidate] = field(default_factory=list)
    done: bool = False  # measured (a row, or found not to be one)


def _apart(
    members: Sequence[Candidate], lengths: Sequence[float], switched: np.ndarray | None = None,
) -> bool:
    """Whether two of ``members`` on different lines are kinks of one neuron of the layer, not of a
    deeper neuron whose key stayed the same: either both lines are chords (finite ``lengths``, by line
    index) and the kinks are ``MIN_APART`` of the shorter one apart, or at least ``MIN_SWITCHED`` of the
    layer's rows known so far are clearly on at one and clearly off at the other (``switched``, per
    member: +1, -1 or 0, :func:`_switched`). A deeper neuron's key is the direction of its weights
    through the layer's active neurons, so it changes wherever the layer's pattern does (attack-notes
    §3)."""
    if len({c.line for c in members}) < 2:
        return False
    X = np.stack([c.x for c in members])
    line = np.array([c.line for c in members])
    ln = np.asarray(lengths, dtype=float)[line]
    pair = line[:, None] != line[None, :]
    chords = np.isfinite(ln)
    near = MIN_APART * np.minimum(ln[:, None], ln[None, :])
    if np.any(pair & chords[:, None] & chords[None, :] & (cdist(X, X) >= near)):
        return True
    if switched is None or switched.shape[1] == 0:
        return False
    on = (switched > 0).astype(float)
    off = (switched < 0).astype(float)
    differ = on @ off.T + off @ on.T
    return bool(np.any(pair & (differ >= MIN_SWITCHED)))


def _switched(H: FloatArray, known: tuple[FloatArray, FloatArray] | None) -> np.ndarray:
    """The pattern of the layer's rows ``known`` so far at points whose layer inputs are ``H``: +1
    clearly on, -1 clearly off, 0 within ``PLANE_TOL`` (relative) of the boundary, where an imprecise
    row may be either (no columns when no row is known)."""
    if known is None:
        return np.zeros((H.shape[0], 0), dtype=np.int8)
    W, b = known
    Z = H @ W.T + b
    scale = np.linalg.norm(H, axis=1)[:, None] * np.linalg.norm(W, axis=1)[None, :] + np.abs(b)[None, :]
    return np.asarray(np.where(Z > PLANE_TOL * scale, 1, np.where(Z < -PLANE_TOL * scale, -1, 0)), dtype=np.int8)


def jump_keys(
    query: QueryFn, layers: Sequence[pfx.Layer], cands: Sequence[Candidate], D: FloatArray, fd_rel_step: float,
    chunk: int = 4096,
) -> tuple[list[FloatArray | None], int]:
    """Per candidate, the unit direction (sign fixed) of its gradient jump along the rows of ``D``, or
    None when the jump is zero or not rank one; and the queries made. A piece shared by two
    neighbouring candidates of a line is probed once."""
    k = D.shape[0]
    pieces: dict[bytes, int] = {}
    base: list[FloatArray] = []
    reach: list[float] = []
    sides: list[tuple[int, int]] = []
    for c in cands:
        idx = []
        for p, half in ((c.left, c.half_left), (c.right, c.half_right)):
            key = p.tobytes()
            if key not in pieces:
                pieces[key] = len(base)
                base.append(p)
                reach.append(fd_rel_step / k * half * c.unorm)
            idx.append(pieces[key])
        sides.append((idx[0], idx[1]))
    n = len(base)
    if n == 0:
        return [], 0
    P = np.stack(base)
    S = np.minimum(np.array(reach)[:, None], 0.25 * pfx.safe_steps_many(layers, P, D))
    X = np.concatenate([P[:, None, :], P[:, None, :] + S[:, :, None] * D[None, :, :]], axis=1).reshape(-1, P.shape[1])
    Y = np.concatenate([query(X[i : i + chunk]) for i in range(0, X.shape[0], chunk)])
    Y = Y.reshape(n, k + 1, -1)
    G = (Y[:, 1:, :] - Y[:, :1, :]) / S[:, :, None]  # (pieces, k, outputs)
    out: list[FloatArray | None] = []
    origin = np.zeros(k)
    for left, right in sides:
        J = (G[right] - G[left]).T  # (outputs, k)
        sig = signature_from_jump(J, origin) if np.any(J) else None
        out.append(sig.w if sig is not None and sig.rank_ratio <= 1e-3 else None)
    return out, X.shape[0]


class _Row(NamedTuple):
    w: FloatArray
    b: float
    points: list[FloatArray]  # the cluster's kinks on its plane
    fit: float  # their median relative misfit
    residual: float  # and the largest


def _cluster_row(
    query: QueryFn, layers: Sequence[pfx.Layer], d0: int, cl: _Cluster, lengths: Sequence[float],
    known: tuple[FloatArray, FloatArray] | None, cfg: ExtractionConfig, rel_tol: float, executor: Executor | None,
) -> tuple[_Row | None, int]:
    """The row of a cluster's neuron, measured at one member on each of up to two lines (the two
    with the longest pieces) and taken from
    the measurement whose plane passes closest to the other members (a finite-difference probe that
    crossed an unseen boundary spoils one measurement, rarely two), and the measurements made. None
    when no measurement passes through members on two lines far enough apart (:func:`_apart`)."""
    # On each line the member with the longest pieces on both sides: finite-difference steps are a
    # fraction of a piece, so the longest pieces give the most precise gradient (attack-notes §3).
    by_line: dict[int, Candidate] = {}
    for c in sorted(cl.members, key=lambda c: -min(c.half_left, c.half_right) * c.unorm):
        by_line.setdefault(c.line, c)
    X = np.stack([c.x for c in cl.members])
    _, H = pfx.forward(layers, X)
    hn = np.linalg.norm(H, axis=1)
    switched = _switched(H, known)
    best: _Row | None = None
    n = 0
    for c in list(by_line.values())[:2]:
        wts, _, _ = measure_candidates(query, layers, d0, [c], cfg, executor=executor)
        n += 1
        if not wts or not wts[0].full_rank:
            continue
        w, b = wts[0].w, wts[0].b
        z = np.abs(H @ w + b) / (hn * float(np.linalg.norm(w)) + abs(b))
        on = z <= max(PLANE_TOL, 1e3 * rel_tol)
        if not _apart([m for m, o in zip(cl.members, on, strict=True) if o], lengths, switched[on]):
            continue
        row = _Row(w, b, [x for x, o in zip(X, on, strict=True) if o], float(np.median(z[on])), float(np.max(z[on])))
        if best is None or row.fit < best.fit:
            best = row
        if row.fit <= 1e3 * rel_tol:
            break
    return best, n


def _known(seed: tuple[FloatArray, FloatArray] | None, rows: Sequence[_Row]) -> tuple[FloatArray, FloatArray] | None:
    """The rows ``seed`` given and those found so far, as one ``(W, b)``; None when there are none."""
    W = [seed[0]] if seed is not None else []
    b = [seed[1]] if seed is not None else []
    if rows:
        W.append(np.stack([r.w for r in rows]))
        b.append(np.array([r.b for r in rows]))
    return (np.concatenate(W), np.concatenate(b)) if W and sum(w.shape[0] for w in W) else None


def _as_rows(rows: Sequence[_Row], lines: int, kinks: int, measured: int, tips: int) -> AllOnRows:
    """The rows found so far, as they are (not yet deduplicated or confirmed on the lines)."""
    return AllOnRows(np.stack([r.w for r in rows]), np.array([r.b for r in rows]),
                     tuple(np.stack(r.points) for r in rows), np.array([r.residual for r in rows]), lines, kinks,
                     measured, tips=tips)


def all_on_rows(
    query: QueryFn,
    layers: Sequence[pfx.Layer],
    width: int,
    d0: int,
    cfg: ExtractionConfig,
    rng: np.random.Generator,
    rel_tol: float,
    executor: Executor | None = None,
    n_keys: int = 8,
    per_round: int = 8,
    region: AllOnRegion | None = None,
    on: np.ndarray | None = None,
    use_tips: bool = True,
    seed: tuple[FloatArray, FloatArray] | None = None,
    precise: Callable[[AllOnRows], bool] | None = None,
) -> AllOnRows:
    """Rows of the layer behind ``layers`` from kinks on all-on lines (module docstring), in rounds of
    ``per_round`` lines until ``width`` rows are confirmed. Chords first, until a round adds at most
    one row in a hundred (or none three rounds in a row, or ``cfg.max_search_lines * 8`` lines were
    walked); then tips from every facet vertex of the region, the likeliest corners first
    (:func:`relux.attack.active_lines.corner_scores` over the rows known so far), until none is left
    or ``cfg.max_search_lines * 8`` tips in a row add no row (a row that cannot come, as when a sign
    of the layer before is wrong, costs no more than that).
    Behind the true first two layers of the CIFAR-scale unitary network: 245 rows after 24 chords,
    the last 11 from tips (256/256 after 32 chords and 192 tips, 1.49M queries); session 18's chords
    alone stopped at 255 after 144.

    ``region`` and ``on``: lines in a region where the layer before follows the pattern ``on``
    (:func:`relux.attack.active_lines.pattern_region`) instead; a row then has weights only on the
    neurons on there (:mod:`relux.attack.pattern_layer` pieces rows together). ``use_tips``: whether tips
    follow the chords. ``seed = (W, b)``: rows of the layer already known whole; their kinks cost no
    query (:func:`relux.attack.witnesses.find_candidates`), only ``width`` less their number are
    sought, and they are not returned (a seed too far off for its kinks to be recognised is found
    again as a new row). ``precise``: a check of the rows found, called once, after the first round
    that gives :data:`SEED_PROBE` of them (or all those sought, or any once the tips begin, or at
    the end when no round did); when it fails, those rows are returned as found (not yet
    deduplicated or confirmed) with the reason :data:`IMPRECISE` (:func:`all_on_outcome` then reads
    the layer in pattern regions)."""
    d_in = layers[-1][0].shape[0]
    scale = cfg.input_scale * float(np.sqrt(d0))
    empty = AllOnRows(np.zeros((0, d_in)), np.zeros(0), (), np.zeros(0), 0, 0, 0)
    n_keys = min(n_keys, d0)
    D = np.linalg.qr(rng.normal(size=(d0, n_keys)))[0].T  # (k, d0) orthonormal
    n_grid = int(cfg.grid_per_neuron * width * 2) + 16
    clusters: list[_Cluster] = []
    K = np.zeros((1024, n_keys))  # each cluster's key (its first member's), one per row
    rows: list[_Row] = []
    lines: list[LineKinks] = []
    lengths: list[float] = []
    facets = np.zeros(0, dtype=int)
    n_kinks = measured = 0
    stall = gained = n_tips = tips_idle = 0
    few = max(1, width // 100)  # rows a round of chords adds before tips take over
    max_lines = cfg.max_search_lines * 8
    reason = ""
    # the layer's map where the region holds (its rows are the cell's, an off neuron's negated)
    A_last = all_on_map(layers)[0][-d_in:] if region is None else region.A[-d_in:]
    if on is not None:
        A_last = A_last[np.asarray(on, dtype=bool)]
    if np.linalg.matrix_rank(A_last) < A_last.shape[0]:
        return dataclasses.replace(
            empty, reason=f"layer {len(layers)} has {A_last.shape[0]} neurons on but controls fewer directions there")
    if region is None:
        region = all_on_region(layers, 3.0 * cfg.input_scale)
    if region is None:
        return dataclasses.replace(empty, reason=NO_REGION)
    corners: FloatArray | None = None  # the facet vertices, once tips begin
    Hc = np.zeros((0, d_in))  # the layer's inputs there
    todo = np.zeros(0, dtype=bool)  # those no tip has started from yet
    n_seed = 0 if seed is None else int(seed[0].shape[0])
    while len(rows) < width - n_seed:
        if corners is None and (len(lines) >= max_lines or stall >= 3 or (len(lines) > per_round and gained <= few)):
            # chords now add rows slowly: the rest are switched only in small corners (tip_lines)
            if not use_tips:
                break
            corners = facet_vertices(region, d_in, executor)
            _, Hc = pfx.forward(layers, corners)
            todo = np.ones(corners.shape[0], dtype=bool)
        tips = corners is not None
        if corners is not None:
            kn = _known(seed, rows)
            if not todo.any() or kn is None or tips_idle >= max_lines:
                break
            # the likeliest corners first, by the rows known so far (corner_scores)
            score = corner_scores(Hc @ kn[0].T + kn[1])
            pick = np.flatnonzero(todo)[np.argsort(-score[todo], kind="stable")[: max(1, per_round // 2)]]
            todo[pick] = False
            al = tip_lines(region, corners[pick], scale, partners=corners[(pick + 1) % corners.shape[0]])
        else:
            # each neuron of the layer before ends one facet chord while it can (active_lines)
            n_ends = 2 * (per_round // 2)  # two ends for each facet chord (every other chord)
            if facets.size < n_ends:
                facets = np.concatenate([facets, rng.permutation(d_in)])
            al = active_lines(region, per_round, scale, rng, d_last=d_in, facets=facets[:n_ends].tolist(),
                              executor=executor)
            facets = facets[n_ends:]
        if al.x0.shape[0] == 0:
            if tips:
                continue
            reason = al.reason
            break
        known = _known(seed, rows)
        cands: list[Candidate] = []
        for x0, u, half in zip(al.x0, al.u, al.half, strict=True):
            got, ci = find_candidates(query, layers, d0, 0, n_grid, cfg, rng, rel_tol, lines_given=(x0[None], u[None]),
                                      t_range=float(half), known=known)
            cands += [Candidate(len(lines), c.x, c.left, c.right, c.half_left, c.half_right, c.unorm) for c in got]
            lines += ci.lines_found
            # a tip's length does not count (_apart): two tips share their vertex
            lengths += [np.inf if tips else (ln.t_hi - ln.t_lo) * float(np.linalg.norm(ln.u))
                        for ln in ci.lines_found]
            n_kinks += ci.kinks
            n_tips += len(ci.lines_found) if tips else 0
        keys, _ = jump_keys(query, layers, cands, D, cfg.fd_rel_step)
        for c, key in zip(cands, keys, strict=True):
            if key is None:
                continue
            near = np.flatnonzero(1.0 - np.abs(K[: len(clusters)] @ key) <= KEY_TOL)
            if near.size:
                clusters[int(near[0])].members.append(c)
                continue
            if len(clusters) == K.shape[0]:
                K = np.concatenate([K, np.zeros_like(K)])
            K[len(clusters)] = key
            clusters.append(_Cluster([c]))
        before = len(rows)
        for cl in clusters:
            if cl.done or len({c.line for c in cl.members}) < 2:
                continue
            _, Hm = pfx.forward(layers, np.stack([c.x for c in cl.members]))
            if not _apart(cl.members, lengths, _switched(Hm, known)):
                continue
            cl.done = True
            row, n = _cluster_row(query, layers, d0, cl, lengths, known, cfg, rel_tol, executor)
            measured += n
            if row is not None:
                rows.append(row)
        if precise is not None and rows and (len(rows) >= min(SEED_PROBE, width - n_seed) or corners is not None):
            first = _as_rows(rows, len(lines), n_kinks, measured, n_tips)
            if not precise(first):
                log.info("all-on lines: check failed after %d rows; %s", len(rows), IMPRECISE)
                return dataclasses.replace(first, reason=IMPRECISE)
            precise = None
        gained = len(rows) - before
        stall = stall + 1 if gained == 0 else 0
        tips_idle = tips_idle + al.x0.shape[0] if tips and gained == 0 else 0
        log.debug("all-on lines: %d lines (%d tips), %d kinks, %d keys in %d clusters, %d rows", len(lines), n_tips,
                  n_kinks, sum(len(c.members) for c in clusters), len(clusters), len(rows))
    if not rows:
        return dataclasses.replace(empty, lines=len(lines), kinks=n_kinks, measured=measured, tips=n_tips,
                                   reason=reason or "no key was seen on two lines far apart")
    if precise is not None:  # the search ended before any round called the check
        first = _as_rows(rows, len(lines), n_kinks, measured, n_tips)
        if not precise(first):
            log.info("all-on lines: check failed at the end, %d rows; %s", len(rows), IMPRECISE)
            return dataclasses.replace(first, reason=IMPRECISE)
    # two clusters of one neuron (keys split by a spoiled probe) give one row twice: keep the first
    U = np.stack([np.append(r.w, r.b) for r in rows])
    U /= np.linalg.norm(U, axis=1, keepdims=True)
    same = np.abs(U @ U.T) >= 1.0 - PLANE_TOL
    rows = [r for j, r in enumerate(rows) if not same[j, :j].any()]
    W = np.stack([r.w for r in rows])
    b = np.array([r.b for r in rows])
    hits, misses = crossing_hits(W, b, lines, layers, rel_tol=max(PLANE_TOL, 1e3 * rel_tol))
    ok = mostly_confirmed(hits, misses)
    if not ok.all():
        log.debug("all-on lines: %d row(s) predict kinks the lines do not show: dropped", int((~ok).sum()))
    keep = np.flatnonzero(ok)
    if len(keep) < width - n_seed and not reason:
        reason = f"{len(keep) + n_seed} of {width} rows confirmed after {len(lines)} lines"
    return AllOnRows(W[keep], b[keep], tuple(np.stack(rows[j].points) for j in keep),
                     np.array([rows[j].residual for j in keep]), len(lines), n_kinks, measured, reason, n_tips)


def corner_allowance(width: int) -> int:
    """How many rows an inner all-on layer of ``width`` may lack and still be kept
    (:func:`all_on_outcome`; attack-notes §3): one in a hundred, none below a hundred. The walks
    that would take the layer instead found no row behind 256-wide CIFAR layers, and a layer kept
    short is read on by the next layer's chords, which need the region."""
    return width // 100


def silent_columns(col: FloatArray, judged: np.ndarray | None = None) -> np.ndarray:
    """The layer-input coordinates (of those ``judged``, all by default) whose column size ``col`` is
    at most 1e-3 of the upper tenth of the judged ones: no row weights them, up to the rows' error.
    Against the upper tenth rather than the median: a column stays real when up to nine in ten are
    zero (the pipeline flips up to half of the layer)."""
    ok = np.ones(col.shape, dtype=bool) if judged is None else np.asarray(judged, dtype=bool)
    return np.flatnonzero(ok & (col <= 1e-3 * float(np.quantile(col[ok], 0.9))))


def all_on_outcome(
    query: QueryFn,
    layers: Sequence[pfx.Layer],
    width: int,
    d0: int,
    is_last: bool,
    cfg: ExtractionConfig,
    rng: np.random.Generator,
    rel_tol: float,
    executor: Executor | None = None,
) -> tuple[LayerOutcome | None, str, np.ndarray]:
    """The layer behind ``layers`` from :func:`all_on_rows`, refined, with its signs
    (:func:`relux.attack.deep.outcome_from_rows`); None, with the reason, when the region is missing,
    more rows are missing than :func:`corner_allowance` (neurons the chords seldom cross: the witness
    groups and walks, which look everywhere, then extract the layer; fewer are reported dead), or a
    layer-input coordinate has no weight in any row. That
    last case is the check of the layer before: where a neuron of it whose sign is wrong is believed
    on, it is off, so every measured row gets exactly zero weight on it. The third value lists those
    neurons (empty otherwise). Behind a layer at least ``cfg.pattern_min_width`` wide, the first rows
    are checked (``all_on_rows(precise=...)``): when fewer than half of the first
    :data:`SEED_PROBE` refine, the region is too thin and the layer is read in pattern regions
    (:func:`_with_pattern_rows`), as it is when too many rows are missing."""
    from relux.attack.deep import outcome_from_rows

    none = np.zeros(0, dtype=int)
    seeds: list[tuple[FloatArray, FloatArray, tuple[FloatArray, ...], FloatArray]] = []

    def precise(first: AllOnRows) -> bool:
        # one polish each of the first SEED_PROBE rows (_precise_seeds), on a copy of the stream so that
        # a region that passes gives the rows it gave before; the queries count
        k = min(SEED_PROBE, first.W.shape[0])
        probe = dataclasses.replace(first, W=first.W[:k], b=first.b[:k], points=first.points[:k],
                                    residual=first.residual[:k])
        own = copy.deepcopy(rng)
        seeds.append(_precise_seeds(query, layers, probe, d0, cfg, own))
        ok = bool(2 * seeds[-1][0].shape[0] >= k)
        if not ok:  # what follows draws on after the check's draws
            rng.bit_generator.state = own.bit_generator.state
        return ok

    # Behind a layer wide enough for pattern regions, the first rows are checked: behind the CIFAR-scale
    # unitary victim's layers 1-3 (all-on depth 0.008) none of the first 16 refined, and the 247 rows
    # the region gave in 19 minutes were 1e-4 to 1e-2 off
    wide = layers[-1][0].shape[0] >= cfg.pattern_min_width
    ao = all_on_rows(query, layers, width, d0, cfg, rng, rel_tol, executor=executor, precise=precise if wide else None)
    n = ao.W.shape[0]
    log.info("layer %d: %d/%d rows from %d all-on lines (%d of them tips; %d kinks, %d measured)%s", len(layers) + 1,
             n, width, ao.lines, ao.tips, ao.kinks, ao.measured, f"; {ao.reason}" if ao.reason else "")
    if ao.reason == IMPRECISE:
        return _with_pattern_rows(query, layers, ao, width, d0, is_last, cfg, rng, rel_tol, executor, seeds[-1])
    if n < max(1, width // 2):
        return None, ao.reason, none
    # A wrong-sign neuron's column is zero up to the rows' error (1e-4 at most, PLANE_TOL's note, and
    # about 1e-6 typically); the columns of a random or trained layer are within a factor of ten or
    # so of their median. A genuinely weak column flipped by mistake is then off where it is believed
    # on, its column zero at the retry, and the retry fails, so the flip is not kept.
    zero = silent_columns(np.linalg.norm(ao.W, axis=0))
    if zero.size:
        return None, (f"layer {len(layers)} neuron(s) {zero.tolist()} have no weight in any row: wrong signs, "
                      "or neurons off where they were believed on"), zero
    if n > width:
        # rows of deeper neurons kept (two of their kinks agreed in key and plane): which ones is not known
        return None, f"{n} rows for a layer of {width}: some are not the layer's", none
    # The last hidden layer is never kept short: no chords come after it, and the witness groups and
    # walks that take it look everywhere.
    if width - n > (0 if is_last else corner_allowance(width)):
        if layers[-1][0].shape[0] < cfg.pattern_min_width:
            # behind narrow layers pieces share too few weights to join (the walks take the layer)
            return None, ao.reason or f"{n} rows for a layer of {width}", none
        return _with_pattern_rows(query, layers, ao, width, d0, is_last, cfg, rng, rel_tol, executor)
    if n < width:
        # Likely neurons switched only in corners of the region that no chord or tip reaches (CIFAR
        # unitary layer 3 neuron 193: off at the centre and at all 512 facet vertices, on at 2% of
        # inputs elsewhere), off in most of the region where the next layer's chords run. The layer goes
        # on without them, reported dead; the self-check sees them where they act.
        log.info("layer %d: %d row(s) not confirmed on the all-on lines: the layer goes on without them",
                 len(layers) + 1, width - n)
    out = outcome_from_rows(query, layers, ao.W, ao.b, ao.points, ao.residual, width, d0, is_last, cfg, rng,
                            "all-on lines", rel_tol=rel_tol, executor=executor)
    return dataclasses.replace(out, witnesses=ao.kinks, lines=ao.lines), "", none


def _with_pattern_rows(
    query: QueryFn,
    layers: Sequence[pfx.Layer],
    ao: AllOnRows,
    width: int,
    d0: int,
    is_last: bool,
    cfg: ExtractionConfig,
    rng: np.random.Generator,
    rel_tol: float,
    executor: Executor | None = None,
    seed: tuple[FloatArray, FloatArray, tuple[FloatArray, ...], FloatArray] | None = None,
) -> tuple[LayerOutcome | None, str, np.ndarray]:
    """The layer from the all-on rows ``ao``, too few or too imprecise, and the rows of pattern regions
    where about half the layer before is on (:func:`relux.attack.pattern_layer.pattern_rows`, seeded
    with those of ``ao``'s rows that refine, :func:`_precise_seeds`, or ``seed`` when given, so that
    their kinks there cost nothing).
    Behind the CIFAR-scale unitary victim's layers 1-3, nine layer-4 neurons cross the all-on region
    (depth 0.008) only in corners no chord or tip reaches, but cross every random pattern region
    tried (depth about 0.05 with layers 1-2 on, 1.0 with layer 1 on). Only behind a layer at least
    ``cfg.pattern_min_width`` wide (the caller returns the layer to the walks otherwise). None, with the
    reason, when the rows are still too few or too many, a neuron of the layer before has no weight
    in the rows that saw it on (:func:`relux.attack.pattern_layer.silent_in_pieces`; the third value
    lists them), or an inner layer's weight was neither seen nor completed (the walks then take the
    layer)."""
    from relux.attack.deep import outcome_from_rows
    from relux.attack.pattern_layer import pattern_rows, silent_in_pieces, unseen_weights

    none = np.zeros(0, dtype=int)
    if seed is None:
        seed = _precise_seeds(query, layers, ao, d0, cfg, rng)
    log.info("layer %d: %d all-on rows refined as seeds for the pattern regions (of %d found; after 16 tried with "
             "fewer than half refined, no more are tried)", len(layers) + 1,
             seed[0].shape[0], ao.W.shape[0])
    pr = pattern_rows(query, layers, width, d0, cfg, rng, rel_tol, executor=executor,
                      seed=seed if seed[0].shape[0] else None)
    n = pr.W.shape[0]
    log.info("layer %d: %d/%d rows with %d pattern regions (%d lines, %d kinks, %d measured; %d weights unseen)",
             len(layers) + 1, n, width, pr.regions, pr.lines, pr.kinks, pr.measured, int((~pr.seen).sum()))
    zero = silent_in_pieces(pr)
    if zero.size:
        return None, (f"layer {len(layers)} neuron(s) {zero.tolist()} have no weight in any row that saw them on: "
                      "wrong signs, or neurons off where they were believed on"), zero
    if n > width:
        return None, f"{n} rows for a layer of {width} after {pr.regions} pattern regions", none
    if width - n > (0 if is_last else corner_allowance(width)):
        return None, f"{ao.reason}; {n} rows after {pr.regions} pattern regions", none
    out = outcome_from_rows(query, layers, pr.W, pr.b, pr.points, pr.residual, width, d0, is_last, cfg, rng,
                            "all-on lines and pattern regions", coverage=pr.seen, rel_tol=rel_tol,
                            executor=executor, refined=pr.from_seed)
    why = unseen_weights(out.coverage, is_last)
    if why:
        return None, why, none
    return dataclasses.replace(out, witnesses=ao.kinks + pr.kinks, lines=ao.lines + pr.lines), "", none


#: :func:`_precise_seeds` stops after this many rows when fewer than half of them refined.
SEED_PROBE = 16


def _precise_seeds(
    query: QueryFn, layers: Sequence[pfx.Layer], ao: AllOnRows, d0: int, cfg: ExtractionConfig,
    rng: np.random.Generator,
) -> tuple[FloatArray, FloatArray, tuple[FloatArray, ...], FloatArray]:
    """Those of the all-on rows that one polish on exact boundary points refines
    (:func:`relux.attack.polish.polish_unit`), unit norm, with their points and residuals. A seed must
    predict its kinks in the pattern regions to within their brackets, or its neuron is read again
    there as a new one. In a thin region the rows' finite differences are poor: behind the CIFAR-scale
    unitary victim's layers 1-3 (all-on depth 0.008) the layer-4 rows were 1e-4 to 1e-2 off in
    ``1 - |cos|``, and none refined. So after :data:`SEED_PROBE` rows with fewer than half refined,
    the rest are not tried (the regions read them instead)."""
    from relux.attack.polish import estimated_boundary_points, polish_unit

    spread = cfg.input_scale * float(np.sqrt(d0))
    keep: list[int] = []
    W, b, res = np.array(ao.W, dtype=float), np.array(ao.b, dtype=float), np.array(ao.residual, dtype=float)
    for j in range(W.shape[0]):
        if j >= SEED_PROBE and 2 * len(keep) < j:
            break
        P = ao.points[j]
        fresh = estimated_boundary_points(layers, W[j], float(b[j]), d0, cfg.input_scale, rng)
        pol = polish_unit(query, layers, W[j], float(b[j]), P[:8], d0, spread, rng, fresh)
        if pol.ok:
            W[j], b[j], res[j] = pol.w, pol.b, pol.residual
            keep.append(j)
    return W[keep], b[keep], tuple(ao.points[j] for j in keep), res[keep]
