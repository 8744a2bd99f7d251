"""Resuming a failed deep attempt (``ExtractionConfig.resumes``; attack-notes §3 on rarely active neurons).

A deep attempt whose self-check disagreed with ``f`` on a small share of its points has a model right
nearly everywhere: it lacks a neuron that is on only there (a wrong sign or a wrong row of an often
active neuron disagrees almost everywhere). Its complete hidden layers before the first incomplete one
are kept; so are the rows it found in that layer, which its model confirmed wherever it agreed with
``f``. The resumed attempt looks for the missing rows on search lines through the inputs where the
model disagreed (:func:`resumed_layer`: in the last hidden layer, witness groups by output direction
first, :func:`last_rows_at_hints`; then :func:`relux.attack.more_rows.more_rows` with ``hints``), then
the pipeline extracts the layers after it again.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from relux.attack import prefix as pfx
from relux.attack.carry import CarriedLayer
from relux.attack.config import ExtractionConfig
from relux.attack.polish import bisect_to_boundary
from relux.attack.result import LayerReport, SelfCheck
from relux.attack.unify import parallel_on
from relux.errors import ExtractionFailed
from relux.model import MLP
from relux.oracle.base import FloatArray, QueryFn
from relux.parallel import Executor

if TYPE_CHECKING:
    from relux.attack.deep import LayerOutcome
    from relux.attack.unify import NeuronRow

log = logging.getLogger(__name__)

#: a self-check that disagreed on at most this share of its random points may be resumed
RESUME_MAX_SHARE = 0.01
#: a resumed attempt whose self-check disagrees on more than this many times the share of random points the
#: one it resumed did (and on more than :data:`WORSE_MIN` points) left the model worse: its additions are not
#: kept
WORSE = 4
WORSE_MIN = 16
#: ... or whose largest disagreement is this many times the one it resumed's, and above :data:`WORSE_FLOOR`
#: (a neuron found late whose weights came out wrong: 1.8e-3 to 0.47 at inputs of its small on-region)
WORSE_ERROR = 10.0
WORSE_FLOOR = 1e-2
#: a row a resumed attempt adds is on (or off) at most at this share of random inputs: the failed model,
#: which lacked it, agreed with ``f`` at all but :data:`RESUME_MAX_SHARE` of them (a missing neuron shows
#: wherever it is on, or, absorbed into the linear part around it, wherever it is off)
NEW_ROW_MAX_SHARE = 4 * RESUME_MAX_SHARE
#: lines through the hints of a last-hidden-layer resume, at least (:func:`last_rows_at_hints`)
MIN_HINT_LINES = 8


@dataclass(frozen=True)
class Resume:
    """What an attempt that resumes a failed one keeps: the hidden layers before the failed attempt's
    first incomplete one (or, for a later resume, the first incomplete one after the layer it resumed
    at; input coordinates), their reports, the exact points found while extracting
    them (for the refinement's and the self-check's samples), and the rows the failed attempt found in
    the incomplete layer (over the kept layers' outputs), and the inputs where the failed attempt's
    model disagreed with ``f`` (worst first), where the resumed attempt aims its search lines; a resumed
    attempt that fails otherwise is resumed again from the same point, with the same inputs. When the layer
    after the one it resumes at is the last hidden layer, that layer is kept too
    (``carried``)."""

    layers: tuple[tuple[FloatArray, FloatArray], ...]
    reports: tuple[LayerReport, ...]
    points: tuple[FloatArray, ...]
    rows: tuple[FloatArray, FloatArray]
    hints: FloatArray
    #: the failed attempt's last hidden layer, when it is the next one (:mod:`relux.attack.carry`)
    carried: CarriedLayer | None = None
    #: share of its random self-check points on which the failed attempt disagreed with ``f``
    disagreeing: float = 0.0
    #: the failed attempt's largest relative disagreement with ``f``
    max_rel_error: float = 0.0
    #: for a resume at the last hidden layer while the layer before is short too: the resume at that one
    #: instead (the last hidden layer carried along), for when this one leaves the model worse (rows found
    #: behind a layer that lacks a neuron on near them can be wrong)
    fallback: Resume | None = None

    def made_worse(self, check: SelfCheck) -> bool:
        """Did the attempt resumed here leave the model worse than the one it resumed (:data:`WORSE`,
        :data:`WORSE_ERROR`)? What it added is then wrong, and is not built on."""
        share = check.disagreeing > WORSE_MIN and check.disagreeing > WORSE * self.disagreeing * check.random_points
        error = check.max_rel_error > max(WORSE_ERROR * self.max_rel_error, WORSE_FLOOR)
        return bool(share or error)

    @property
    def layer(self) -> int:
        """The hidden layer (1-based) the resumed attempt starts at."""
        return len(self.layers) + 1


def recovered_rows(before: Resume, after: Resume) -> bool:
    """Whether the attempt resumed at ``before`` ended with more rows in the layer it resumed at than it
    kept (``after``: where its own failure resumes; an earlier layer only once that layer is complete)."""
    kept = int(before.rows[0].shape[0])
    if after.layer == before.layer:
        return int(after.rows[0].shape[0]) > kept
    if after.layer > before.layer:
        return after.reports[before.layer - 1].recovered > kept
    # back at an earlier layer: progress when the layer resumed at is complete now (:func:`resume_point` also
    # goes back from a last hidden layer stuck short, which it carries along)
    if after.carried is not None:
        return after.carried.report.recovered >= after.carried.report.width
    return True


def resume_point(model: MLP, reports: Sequence[LayerReport], points: Sequence[FloatArray], check: SelfCheck,
                 resumed_at: int = 0, gained: bool = False, sample: FloatArray | None = None,
                 before: Resume | None = None) -> Resume | None:
    """Where the next attempt may resume a failed deep attempt: at its first incomplete hidden layer
    after ``resumed_at`` (the layer this attempt itself resumed at, which had its aimed search already;
    0 for a fresh attempt), or at the last hidden layer when it is one of those incomplete; when there
    is none, at ``resumed_at`` again if its aimed search ``gained`` rows there and it is still
    incomplete (another rare neuron of that layer, on where this attempt's model is wrong); when that
    layer and the later ones are complete, at the first incomplete layer before it; when it is the last
    hidden layer, gained nothing (or gained rows, none of them on where it is still wrong, and that only at
    inputs its search was aimed at already: the hints of ``before``, the resume it started from) and the
    layer before is short, at that one (the last hidden layer carried along). None when the
    check passed or disagreed on more than :data:`RESUME_MAX_SHARE` of its random points (the others,
    near witnesses and suspects, are where a model is likeliest wrong), when no such layer exists, or
    when it is the first layer (nothing to keep). When every layer is complete, the model has a wrong
    row, not a missing one: with random inputs ``sample``, at the last hidden layer without the rows
    :func:`suspect_rows` blames for the disagreements (they are found again at them)."""
    if check.passed or check.disagreeing > RESUME_MAX_SHARE * check.random_points:
        return None
    short = [r.index for r in reports if r.recovered < r.width and r.index > resumed_at]
    if not short and resumed_at > 0:
        here = reports[resumed_at - 1]
        before_short = resumed_at == len(reports) and reports[resumed_at - 2].recovered < reports[resumed_at - 2].width
        if here.recovered < here.width and gained and not (before_short and _stale(model, check, resumed_at, before)):
            short = [resumed_at]
        elif here.recovered >= here.width:
            # The layers from the one it resumed at on are complete now: the model can only be wrong where
            # a neuron of an earlier incomplete layer is on, and its disagreements show where.
            short = [r.index for r in reports if r.recovered < r.width and r.index < resumed_at]
        elif before_short:
            # The last hidden layer's aimed search found nothing, or nothing that made the model right where it
            # aimed: what is missing there may be a neuron of the layer before, on only there (digits
            # 64-40x4-10: its rows gained at one of two such inputs, the other was layer-3 neuron 18's), which
            # goes first, the last layer carried along (not progress: such a resume counts against ``resumes``).
            short = [resumed_at - 1]
    drop = np.zeros(0, dtype=int)
    if not short and all(r.recovered >= r.width for r in reports) and sample is not None and len(reports) > 1:
        drop = suspect_rows(model, len(reports), sample, np.array(check.disagreements, dtype=float))
        if drop.size:
            short = [len(reports)]
    if len(short) > 1 and short[-1] == len(reports):
        # the last hidden layer incomplete too: it goes first. Its rows are right wherever the model is (all
        # but a few inputs), its missing ones show at the disagreements (witness groups by output direction),
        # and once it is complete the next resume comes back here with it kept (relux.attack.carry)
        short = short[-1:]
    if not short or short[0] <= 1:
        return None
    keep = short[0] - 1
    W, b = model.layers[keep]
    if drop.size:
        log.info("layer %d: row(s) %s, rarely on, blamed for the disagreements: looked for again there",
                 short[0], drop.tolist())
        W, b = np.delete(W, drop, axis=0), np.delete(b, drop)
    carried = None
    if short[0] + 1 == len(reports) and len(points) == len(reports):
        # the next layer is the last hidden one: kept, its rows relabelled (relux.attack.carry); when it is
        # short, the next resume looks for its missing rows
        Wc, bc = model.layers[short[0]]
        carried = CarriedLayer(Wc.copy(), bc.copy(), reports[-1], np.array(points[-1], dtype=float))
    fallback = None
    if short[0] == len(reports) and reports[-2].recovered < reports[-2].width:
        fallback = resume_point(model, reports, points, check, len(reports), False)
    return Resume(tuple((W_.copy(), b_.copy()) for W_, b_ in model.layers[:keep]), tuple(reports[:keep]),
                  tuple(points[:keep]), (W.copy(), b.copy()),
                  np.array(check.disagreements, dtype=float).reshape(-1, model.input_dim), carried,
                  check.disagreeing / max(check.random_points, 1), check.max_rel_error, fallback)


def _stale(model: MLP, check: SelfCheck, layer: int, before: Resume | None) -> bool:
    """Is the model resumed at ``layer`` from ``before`` still wrong only at inputs its search was aimed
    at (``before.hints``, re-queried exactly: the self-check queries an earlier attempt's disagreements
    again; no random point disagrees, and the check kept every disagreement), with none of the rows it
    added there on at them? The neuron missing there is then not one of this layer's (a row found at one
    of them but wrong there is: that layer is searched again)."""
    D = np.array(check.disagreements, dtype=float)
    # a random point that disagrees was not aimed at; sixteen disagreements may leave others out
    if before is None or not before.hints.size or not D.size or check.disagreeing or D.shape[0] >= 16:
        return False
    A = before.hints.reshape(-1, model.input_dim)
    D = D.reshape(-1, A.shape[1])
    gap = np.min(np.linalg.norm(D[:, None, :] - A[None, :, :], axis=2), axis=1)
    if not np.all(gap <= 1e-12 * (1.0 + np.linalg.norm(D, axis=1))):
        return False
    W, b = model.layers[layer - 1]
    W0, b0 = before.rows
    if W0.shape[0]:
        keys = np.concatenate([W, b[:, None]], axis=1)
        keys /= np.linalg.norm(keys, axis=1, keepdims=True)
        kept = np.concatenate([W0, b0[:, None]], axis=1)
        kept /= np.linalg.norm(kept, axis=1, keepdims=True)
        new = np.min(np.linalg.norm(keys[:, None, :] - kept[None, :, :], axis=2), axis=1) > 1e-4
    else:
        new = np.ones(W.shape[0], dtype=bool)
    _, H = pfx.forward(model.layers[: layer - 1], D)
    return not bool(np.any(H @ W[new].T + b[new] > 0))


def boundary_points(layers: Sequence[pfx.Layer], w: FloatArray, b: float, X: FloatArray, n: int,
                    rng: np.random.Generator) -> FloatArray:
    """Up to ``n`` points where the row ``(w, b)`` behind the known ``layers`` vanishes, found without a
    query: bisection (:func:`relux.attack.polish.bisect_to_boundary`) between sample inputs of ``X`` on
    either side of its boundary, drawn with replacement (a rarely active row is on at few of them). A row
    on (or off) at every sample gets points from the samples nearest its boundary, pushed onto it by Newton
    steps with the known prefix (:func:`relux.attack.unseen_columns.pushed_boundary_points`)."""
    from relux.attack.unseen_columns import pushed_boundary_points

    _, H = pfx.forward(layers, X)
    z = H @ w + b
    pos, neg = np.flatnonzero(z > 0), np.flatnonzero(z < 0)
    if not pos.size or not neg.size:
        near = np.argsort(np.abs(z))[: 2 * n]
        P = pushed_boundary_points(layers, w, b, X[near])
        return P[:n]
    m = min(n, max(pos.size, neg.size))
    return bisect_to_boundary(layers, w, b, X[rng.choice(pos, size=m)], X[rng.choice(neg, size=m)])


def resumed_layer(
    q: QueryFn,
    layers: list[tuple[FloatArray, FloatArray]],
    rows: tuple[FloatArray, FloatArray],
    width: int,
    d0: int,
    is_last: bool,
    cfg: ExtractionConfig,
    rng: np.random.Generator,
    rel_tol: float,
    hints: FloatArray | None,
    executor: Executor | None = None,
) -> LayerOutcome:
    """The layer a resumed attempt starts at (:mod:`relux.attack.resume`): the failed attempt's rows,
    already refined and signed, each with boundary points found without a query, and the missing rows
    from witnesses on search lines through ``hints`` first (:func:`relux.attack.more_rows.more_rows`);
    the new rows are refined and signed as any layer's."""
    from relux.attack.deep import outcome_from_rows
    from relux.attack.more_rows import hint_lines, more_rows

    W0, b0 = rows
    X_random = X = rng.normal(0.0, cfg.input_scale, size=(8192, d0))
    if hints is not None and hints.size:
        X = np.concatenate([hints.reshape(-1, d0), X])  # a rarely active row is on there
    pts, kept = [], []
    for j in range(W0.shape[0]):
        P = boundary_points(layers, W0[j], float(b0[j]), X, 8, rng)
        if P.shape[0]:
            pts.append(P)
            kept.append(j)
    W0, b0 = W0[kept], b0[kept]
    n_kept = W0.shape[0]
    cov0 = np.ones(W0.shape, dtype=bool)
    res0 = np.zeros(n_kept)
    if is_last and hints is not None and hints.size:
        # the last hidden layer: witnesses on lines through the hints, grouped by output direction
        W0, b0, cov0, res0, pts = last_rows_at_hints(q, layers, W0, b0, cov0, res0, pts, width, d0, cfg, rng,
                                                      rel_tol, hints, executor)
    # The rows that matter are on at the hints and show on the first lines; random lines after them
    # are no likelier to cross a rare neuron than the failed attempt's, which spent the full stall.
    # Their witnesses lie about a few inputs, in few activation patterns of the layer before: completion is
    # tried with up to a quarter of a row's weights unseen (digits 64-40x4-10: layer-3 neuron 18, on at 5e-6
    # of inputs, seen on 34 of 40 coordinates by the lines through the one input where the check saw it).
    # The search stops after the two rounds through the hints (full lines, then short ones) when they found
    # nothing, as it did when those were 32 lines each.
    stall = 2 * hint_lines(hints, d0) if hints is not None and hints.size else 2 * cfg.max_search_lines
    more = more_rows(q, layers, W0, b0, width, d0, cfg, rng, rel_tol, stall_lines=stall,
                     executor=executor, partial_ok=is_last, hints=hints, max_unseen=0.25)
    log.info("layer %d: %d row(s) kept from the attempt resumed, %d from witness groups at its disagreements, "
             "%d more from %d witnesses on %d lines%s", len(layers) + 1, n_kept, W0.shape[0] - n_kept,
             more.W.shape[0], more.witnesses, more.lines, f"; {more.reason}" if more.reason else "")
    Wn, bn = np.concatenate([W0[n_kept:], more.W]), np.append(b0[n_kept:], more.b)
    pts_n, res_n = [*pts[n_kept:], *more.points], np.append(res0[n_kept:], more.residual)
    cov_n = np.concatenate([cov0[n_kept:], more.coverage])
    rare = rare_rows(layers, Wn, bn, X_random)
    if not rare.all():
        log.warning("layer %d: %d new row(s) dropped: on (and off) at more than %.0f%% of random inputs, where the "
                    "failed model agreed with f (not a missing neuron)", len(layers) + 1, int(np.sum(~rare)),
                    100 * NEW_ROW_MAX_SHARE)
    keep_n = _distinct_new(Wn, bn, cov_n, res_n, np.flatnonzero(rare), len(layers) + 1)
    n_new = int(keep_n.size)
    if n_kept < rows[0].shape[0]:
        log.warning("layer %d: %d kept row(s) dropped: no sample input on either side of their boundary",
                    len(layers) + 1, rows[0].shape[0] - n_kept)
    if n_kept + n_new == 0:
        raise ExtractionFailed(f"layer {len(layers) + 1}: the resumed attempt has no row (expected {width}, found "
                               "none kept and none new); a fresh attempt follows if any is left")
    return outcome_from_rows(
        q, layers, np.concatenate([W0[:n_kept], Wn[keep_n]]), np.append(b0[:n_kept], bn[keep_n]),
        [*pts[:n_kept], *(pts_n[i] for i in keep_n)], np.append(res0[:n_kept], res_n[keep_n]), width, d0, is_last,
        cfg, rng, "kept from the attempt resumed, or from witnesses at its disagreements",
        coverage=np.concatenate([cov0[:n_kept], cov_n[keep_n]]), rel_tol=rel_tol,
        settled=np.concatenate([np.ones(n_kept, dtype=bool), np.zeros(n_new, dtype=bool)]))


def _distinct_new(W: FloatArray, b: FloatArray, cov: np.ndarray, res: FloatArray, idx: np.ndarray, layer: int
                  ) -> np.ndarray:
    """The new rows ``idx`` of a resumed layer without repeats: two that agree on the coordinates both have
    seen (:func:`_same_on_seen`) are one neuron, and the one that saw more coordinates stays (the
    lower residual on a tie). Random 30-15-15-15-1 victim 6: the lines through the disagreements gave one
    rare neuron twice, once exactly and once 0.17 off on weights its witnesses did not see, and the
    neuron it took the place of stayed missing."""
    order = sorted((int(i) for i in idx), key=lambda i: (-int(cov[i].sum()), float(res[i])))
    out: list[int] = []
    for i in order:
        if not any(_same_on_seen(cov[i] & cov[j], W[i], float(b[i]), W[j], float(b[j])) for j in out):
            out.append(i)
    if len(out) < idx.size:
        log.info("layer %d: %d new row(s) dropped: the same neuron as another new row on the weights both saw",
                 layer, idx.size - len(out))
    return np.array(sorted(out), dtype=int)


def _same_on_seen(seen: np.ndarray, w1: FloatArray, b1: float, w2: FloatArray, b2: float) -> bool:
    """Are ``(w1, b1)`` and ``(w2, b2)`` one neuron on the coordinates ``seen`` (both rows saw them)? Within
    1e-4 in cosine over at least four coordinates and the bias: witnesses determine what they see to 1e-8,
    and two different neurons agreeing that closely on four weights is a coincidence of measure zero."""
    return parallel_on(seen, w1, b1, w2, b2, 1e-4, 4)


def _seen_before(r: NeuronRow, W: FloatArray, b: FloatArray, cov: np.ndarray) -> bool:
    """Is ``r`` one of the rows ``(W, b)`` on the coordinates both have seen (:func:`_same_on_seen`)? A rarely
    active neuron's witnesses leave some of its weights unseen, and the unification's values there differ
    from the known row's (digits 64-40x4-10: layer-4 neuron 18 added twice, the second copy off by half on
    unseen weights)."""
    return any(_same_on_seen(r.coverage & cov[j], r.w, r.b, W[j], float(b[j])) for j in range(W.shape[0]))


def suspect_rows(model: MLP, layer: int, sample: FloatArray, D: FloatArray) -> np.ndarray:
    """Rows of hidden ``layer`` (1-based) of a model whose every layer is complete but which disagrees
    with ``f`` at the few inputs ``D``: the rarely active ones (on at most at :data:`NEW_ROW_MAX_SHARE` of
    ``sample``; a wrong common row disagrees almost everywhere) that are on at some input of ``D`` or, at
    one where none is, the one nearest its boundary (pre-activation over its spread on ``sample``).
    digits 64-40x4-10: rows of last-layer neurons on at 2e-3 and below, each found behind an earlier
    layer that lacked a neuron on near them, right on all but 1e-5 of inputs."""
    D = D.reshape(-1, model.input_dim)
    if not D.shape[0]:
        return np.zeros(0, dtype=int)
    Zs = pfx.forward(model.layers[:layer], sample)[0][-1]
    share = np.mean(Zs > 0, axis=0)
    rare = np.flatnonzero(share <= NEW_ROW_MAX_SHARE)
    if not rare.size:
        return np.zeros(0, dtype=int)
    spread = np.std(Zs[:, rare], axis=0) + np.finfo(float).tiny
    Zd = pfx.forward(model.layers[:layer], D)[0][-1][:, rare] / spread
    blamed = set(rare[np.flatnonzero((Zd > 0).any(axis=0))].tolist())
    blamed |= {int(rare[np.argmax(z)]) for z in Zd if not (z > 0).any()}
    return np.array(sorted(blamed), dtype=int)


def rare_rows(layers: Sequence[pfx.Layer], W: FloatArray, b: FloatArray, X: FloatArray) -> np.ndarray:
    """Which rows ``(W, b)`` behind the known ``layers`` are on, or off, at no more than
    :data:`NEW_ROW_MAX_SHARE` of the sample inputs ``X`` (no query)."""
    if not W.shape[0]:
        return np.zeros(0, dtype=bool)
    _, H = pfx.forward(layers, X)
    share = np.mean(H @ W.T + b > 0, axis=0)
    return np.asarray(np.minimum(share, 1.0 - share) <= NEW_ROW_MAX_SHARE)


def last_rows_at_hints(
    q: QueryFn,
    layers: list[tuple[FloatArray, FloatArray]],
    W: FloatArray,
    b: FloatArray,
    cov: np.ndarray,
    res: FloatArray,
    pts: list[FloatArray],
    width: int,
    d0: int,
    cfg: ExtractionConfig,
    rng: np.random.Generator,
    rel_tol: float,
    hints: FloatArray,
    executor: Executor | None = None,
) -> tuple[FloatArray, FloatArray, np.ndarray, FloatArray, list[FloatArray]]:
    """Rows of the last hidden layer, behind its signed prefix, that ``(W, b)`` lacks: witnesses on
    lines through ``hints`` (the first 16, one random direction each, cycled to :data:`MIN_HINT_LINES` lines
    at least), grouped by the direction of their output jump
    (every kink of one last-layer neuron moves the output along its column, :mod:`relux.attack.free_last`),
    each group of two or more unified into one row, kept when its witnesses determine it and it is new
    (the tests of :mod:`relux.attack.more_rows`' seeds). A rarely active neuron's
    pairs of witnesses see too few coordinates to determine its row; its group of thirty does (digits
    64-40x4-10, layer-4 neurons on at 3e-5 and 3e-4 of inputs: rows to 1e-9). Returns the rows with the
    new ones appended, their coverage, residuals and boundary points."""
    from relux.attack.free_last import group_by_output
    from relux.attack.more_rows import _determined, _known
    from relux.attack.unify import robust_unify
    from relux.attack.witnesses import collect_witnesses

    # at least MIN_HINT_LINES lines in all, in random directions, through few hints: a rarely active neuron's
    # on-region is small, and one line through it crosses its boundary twice, in one or two activation
    # patterns, too few to determine its row (digits 64-40x4-10 seed 1: layer-4 neuron 32 seen at one hint,
    # missed by six resumes of one line each); eight hints or more keep one line each, the first 16 (more
    # lines there found rows of the short layer before as rows of this one)
    x0 = hints.reshape(-1, d0)[:16]
    if not x0.shape[0]:
        return W, b, cov, res, list(pts)
    x0 = x0[np.arange(max(x0.shape[0], MIN_HINT_LINES)) % x0.shape[0]]
    n_grid = int(cfg.grid_per_neuron * (sum(W_.shape[0] for W_, _ in layers) + width)) + 16
    nrm = np.linalg.norm(np.concatenate([W, b[:, None]], axis=1), axis=1)
    known = (W / nrm[:, None], b / nrm) if W.shape[0] else None
    wits, _ = collect_witnesses(q, layers, d0, x0.shape[0], n_grid, cfg, rng, rel_tol,
                                lines_given=(x0, rng.normal(size=x0.shape)), known=known, executor=executor)
    wits = [w for w in wits if w.out_dir is not None]
    keys = np.concatenate([W, b[:, None]], axis=1) / nrm[:, None] if W.shape[0] else np.zeros((0, W.shape[1] + 1))
    W, b, cov, res, pts = W.copy(), b.copy(), cov.copy(), res.copy(), list(pts)
    for g in group_by_output(wits):
        if g.size < 2 or W.shape[0] >= width:
            continue
        r = robust_unify(wits, [int(i) for i in g])
        if not _determined(r) or (keys.shape[0] and _known(r, keys)) or _seen_before(r, W, b, cov):
            continue
        key = np.append(r.w, r.b)
        W, b = np.concatenate([W, r.w[None, :]]), np.append(b, r.b)
        cov, res = np.concatenate([cov, r.coverage[None, :]]), np.append(res, r.residual)
        pts.append(np.stack([wits[i].x for i in r.members]))
        keys = np.concatenate([keys, key[None, :]])
    return W, b, cov, res, pts
