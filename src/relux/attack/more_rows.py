"""Rows a layer's signed walks did not find, from witnesses (attack-notes §3, CM24 §3.1).

A neuron rarely switched (on at a few percent of inputs, or off at a few) is crossed by few search
lines, and a signed walk along its boundary stays where few neurons of the layer before switch, so it
rarely completes. Its witnesses still see, between them, every weight: each kink's partial signature
gives the row on the coordinates on there, and witnesses from different lines overlap. So once the
walks stop finding rows, search lines go on, every kink of a known row costs no more than its
location, and the unexplained kinks are unified into rows exactly as a layer's witnesses are
(:func:`relux.attack.deep.extract_layer`). A row is kept only when it is complete, confirmed by the
crossings it predicts on the search lines, and new.

A rare neuron's witnesses are few and mostly rank-deficient (more coordinates on than the space of
control), so they seldom form a group of full-rank signatures. A line through its small on (or off)
region crosses its boundary twice, though: two witnesses of one line that unify into one determined
row seed it, as does a group. Each seed is grown, when it appears, with every witness consistent
with it (:func:`relux.attack.unify.consistent_witnesses`, the unseen weights left free): the
neuron's witnesses from earlier lines join the pair of a later one. A grown row confirmed by its
crossings but still incomplete is completed along its boundary
(:func:`relux.attack.complete.complete_row`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from relux.attack import prefix as pfx
from relux.attack.complete import complete_row
from relux.attack.config import ExtractionConfig
from relux.attack.confirm import crossing_hits
from relux.attack.critical import LineKinks
from relux.attack.hyperplanes import hyperplane_distance
from relux.attack.screen import prescreen
from relux.attack.unify import ConstraintStack, Grouping, NeuronRow, grow_row, jumping_members, unify
from relux.attack.witnesses import Witness, find_candidates, measure_candidates
from relux.oracle.base import FloatArray, QueryFn
from relux.parallel import Executor

log = logging.getLogger(__name__)

#: how much shorter (and so finer-gridded) the second round of lines through the hints is than a search line
HINT_ZOOM = 64.0

#: lines through the hints per round (at most), how many of the hints (worst first) they go through, and how
#: many lines each hint gets when there are few: every line through a point of a small on-region crosses its
#: boundary twice there, and the rows found at one hint came from the first 8 lines (digits 64-40x4-10: 10 to
#: 64 witnesses on 32 lines through one or two hints, each neuron's from every line)
HINT_LINES = 32
HINT_POINTS = 8
HINT_LINES_EACH = 8


def hint_lines(hints: FloatArray | None, d0: int) -> int:
    """Lines per round through ``hints`` (:data:`HINT_LINES`, fewer for fewer hints); 0 without any."""
    n = 0 if hints is None or not hints.size else min(hints.reshape(-1, d0).shape[0], HINT_POINTS)
    return min(HINT_LINES, HINT_LINES_EACH * n)


@dataclass(frozen=True)
class MoreRows:
    """New rows (unit ``(w, b)``), the exact points of each (its witnesses), their unification
    residuals, and what the search took."""

    W: FloatArray
    b: FloatArray
    points: tuple[FloatArray, ...]
    residual: FloatArray
    coverage: np.ndarray  # per row, the layer-input coordinates its witnesses (or completion) saw on
    lines: int
    witnesses: int
    reason: str


def more_rows(
    query: QueryFn,
    layers: Sequence[pfx.Layer],
    W_known: FloatArray,
    b_known: FloatArray,
    width: int,
    d0: int,
    cfg: ExtractionConfig,
    rng: np.random.Generator,
    rel_tol: float,
    max_lines: int | None = None,
    stall_lines: int | None = None,
    executor: Executor | None = None,
    partial_ok: bool = False,
    hints: FloatArray | None = None,
    max_unseen: float = 0.1,
) -> MoreRows:
    """Up to ``width - len(W_known)`` rows of the layer behind ``layers`` that the known rows
    ``(W_known, b_known)`` lack, from witnesses on new search lines (see the module docstring). Stops
    when the layer is complete, after ``max_lines`` lines (default ``12 * cfg.max_search_lines``), or
    after ``stall_lines`` lines (default ``8 * cfg.max_search_lines``) without a new row. A neuron
    crossed by one line in forty needs a hundred lines or more for the three crossings that confirm
    its row. ``partial_ok`` (the last hidden layer, whose unseen weights the output fit can give):
    a confirmed row that completion leaves short of a few weights is kept, with its coverage.
    ``hints``: inputs where an earlier attempt's model was wrong (a neuron it lacked is likely on
    there); the first lines go through them, in random directions (:func:`hint_lines` per round, two
    rounds). ``max_unseen``:
    the largest share of a row's weights its witnesses may leave unseen for completion to be tried (a
    resumed search, whose rows' witnesses lie about a few hints, takes more)."""
    from relux.attack.deep import _build_rows

    need = width - W_known.shape[0]
    max_lines = 12 * cfg.max_search_lines if max_lines is None else max_lines
    stall_lines = 8 * cfg.max_search_lines if stall_lines is None else stall_lines
    x_hint = hints.reshape(-1, d0)[:HINT_POINTS] if hints is not None and hints.size else None
    if x_hint is not None:
        # hint_lines() lines through the first HINT_POINTS of them, at least four each (a check may see a rare
        # neuron on at one input only, among inputs where the model is wrong for other reasons): each line
        # through a point of a small on-region crosses its boundary
        x_hint = x_hint[np.arange(hint_lines(hints, d0)) % x_hint.shape[0]]
    hint_rounds = [cfg.line_range, cfg.line_range / HINT_ZOOM] if x_hint is not None else []
    # grid points for the kinks of this layer and the one before (later ones are found by bisection)
    n_grid = int(cfg.grid_per_neuron * (layers[-1][0].shape[0] + width)) + 16
    nrm = np.linalg.norm(np.concatenate([W_known, b_known[:, None]], axis=1), axis=1)
    kW, kb = W_known / nrm[:, None], b_known / nrm
    witnesses: list[Witness] = []
    lines: list[LineKinks] = []
    grouping = Grouping()
    found: list[NeuronRow] = []
    seeds = _Seeds()
    used = last_new = 0
    per_round = 4
    reason = ""
    spread = cfg.input_scale * float(np.sqrt(d0))
    while len(found) < need:
        if used >= max_lines:
            reason = f"{len(found)}/{need} new rows after {used} lines"
            break
        if used - last_new >= stall_lines:
            reason = f"no new row in {used - last_new} lines"
            break
        known = (np.concatenate([kW, *[r.w[None, :] for r in found]]), np.append(kb, [r.b for r in found]))
        given: tuple[FloatArray, FloatArray] | None = None
        t_range: float | None = None
        if hint_rounds and x_hint is not None:
            # through the hints: full lines, then short ones around them (HINT_ZOOM times finer a grid: a
            # neuron on only in a small region about a hint switches between two grid points of a full line)
            given, t_range = (x_hint, rng.normal(size=x_hint.shape)), hint_rounds.pop(0)
        cands, info = find_candidates(query, layers, d0, per_round, n_grid, cfg, rng, rel_tol, lines_given=given,
                                      known=known, t_range=t_range)
        # kinks of deeper neurons set aside before their partial signatures are measured
        verdict = prescreen(query, layers, [(w, float(c), w[:0], 0.0) for w, c in zip(*known, strict=True)], cands,
                            spread, rel_tol)
        cands = [cd for cd, ok in zip(cands, verdict, strict=True) if ok]
        new, _, _ = measure_candidates(query, layers, d0, cands, cfg, used, executor=executor)
        used += per_round if given is None else given[0].shape[0]
        first_new = len(witnesses)
        witnesses += new
        lines += info.lines_found
        if len(witnesses) < 2:
            continue
        keys = np.concatenate([known[0], known[1][:, None]], axis=1)
        # groups seed rows too (random triples would add little to the pairs on one line)
        rows, _ = _build_rows(witnesses, [], lines, layers, rng, width, triples=False, grouping=grouping)
        seeds.add(witnesses, rows, first_new, keys)
        for r in seeds.ready(query, layers, witnesses, lines, keys, d0, n_grid, cfg, rel_tol, partial_ok,
                             max_unseen):
            if _known(r, keys):  # another seed of a row found in this round
                continue
            found.append(r)
            keys = np.concatenate([keys, np.append(r.w, r.b)[None, :]])
            last_new = used
            hits, misses = crossing_hits(r.w[None, :], np.array([r.b]), lines, layers, coverage=r.coverage[None, :])
            log.info("more rows: a new row from %d witnesses after %d lines (%d/%d; its crossings on the lines: "
                     "%d found, %d missed)", len(r.members), used, len(found), need, int(hits[0]), int(misses[0]))
            if len(found) >= need:
                break
    W = np.stack([r.w for r in found]) if found else np.zeros((0, kW.shape[1]))
    b = np.array([r.b for r in found], dtype=float)
    pts = tuple(np.stack([witnesses[i].x for i in r.members]) for r in found)
    cov = np.stack([r.coverage for r in found]) if found else np.zeros((0, kW.shape[1]), dtype=bool)
    return MoreRows(W, b, pts, np.array([r.residual for r in found], dtype=float), cov, used, len(witnesses),
                    reason)


