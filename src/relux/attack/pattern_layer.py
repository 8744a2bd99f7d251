"""A hidden layer read in regions where the layer before follows a fixed pattern (attack-notes §3,
"space of control"; CM24 §3.2 on pieced-together signatures).

Behind some layers no input has every known neuron on: behind the trained CIFAR-scale victim's first
two layers, at most about 200 of the 256 layer-2 neurons are on together, and 50 to 90 at random
points where layer 1 is on. Then no single witness shows a whole row. But where the earlier layers
are all on and the last known layer follows one pattern, the prefix is still one affine map, and a
witness there shows the row on the neurons that are on. Such a region is convex too, so chords and
keys work in it as in the all-on region (:func:`relux.attack.all_on_layer.all_on_rows`).

A region is chosen by linear programs (no queries): the neurons of the layer before that the rows
seen so far lack the weights of most often come first, and are asked to be on, block by block, while
a ball of ``depth_frac`` of the depth of the earlier layers' all-on region still fits where they are
all on. Deep regions are crossed by more next-layer neurons; regions with more neurons on show more
of each row. The rows of each region are matched with those of earlier regions on the weights both
saw (and the bias, which every region sees), scaled to agree there, and merged. Weights no region
showed are read at kinks in cells where they are on (:mod:`relux.attack.cell_fill`), and any still
lacked along the row's boundary (:func:`relux.attack.complete.complete_row`, through
:func:`relux.attack.deep.outcome_from_rows`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from scipy.optimize import linprog

from relux.attack import prefix as pfx
from relux.attack.active_lines import (
    cell_constraints,
    cell_map,
    cell_masks,
    largest_ball,
    pattern_region,
    region_margin,
    vertex,
)
from relux.attack.all_on_layer import all_on_rows, corner_allowance, silent_columns
from relux.attack.config import ExtractionConfig
from relux.oracle.base import FloatArray, QueryFn
from relux.parallel import Executor

if TYPE_CHECKING:
    from relux.attack.deep import LayerOutcome

log = logging.getLogger(__name__)

#: Two partial rows are one neuron's when they agree to this (``1 - |cos|`` of the weights both saw,
#: with the bias) on at least ``MIN_SHARED`` shared weights. Behind the trained CIFAR-scale victim's
#: layers 1-2, 251 layer-3 pieces were within 2e-9 of their true rows (5e-13 at the median). Two
#: unrelated rows sharing five dimensions come within an angle of ``sqrt(2 MATCH_TOL)`` = 4.5e-3 with
#: a chance of about ``(4.5e-3)^4`` = 4e-10; a 12-region run compares about 1e6 pairs.
MATCH_TOL = 1e-5
MIN_SHARED = 4
#: A neuron of the layer before is judged for a wrong sign (:func:`pattern_outcome`) when at least
#: this many rows saw it on: too few may all have a small weight on it by chance.
MIN_JUDGED = 8
#: A piece too small to join (:func:`_without_fragments`) is a whole row's when its kinks lie this close
#: (relative) to that row's boundary: pieced rows are within about 1e-8 of their true rows (session 29),
#: another neuron's kinks are O(1) off.
FRAGMENT_TOL = 1e-6
#: Neurons asked to be on per linear program (:func:`choose_pattern`), at most an eighth of those asked
#: (so that the order still matters behind narrow layers).
BLOCK = 32
#: Random points :func:`random_pattern` tries before it gives up.
RANDOM_TRIES = 8
#: A region with the lacked weights asked on (:func:`_lacked_on`) is kept when it is at least this
#: fraction as deep as the random cell it was chosen in.
LACKED_DEPTH = 0.125
#: With all but ``short`` rows found (:func:`pattern_rows`), regions in a row that add no row before the
#: rows are filled in cells: the missing rows are likely of corner neurons that no region shows.
STALE = 3


@dataclass(frozen=True)
class Pattern:
    """A pattern of the last known layer (``on``), the region where it holds and the earlier layers are
    all on, and the depth of the point that chose it (the radius of a ball where ``wanted`` are on)."""

    on: np.ndarray
    depth: float
    wanted: int
    before: tuple[np.ndarray, ...] | None = None  # the patterns of the layers before the last (None: all on)

    def key(self) -> bytes:
        """The patterns of every layer, as bytes (a region read before gives the same rows again)."""
        return b"".join(m.tobytes() for m in (*(self.before or ()), self.on))


def _earlier_region(
    layers: Sequence[pfx.Layer], box: float, before: Sequence[np.ndarray] | None = None,
) -> tuple[FloatArray, FloatArray, FloatArray, int, float, FloatArray] | None:
    """Every known pre-activation as an affine map where the layers before the last are all on, or
    follow ``before``, and the last is all on (:func:`relux.attack.active_lines.cell_constraints`: an
    off neuron's row negated; multiplying by ones leaves the all-on map exact), with the margins, the
    number of rows of the layers before the last, and the depth and centre of the region where those
    hold; None when that region is empty."""
    A, c = cell_constraints(layers, cell_masks(layers, None, before))
    margin = region_margin(A, c, box)
    last = A.shape[0] - layers[-1][0].shape[0]
    r0, centre = largest_ball(A[:last], c[:last], margin[:last], box)
    if centre is None or r0 <= 0.0:
        return None
    return A, c, margin, last, r0, centre


def _most_on(
    A: FloatArray, c: FloatArray, margin: FloatArray, box: float, need: float, hard: np.ndarray, soft: np.ndarray,
) -> tuple[np.ndarray, FloatArray] | None:
    """One linear program: a point where every row ``hard`` of ``A x + c ≥ margin`` holds with a ball of
    radius ``need`` around it (inside the box), and as many rows ``soft`` as it can, softly: it
    maximises the sum over them of ``min(need, distance to the row's boundary)`` (signed). Returns which
    ``soft`` rows hold with that ball, and the point; None when the hard rows leave no such ball."""
    d = A.shape[1]
    nrm = np.maximum(np.linalg.norm(A, axis=1), np.finfo(float).tiny)
    Ah, As = A[hard], A[soft]
    k = As.shape[0]
    # variables: x (d), t (k); t_j <= (A_j x + c_j - m_j) / |A_j|, t_j <= need
    A_ub = np.block([
        [-Ah, np.zeros((Ah.shape[0], k))],
        [-As / nrm[soft][:, None], np.eye(k)],
        [np.eye(d), np.zeros((d, k))],
        [-np.eye(d), np.zeros((d, k))],
    ])
    b_ub = np.concatenate([c[hard] - margin[hard] - need * nrm[hard], (c[soft] - margin[soft]) / nrm[soft],
                           np.full(2 * d, box - need)])
    res = linprog(np.concatenate([np.zeros(d), -np.ones(k)]), A_ub=A_ub, b_ub=b_ub,
                  bounds=[(None, None)] * d + [(None, need)] * k, method="highs")
    if res.status != 0:
        return None
    x = np.asarray(res.x[:d], dtype=float)
    held = (A[soft] @ x + c[soft] - margin[soft]) >= need * (1.0 - 1e-9) * nrm[soft]
    return held, x


def choose_pattern(
    layers: Sequence[pfx.Layer], box: float, order: Sequence[int], depth_frac: float = 0.1,
    before: Sequence[np.ndarray] | None = None,
    early: tuple[FloatArray, FloatArray, FloatArray, int, float, FloatArray] | None = None,
    limit: int | None = None,
    block: int | None = None,
) -> Pattern | None:
    """A pattern of the last known layer with the neurons ``order`` asked to be on, block by block of
    ``block`` (an eighth of those asked, at most ``BLOCK``, by default) in that order, one linear program each
    (:func:`_most_on`, which maximises the sum over the block of each neuron's signed distance into
    its on side, capped at the ball's radius): those of a block it puts on with that ball join the
    ones already on, where a ball of ``depth_frac`` times the depth of the region where the earlier
    layers are all on still fits with all of them and the earlier layers on (module docstring). The
    pattern is the one at that ball's centre. None when the earlier layers' region is empty.
    ``before``: the earlier layers follow these patterns instead of being all on. ``early``: that
    region as :func:`_earlier_region` gives it for ``before``, when the caller has it (one linear
    program saved per call). ``limit``: the blocks stop before the one that would leave more than
    this many neurons on (beyond the rank of the earlier layers' map, they would not control as many
    directions as they are; the first block is always taken). ``block``: neurons per linear program
    (default: an eighth of those asked, at most ``BLOCK``)."""
    early = _earlier_region(layers, box, before) if early is None else early
    if early is None:
        return None
    A, c, margin, last, r0, x = early
    need = depth_frac * r0
    hard = np.zeros(A.shape[0], dtype=bool)
    hard[:last] = True
    todo = [int(j) for j in order]
    block = max(1, min(BLOCK, len(todo) // 8)) if block is None else block
    for k in range(0, len(todo), block):
        soft = np.zeros(A.shape[0], dtype=bool)
        soft[[last + j for j in todo[k : k + block]]] = True
        got = _most_on(A, c, margin, box, need, hard, soft)
        if got is None:
            break
        held, y = got
        if limit is not None and k and int(((A[last:] @ y + c[last:]) > 0).sum()) > limit:
            break
        x = y
        hard[np.flatnonzero(soft)[held]] = True
    on = (A[last:] @ x + c[last:]) > 0
    return Pattern(on, need, int(hard[last:].sum()), None if before is None else tuple(before))


def _controls(layers: Sequence[pfx.Layer], pat: Pattern) -> bool:
    """Whether the last layer's neurons on in ``pat`` control as many directions as they are there."""
    A_last = cell_map(layers, cell_masks(layers, pat.on, pat.before))[0][-pat.on.size:][pat.on]
    return bool(np.linalg.matrix_rank(A_last) == A_last.shape[0])


def random_pattern(
    layers: Sequence[pfx.Layer], box: float, rng: np.random.Generator, tries: int = RANDOM_TRIES,
) -> Pattern | None:
    """The patterns of the known layers at a random point of the region where the first ``k`` layers
    are all on: between its centre and a vertex of a random objective, 30% to 90% of the way out (a
    linear program each, no queries). ``k`` is the smallest for which the last layer's neurons on
    there control as many directions as they are (else a row's weights on them are not determined),
    or else every layer but the last (whose rank :func:`relux.attack.all_on_layer.all_on_rows`
    checks); the layers between follow the point's patterns. Behind the CIFAR-scale unitary victim's layers
    1-3, such a region with layer 1 on is about 1.0 deep, with layers 1-2 on 0.05, and the region
    where all three are on 0.008. Up to ``tries`` random points; None when none gives such a region.
    (Behind unitary layers 1-5 no first layers but 1-3 are all on together, and a random point's
    layer-5 pattern controls its directions about half the time: one try alone found the second
    layer-6 region none.)"""
    for _ in range(max(1, tries)):
        pat = _random_pattern_once(layers, box, rng)
        if pat is not None:
            return pat
    return None


def _random_pattern_once(layers: Sequence[pfx.Layer], box: float, rng: np.random.Generator) -> Pattern | None:
    """One random point of :func:`random_pattern`."""
    d = layers[0][0].shape[1]
    for k in range(min(1, len(layers) - 1), len(layers)):
        if k:
            base = pattern_region(layers[:k], box, None)
            if base is None:
                break
            centre = base.centre
            v = vertex(base.A, base.c, box, base.margin, np.asarray(rng.standard_normal(size=d)), start=centre)
        else:  # a single known layer: anywhere in the box
            centre = np.zeros(d)
            v = box * np.sign(np.asarray(rng.standard_normal(size=d)))
        if v is None:
            break
        x = centre + rng.uniform(0.3, 0.9) * (v - centre)
        Z, _ = pfx.forward(layers, x[None])
        masks = [z[0] > 0 for z in Z]
        if k == len(layers) - 1:
            return Pattern(masks[-1], 0.0, 0)
        pat = Pattern(masks[-1], 0.0, 0, tuple(masks[:-1]))
        if _controls(layers, pat):
            return pat
    return None


@dataclass
class _Entry:
    w: FloatArray
    b: float
    seen: np.ndarray  # the layer-input coordinates whose weights are known
    points: list[FloatArray]
    residual: float
    seed: bool = False  # given whole (pattern_rows' seed)


def _scale(e: _Entry, f: _Entry) -> float | None:
    """The factor that scales the partial row ``f`` onto ``e`` when the two are pieces of one neuron:
    they agree to ``MATCH_TOL`` on at least ``MIN_SHARED`` weights both saw, with the bias; else None."""
    both = e.seen & f.seen
    if both.sum() < MIN_SHARED:
        return None
    u = np.append(f.w[both], f.b)
    v = np.append(e.w[both], e.b)
    nu, nv = float(np.linalg.norm(u)), float(np.linalg.norm(v))
    if nu == 0.0 or nv == 0.0:
        return None
    cos = float(u @ v) / (nu * nv)
    return float(u @ v) / nu**2 if 1.0 - abs(cos) <= MATCH_TOL else None


def _add(entries: list[_Entry], f: _Entry) -> None:
    """Merge the partial row ``f`` into the first entry it is a piece of (scaled onto it, its weights
    filling those the entry lacks), or append it."""
    for e in entries:
        s = _scale(e, f)
        if s is None:
            continue
        fresh = f.seen & ~e.seen
        e.w[fresh] = s * f.w[fresh]
        e.seen |= fresh
        e.points += f.points
        if not e.seed:  # a seed's row, refined, is kept as it was
            e.residual = max(e.residual, f.residual)
        return
    entries.append(f)


def _lacking(entries: Sequence[_Entry]) -> int:
    """How many weights the entries lack in all."""
    return sum(int((~e.seen).sum()) for e in entries)


def _merged(entries: Sequence[_Entry]) -> list[_Entry]:
    """The entries with those that are pieces of one neuron merged (two pieces that shared too few
    weights may each share enough with a third that grew since)."""
    out: list[_Entry] = []
    for e in entries:
        _add(out, e)
    return out if len(out) == len(entries) else _merged(out)


def _lacked_on(
    layers: Sequence[pfx.Layer], box: float, cell: Pattern, lacked: Sequence[int], tries: int = 4,
) -> Pattern:
    """A pattern with the weights the partial rows lack most (``lacked``, most lacked first) asked to be
    on (:func:`choose_pattern`) inside ``cell``'s earlier patterns, when its region is at least
    ``LACKED_DEPTH`` as deep as the cell's; else with half as many asked, up to ``tries`` times; else
    ``cell`` itself.
    Behind the unitary victim's layers 1-3, after eight cells 200 layer-3 neurons were lacked by some
    row: asking all of them on gives the all-on region (0.008 deep), the top 16 to 128 regions 0.026
    to 0.033 deep, against 0.05 for a random cell."""
    base = pattern_region(layers, box, cell.on, cell.before)
    if base is None:
        return cell
    m = len(lacked)
    early = _earlier_region(layers, box, cell.before)  # the same for every try
    if early is None:
        return cell
    A, _, _, last, _, _ = early
    rank = int(np.linalg.matrix_rank(A[last:]))  # more neurons on than this control fewer directions
    for _ in range(tries):
        chosen = choose_pattern(layers, box, lacked[:m], before=cell.before, early=early, limit=rank)
        if chosen is not None and _controls(layers, chosen):
            reg = pattern_region(layers, box, chosen.on, chosen.before)
            if reg is not None and reg.depth >= LACKED_DEPTH * base.depth:
                return chosen
        if m <= 1:
            break
        m = (m + 1) // 2
    return cell


def _without_fragments(layers: Sequence[pfx.Layer], entries: Sequence[_Entry]) -> list[_Entry]:
    """The entries without pieces that saw fewer than ``MIN_SHARED`` weights (too few to join any
    other, :func:`_scale`) but at least two, that agree to ``MATCH_TOL`` with a whole row on those and
    the bias, and whose kinks lie on that row's boundary (to ``FRAGMENT_TOL``): a region with few
    neurons on gives such pieces of rows another region showed whole."""
    whole = [e for e in entries if e.seen.all()]

    def agrees(f: _Entry, e: _Entry) -> bool:
        u, v = np.append(f.w[f.seen], f.b), np.append(e.w[f.seen], e.b)
        nu, nv = float(np.linalg.norm(u)), float(np.linalg.norm(v))
        if not (nu > 0 and nv > 0 and 1.0 - abs(float(u @ v)) / (nu * nv) <= MATCH_TOL):
            return False
        _, H = pfx.forward(layers, np.concatenate(f.points))
        z = np.abs(H @ e.w + e.b) / (np.linalg.norm(H, axis=1) * float(np.linalg.norm(e.w)) + abs(e.b))
        return bool(np.all(z <= FRAGMENT_TOL))

    return [f for f in entries if f.seen.all() or not 2 <= f.seen.sum() < MIN_SHARED
            or not any(agrees(f, e) for e in whole)]


@dataclass(frozen=True)
class PatternRows:
    """Rows pieced together from pattern regions: weights (zero where unseen), biases, which weights
    were seen, the kinks each row was seen at, the largest relative misfit of those, and the cost."""

    W: FloatArray
    b: FloatArray
    seen: np.ndarray
    points: tuple[FloatArray, ...]
    residual: FloatArray
    regions: int
    lines: int
    kinks: int
    measured: int
    from_seed: np.ndarray  # which rows were given whole


def pattern_rows(
    query: QueryFn,
    layers: Sequence[pfx.Layer],
    width: int,
    d0: int,
    cfg: ExtractionConfig,
    rng: np.random.Generator,
    rel_tol: float,
    executor: Executor | None = None,
    max_regions: int | None = None,
    seed: tuple[FloatArray, FloatArray, Sequence[FloatArray], FloatArray] | None = None,
    short: int = 0,
) -> PatternRows:
    """Rows of the layer behind ``layers`` from chords of up to ``max_regions`` pattern regions
    (``cfg.pattern_max_regions`` when None; module docstring): until there are ``width`` rows (or
    all but ``short``, the corner neurons the layer may lack, and ``STALE`` regions in a row added no
    row) and the weights they lack would cost fewer queries to fill in cells where they are on
    (:func:`fill_cost`) than the last region took, or three regions in a row add no row and no
    weight (a pattern read before, or whose region is empty, counts as one). The weights still
    lacked are then read in those cells (:func:`_filled`); while some remain, regions go on (with
    those weights asked on) and the cells are tried again after each, within the same limits.
    (Session 35 filled once all but corner neurons were seen, whenever the fill cost fewer queries
    than more regions would at the last one's pace. At CIFAR scale the fill's linear programs, not
    its queries, set its time: behind unitary layers 1-3 it filled 256 partial layer-4 rows for over
    half an hour, where one more region, about four minutes, completed every row in session 35.)

    Unseeded behind more than two layers, each region also starts from such a random cell (see
    below), as the region where the earlier layers are all on is thin there.

    ``seed = (W, b, points, residual)``: whole rows already known, as from the all-on region, which
    some neurons cross only in small corners (:func:`relux.attack.all_on_layer.all_on_outcome`). They
    come first in the result. Their kinks cost no query. A region is at a random point
    (:func:`random_pattern`; where about half of the layers after the first are on, a region is far
    deeper than the all-on region, and such neurons cross it) while no row is partial, and then has
    the weights the partial rows lack most asked to be on, as many as keep that region at least
    ``LACKED_DEPTH`` as deep and no more than the earlier layers' map controls (:func:`_lacked_on`)."""
    d_in = layers[-1][0].shape[0]
    box = 3.0 * cfg.input_scale
    entries: list[_Entry] = []
    if seed is not None:
        entries = [_Entry(w.copy(), float(b), np.ones(d_in, dtype=bool), [P], float(r), seed=True)
                   for w, b, P, r in zip(seed[0], seed[1], seed[2], seed[3], strict=True)]
    lines = kinks = measured = regions = 0
    idle = stale = 0
    explore = False
    tried: set[bytes] = set()
    spent = [0]  # queries so far, to weigh a region against filling rows in cells

    def counted(X: FloatArray) -> FloatArray:
        spent[0] += int(X.shape[0])
        return query(X)

    for _ in range(cfg.pattern_max_regions if max_regions is None else max_regions):
        if explore:
            # the last region added no row: the neurons missing may switch only where fewer of the
            # layer before are on
            pat = random_pattern(layers, box, rng)
        else:
            # the weights the rows known so far lack, the most lacked first, ties at random
            lack = np.zeros(d_in) if not entries else np.stack([~e.seen for e in entries]).sum(axis=0).astype(float)
            order = np.lexsort((np.asarray(rng.random(size=d_in)), -lack))
            lacked = order[: int((lack > 0).sum())].tolist()
            # Unseeded behind two layers or fewer, regions are chosen as for the trained victim's layer
            # 3 (session 29); seeded, or behind more layers, each starts from a random cell, far deeper
            # than where the earlier layers are all on (random_pattern)
            cell = random_pattern(layers, box, rng) if seed is not None or len(layers) > 2 else None
            if cell is not None and not lacked:
                pat = cell
            elif cell is not None:
                # the weights lacked most asked to be on, inside that cell's earlier patterns (asked
                # all, the linear programs drove to the thin all-on region, where rows are imprecise)
                pat = _lacked_on(layers, box, cell, lacked)
            else:
                # the weights lacked most first (pieces must share weights to join)
                pat = choose_pattern(layers, box, order.tolist())
        for _ in range(4):
            if pat is None or pat.key() not in tried:
                break
            pat = random_pattern(layers, box, rng)  # a region read before gives the same rows again
        if pat is None:
            log.info("pattern regions: no region where the earlier layers are all on")
            break
        region = pattern_region(layers, box, pat.on, pat.before) if pat.key() not in tried else None
        if region is None:
            # read before, or empty (a neuron not asked to be on may lie on its boundary at the
            # chosen point): the next one at a random point
            idle, explore = idle + 1, True
            if idle >= 3:
                break
            continue
        whole = [e for e in entries if e.seen.all()] if seed is not None else []
        before_region = spent[0]
        ao = all_on_rows(counted, layers, width, d0, cfg, rng, rel_tol, executor=executor, region=region, on=pat.on,
                         use_tips=False,
                         seed=(np.stack([e.w for e in whole]), np.array([e.b for e in whole])) if whole else None)
        regions += 1
        tried.add(pat.key())
        lines, kinks, measured = lines + ao.lines, kinks + ao.kinks, measured + ao.measured
        n_before = len(entries)
        lack_before = _lacking(entries)
        for w, b, P, res in zip(ao.W, ao.b, ao.points, ao.residual, strict=True):
            _add(entries, _Entry(w.copy(), float(b), pat.on.copy(), [P], float(res)))
        entries = _merged(entries)
        full = sum(bool(e.seen.all()) for e in entries)
        # a new neuron, or a row that lacks fewer weights (two pieces joined lack fewer than apart)
        gained = len(entries) > n_before or _lacking(entries) < lack_before
        idle = 0 if gained else idle + 1
        stale = 0 if len(entries) > n_before else stale + 1
        log.info("pattern region %d: %d on, depth %.3g; %d rows there; %d rows in all, %d complete", regions,
                 int(pat.on.sum()), region.depth, ao.W.shape[0], len(entries), full)
        if log.isEnabledFor(logging.DEBUG) and entries:
            lacks = np.stack([~e.seen for e in entries]).sum(axis=0)
            log.debug("pattern regions: %d weights lacked (%d neurons lacked by some row; by a tenth of the rows "
                      "or more: %d; the most lacked by %d rows)", int(lacks.sum()), int((lacks > 0).sum()),
                      int((lacks >= 0.1 * len(entries)).sum()), int(lacks.max()))
        # every neuron seen (fragments of whole rows aside), and what the rows lack costs less to fill in
        # cells (_filled) than this region took
        real = _without_fragments(layers, entries)
        # a random cell looks for neurons no region showed: none once every row is there
        explore = len(entries) <= n_before and not explore and len(real) < width
        if idle >= 3:
            break
        enough = len(real) >= width or (short > 0 and len(real) >= width - short and stale >= STALE)
        if enough and fill_cost(layers, real, cfg) <= spent[0] - before_region:
            # fill them; rows the cells leave partial get one more region (their lacked weights asked on)
            entries, n_lines, n_measured = _filled(query, layers, real, d0, cfg, rng, rel_tol)
            lines, measured = lines + n_lines, measured + n_measured
            if len(entries) >= width - short and all(e.seen.all() for e in entries):
                break
    entries = _without_fragments(layers, entries)
    if any(not e.seen.all() for e in entries):
        entries, n_lines, n_measured = _filled(query, layers, entries, d0, cfg, rng, rel_tol)
        lines, measured = lines + n_lines, measured + n_measured
    if not entries:
        return PatternRows(np.zeros((0, d_in)), np.zeros(0), np.zeros((0, d_in), dtype=bool), (), np.zeros(0),
                           regions, lines, kinks, measured, np.zeros(0, dtype=bool))
    return PatternRows(np.stack([e.w for e in entries]), np.array([e.b for e in entries]),
                       np.stack([e.seen for e in entries]), tuple(np.concatenate(e.points) for e in entries),
                       np.array([e.residual for e in entries]), regions, lines, kinks, measured,
                       np.array([e.seed for e in entries], dtype=bool))


def fill_cost(layers: Sequence[pfx.Layer], entries: Sequence[_Entry], cfg: ExtractionConfig) -> int:
    """The queries filling the partial rows in cells would take (:func:`_filled`), estimated: per row
    a line for every three cells' worth of the weights it lacks (``3 ASKED_PER_CELL``; each cell has
    about half of those lacked on, besides those asked), at least one; per line a kink search
    (``cfg.grid_per_neuron`` points per known neuron) and four measurements of ``2 (d_in + 1)``
    queries. Behind the CIFAR-scale unitary victim's layers 1-3 (session 34), rows lacking 1 to 8
    weights took one line and 3,700 to 5,700 queries, rows lacking 45 to 82 three or four lines and
    12,000 to 17,400 (this gives 5,144 and 10,288 to 20,576)."""
    from relux.attack.cell_fill import ASKED_PER_CELL

    d_in = layers[-1][0].shape[0]
    per_line = int(cfg.grid_per_neuron * sum(W.shape[0] for W, _ in layers)) + 16 + 4 * 2 * (d_in + 1)
    n_lines = sum(-(-(int((~e.seen).sum()) + 1) // (3 * ASKED_PER_CELL)) for e in entries if not e.seen.all())
    return int(n_lines * per_line)


def _filled(
    query: QueryFn, layers: Sequence[pfx.Layer], entries: Sequence[_Entry], d0: int, cfg: ExtractionConfig,
    rng: np.random.Generator, rel_tol: float,
) -> tuple[list[_Entry], int, int]:
    """The entries with the weights each partial row lacks read in cells where they are on
    (:func:`relux.attack.cell_fill.fill_in_cells`; the whole rows' kinks set aside), then merged again
    (two pieces of one neuron filled apart now share weights), with the lines and measurements made.
    A row keeps the larger of its residual and its new kinks' (their distance from its plane). Pieces
    of fewer than ``MIN_SHARED`` weights are left as they are: no signature can be matched to them."""
    from relux.attack.cell_fill import fill_in_cells

    whole = [e for e in entries if e.seen.all()]
    known = (np.stack([e.w for e in whole]), np.array([e.b for e in whole])) if whole else None
    lines = measured = 0
    out: list[_Entry] = []
    for e in entries:
        if e.seen.all() or e.seen.sum() < MIN_SHARED:  # whole, or too small a piece to be recognised
            out.append(e)
            continue
        f = fill_in_cells(query, layers, e.w, e.b, e.seen, np.concatenate(e.points), d0, cfg, rng, rel_tol,
                          known=known)
        lines, measured = lines + f.lines, measured + f.measured
        log.debug("pattern regions: a row lacking %d weights lacks %d after the cells%s", int((~e.seen).sum()),
                  int((~f.seen).sum()), f" ({'; '.join(f.reasons)})" if f.reasons else "")
        out.append(dataclasses.replace(e, w=f.w, seen=f.seen, points=(e.points + [np.stack(f.points)]) if f.points
                                       else e.points, residual=max(e.residual, f.residual)))
    return _merged(out), lines, measured


def unseen_weights(coverage: np.ndarray, is_last: bool) -> str:
    """Why an inner layer whose rows came from pattern regions is not kept: some weight was neither
    seen nor completed (``coverage`` false there). Such a layer, a weight left at zero, is wrong, and
    the walks take it instead; the pipeline reads the last hidden layer's unseen weights from the
    output. Empty when the layer is kept."""
    unseen = int((~coverage).sum())
    if not unseen or is_last:
        return ""
    rows = int((~coverage).any(axis=1).sum())
    return f"{unseen} weights of {rows} rows neither seen in a pattern region nor completed"


def silent_in_pieces(pr: PatternRows) -> np.ndarray:
    """The neurons of the layer before that at least ``MIN_JUDGED`` of the rows saw on, and whose
    weights there are zero up to the rows' error (:func:`relux.attack.all_on_layer.silent_columns` on
    the root mean square of each column over the rows that saw it): likely wrong signs, off where
    they are believed on. Empty when there are none, or no rows."""
    if pr.W.shape[0] == 0:
        return np.zeros(0, dtype=int)
    U = pr.W / np.linalg.norm(np.concatenate([pr.W, pr.b[:, None]], axis=1), axis=1, keepdims=True)
    k = pr.seen.sum(axis=0)
    judged = k >= MIN_JUDGED
    if not judged.any():
        return np.zeros(0, dtype=int)
    return silent_columns(np.sqrt((U**2).sum(axis=0) / np.maximum(k, 1)), judged)


def pattern_outcome(
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
    """The layer behind ``layers`` from :func:`pattern_rows`, completed, refined and signed
    (:func:`relux.attack.deep.outcome_from_rows`), as
    :func:`relux.attack.all_on_layer.all_on_outcome` gives it from the all-on region: None, with the
    reason, when more rows than the layer's width were pieced together (pieces of one neuron that
    never met), more are missing than :func:`relux.attack.all_on_layer.corner_allowance` allows (none
    for the last hidden layer), some weight of an inner layer was neither seen nor completed, or a
    neuron of the layer before has no weight in any of the (at least ``MIN_JUDGED``) rows that saw
    it on. That neuron's sign is likely wrong: where it is believed on, it is off. The third value
    lists those neurons (empty otherwise)."""
    from relux.attack.deep import outcome_from_rows

    none = np.zeros(0, dtype=int)
    pr = pattern_rows(query, layers, width, d0, cfg, rng, rel_tol, executor=executor,
                      short=0 if is_last else corner_allowance(width))
    n = pr.W.shape[0]
    log.info("layer %d: %d/%d rows from %d pattern regions (%d lines, %d kinks, %d measured; %d weights unseen)",
             len(layers) + 1, n, width, pr.regions, pr.lines, pr.kinks, pr.measured, int((~pr.seen).sum()))
    if n == 0:
        return None, f"no row from {pr.regions} pattern regions", none
    zero = silent_in_pieces(pr)
    if zero.size:
        return None, (f"layer {len(layers)} neuron(s) {zero.tolist()} have no weight in any row that saw them "
                      "on: wrong signs, or neurons off where they were believed on"), zero
    if n > width:
        return None, f"{n} rows pieced together for a layer of {width}", none
    if width - n > (0 if is_last else corner_allowance(width)):
        return None, f"{n} rows for a layer of {width} from {pr.regions} pattern regions", none
    out = outcome_from_rows(query, layers, pr.W, pr.b, pr.points, pr.residual, width, d0, is_last, cfg, rng,
                            "pattern regions", coverage=pr.seen, rel_tol=rel_tol, executor=executor)
    why = unseen_weights(out.coverage, is_last)
    if why:
        return None, why, none
    return dataclasses.replace(out, witnesses=pr.kinks, lines=pr.lines), "", none