def _known(r: NeuronRow, keys: FloatArray) -> bool:
    """Is ``r`` the hyperplane of one of the unit rows ``keys`` (to 1e-4)?"""
    return float(np.min(hyperplane_distance(np.append(r.w, r.b), keys))) < 1e-4


def _determined(r: NeuronRow) -> bool:
    """The witnesses agree on one row (to 1e-8, the unification's tolerance) and fix it (gap)."""
    return r.residual <= 1e-8 and r.gap >= 1e3


class _Seeds:
    """Rows grown from seeds (the module docstring): ``rows`` by seed, each grown once when it is
    added and judged once (``judged``), so that nothing is scored or completed twice; a neuron whose
    row was judged too early comes back through a later pair or group."""

    def __init__(self) -> None:
        self.rows: dict[tuple[int, ...], NeuronRow] = {}
        self.judged: dict[tuple[int, ...], tuple[int, ...]] = {}  # seed -> members when last judged
        self.stack: ConstraintStack | None = None  # every witness's constraint rows, for consistency tests

    def add(self, witnesses: Sequence[Witness], group_rows: Sequence[NeuronRow], first_new: int,
            keys: FloatArray) -> None:
        """Seeds from the groups' rows and from the new witnesses' lines (pairs), each grown with every
        witness; none on a row of ``keys``."""
        if self.stack is None:
            self.stack = ConstraintStack.of(witnesses)
        else:
            self.stack.extend(witnesses[self.stack.n_rows.size:])
        cands = [r for r in group_rows if len(r.members) >= 2]
        by_line: dict[int, list[int]] = {}
        for i, wt in enumerate(witnesses):
            by_line.setdefault(wt.line, []).append(i)
        for i in range(first_new, len(witnesses)):
            cands += [unify(witnesses, [j, i]) for j in by_line[witnesses[i].line] if j < i]
        for r in cands:
            if r.members in self.rows or not _determined(r) or _known(r, keys):
                continue
            g = grow_row(witnesses, r, range(len(witnesses)), stack=self.stack)
            self.rows[r.members] = g if _determined(g) else r

    def ready(
        self,
        query: QueryFn,
        layers: Sequence[pfx.Layer],
        witnesses: Sequence[Witness],
        lines: Sequence[LineKinks],
        keys: FloatArray,
        d0: int,
        n_grid: int,
        cfg: ExtractionConfig,
        rel_tol: float,
        partial_ok: bool = False,
        max_unseen: float = 0.1,
    ) -> list[NeuronRow]:
        """Grown rows of three witnesses or more, not judged with these members before, that are
        complete (or completed along their boundary; with ``partial_ok``, as far as it went) and
        confirmed by three crossings or more."""
        from relux.attack.deep import _score_rows

        out: list[NeuronRow] = []
        for key, g in self.rows.items():
            if len(g.members) < 3 or self.judged.get(key) == g.members:
                continue
            self.judged[key] = g.members
            if _known(g, keys):
                continue
            if not g.complete:
                # Completion costs queries: only for rows that lack a few weights (a deeper neuron's
                # witnesses, fitted in one region, leave many unseen) and that their crossings confirm
                # already; confirmed again once completed.
                if int((~g.coverage).sum()) > max(2, int(max_unseen * g.coverage.size)):
                    continue
                if int(_score_rows([g], lines, layers)[0][0]) < 3:
                    continue
                anchors = np.stack([witnesses[i].x for i in g.members[:8]])
                c = complete_row(query, layers, g.w, g.b, g.coverage, anchors, d0,
                                 cfg.input_scale * float(np.sqrt(d0)), n_grid, rel_tol, max_anchors=8)
                if not c.coverage.all():
                    log.debug("more rows: a row of %d witnesses not completed: %s", len(g.members), c.reasons)
                    if not partial_ok:
                        continue
                n = float(np.linalg.norm(np.append(c.w, c.b)))
                g = dataclasses.replace(g, w=c.w / n, b=c.b / n, coverage=c.coverage)
            # three witnesses must see the row jump: one with a zero jump fits it whatever it measured
            if int(_score_rows([g], lines, layers)[0][0]) >= 3 and jumping_members(witnesses, g) >= 3:
                out.append(g)
        return out
