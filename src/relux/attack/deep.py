"""Layer-by-layer extraction of networks with several hidden layers (attack-notes §3-5).

For each hidden layer in turn: witnesses behind the known prefix, partial signatures in the space
of control, grouping and unification into full rows, a global check that each row explains the kinks
it predicts on every search line (kinks of deeper neurons fail it), then signs: the clean wiggle
(SOE-style) for inner layers, the CM24 last-layer solve for the last one.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from relux.attack import prefix as pfx
from relux.attack.always_on import AlwaysOn, rank_one_leftovers, solve_always_on
from relux.attack.complete import complete_row
from relux.attack.config import ExtractionConfig
from relux.attack.confirm import crossing_hits, mostly_confirmed
from relux.attack.critical import LineKinks
from relux.attack.hyperplanes import hyperplane_distance
from relux.attack.linalg import lstsq, lstsq_dropping_misfits
from relux.attack.missing import unexplained_lines
from relux.attack.polish import Polished, estimated_boundary_points, polish_unit, suspect_coordinates
from relux.attack.rarely_off import locate_rarely_off
from relux.attack.seeding import rows_from_seeds, rows_from_unexplained
from relux.attack.signcheck import SignCheck, check_and_repair
from relux.attack.signs import (
    LinearSigns,
    SignSolution,
    affine_relu_residual,
    fit_dropping_misfits,
    linear_row_signs,
    solve_flips,
)
from relux.attack.support_signs import SupportSigns, pattern_points, support_signs
from relux.attack.trace import trace_neuron
from relux.attack.unify import (
    Grouping,
    NeuronRow,
    agrees_on_overlap,
    group_witnesses,
    merge_rows,
    on_neuron,
    ransac_rows,
    robust_unify,
    shadowed_rows,
    unify,
)
from relux.attack.wiggle import active_region, wiggle_signs
from relux.attack.witnesses import Witness, collect_witnesses, witness_bytes
from relux.oracle.base import FloatArray, QueryFn
from relux.parallel import Executor

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerOutcome:
    W: FloatArray
    b: FloatArray
    witnesses: int
    lines: int
    sign_method: str
    neurons: tuple[dict[str, Any], ...]
    dead: int
    witness_points: FloatArray
    confidence: FloatArray
    coverage: np.ndarray  # (rows, d_in): layer-input coordinates some witness of the row saw active
    residual: float = float("nan")  # largest relative misfit of a row to its exact boundary points


def extract_layer(
    query: QueryFn,
    layers: Sequence[pfx.Layer],
    width: int,
    d0: int,
    total_hidden: int,
    is_last: bool,
    k: int,
    cfg: ExtractionConfig,
    rng: np.random.Generator,
    rel_tol: float,
    executor: Executor | None = None,
    hints: FloatArray | None = None,
) -> LayerOutcome:
    """Recover hidden layer ``len(layers) + 1`` (``width`` neurons) behind the known ``layers``
    (``executor``: where the per-witness work runs; serial by default, the result does not depend on it).
    ``hints``: inputs where an earlier attempt's model was wrong; the last layer's aimed lines look
    there first (:func:`relux.attack.missing.unexplained_lines`)."""
    witnesses: list[Witness] = []
    all_lines: list[LineKinks] = []
    n_grid = int(cfg.grid_per_neuron * total_hidden) + 16
    lines_used = 0
    rows: list[NeuronRow] = []
    score: list[int] = []
    chains: list[list[int]] = []
    per_round = 4
    stall = 0
    best_good = 0
    # In the last hidden layer every kink the prefix does not explain is one of its own: while some are
    # unexplained and rows are missing, more lines are worth their cost.
    max_lines = cfg.max_search_lines * (8 if is_last else 4)
    kept: list[NeuronRow] = []  # rows confirmed in some round: later regrouping must not lose them
    aimed: tuple[FloatArray, FloatArray] | None = None
    aimed_rounds = 0
    mem_limit = cfg.witness_memory_mb * 2**20
    held = 0  # bytes of the stored witnesses, summed as rounds add them
    grouping = Grouping()  # kept across rounds: the witness list only grows
    while lines_used < max_lines:
        known = (np.stack([r.w for r in kept]), np.array([r.b for r in kept])) if kept else None
        new, info = collect_witnesses(query, layers, d0, per_round, n_grid, cfg, rng, rel_tol,
                                      line_offset=lines_used, known=known, lines_given=aimed,
                                      max_bytes=max(mem_limit - held, 0), executor=executor)
        lines_used += per_round if aimed is None else aimed[0].shape[0]
        aimed = None
        witnesses += new
        all_lines += info.lines_found
        held += witness_bytes(new)
        full = held > mem_limit
        if full:
            log.warning("layer %d: %d witnesses hold %.0f MB, over witness_memory_mb=%d: no more search lines "
                        "for this layer", len(layers) + 1, len(witnesses), held / 2**20, cfg.witness_memory_mb)
        rows, score = _build_rows(witnesses, chains, all_lines, layers, rng, width, is_last=is_last,
                                  grouping=grouping)
        kept = _merge_kept(kept, _good(rows, score))
        rows, score, n_kept = _with_kept(kept, rows, all_lines, layers, is_last)
        # a kept row must keep explaining its crossings as lines accumulate (a false one stops)
        kept = [r for r, sc in zip(rows[:n_kept], score[:n_kept], strict=True) if sc >= 3]
        good = _good(rows, score)
        log.debug("layer %d: %d lines, %d witnesses, %d rows, %d complete", len(layers) + 1, lines_used,
                  len(witnesses), len(rows), len(good))
        if (len(good) >= width and lines_used >= 8) or full:
            break
        stall = stall + 1 if len(good) <= best_good else 0
        best_good = max(best_good, len(good))
        if is_last and good and stall >= 3 and aimed_rounds < 4:
            # A last-layer neuron rarely on shows where the confirmed rows cannot explain f: aim there.
            aimed = unexplained_lines(query, layers, np.stack([r.w for r in good]), np.array([r.b for r in good]),
                                      d0, cfg, rng, hints=hints)
            aimed_rounds += 1
            if aimed is not None:
                log.debug("layer %d: %d lines aimed at unexplained outputs", len(layers) + 1, aimed[0].shape[0])
                stall = 0
                continue
        # Kinks of confirmed rows cost no more gradients, so lines stay cheap: keep looking for rare
        # neurons (crossed by few lines) for a while before following boundaries instead.
        if stall >= (6 if is_last else 3) and lines_used >= (max_lines // 2 if is_last else max_lines):
            break
        # An inner layer one row short: the next layer's walks recover a neuron of the layer before that
        # no kink showed (relux.attack.missing), so three rounds without a new row end the search (digits
        # 64-40x4-10's layer 2 spent 44 more lines, 240k queries, on a row the layer-3 walks then gave)
        if not is_last and layers and width - len(good) == 1 and stall >= 3:
            break
    # Rank deficiency: grow rows from single witnesses, completing their unseen weights from kinks.
    good = _good(rows, score)
    # An inner layer one row short tries few seeds, as its lines and traces (digits 64-40x4-10's layer 2:
    # 120 seeds, 200k queries, and no row)
    one_short = not is_last and width - len(good) == 1
    if layers and len(good) < width:
        seeded = rows_from_seeds(query, layers, witnesses, good, all_lines, width, d0, n_grid, cfg, rng, rel_tol,
                                 max_seeds=max(4, width // 8) if one_short else 3 * width)
        if seeded:
            rows = good + seeded + [r for r in rows if id(r) not in {id(g) for g in good}]
            score = list(_score_rows(rows, all_lines, layers, is_last)[0])
            log.debug("layer %d: %d row(s) grown from single witnesses; %d complete rows", len(layers) + 1,
                      len(seeded), len(_good(rows, score)))
    # Still short: follow single neurons' boundaries across prefix regions until rows are determined.
    traces = last_gain = 0
    best_traced = len(_good(rows, score))
    # at most 4 traces per row of the layer, and as many traces as the layer has rows without a new
    # complete row end them (most unexplained witnesses belong to deeper layers, whose traces add
    # nothing here: digits 64-40x4-10's layer 2 spent 160 traces, 2 minutes, on its 40th row)
    # An inner layer one row short stops sooner, for the same reason as its lines above (the same digits
    # layer 2 spent 40 traces, 100k queries, on that row).
    def trace_stall() -> int:
        return max(4, width // 8) if not is_last and width - len(_good(rows, score)) == 1 else width

    while layers and len(_good(rows, score)) < width and traces < 4 * width and traces - last_gain < trace_stall():
        good = _good(rows, score)
        explained: set[int] = set()
        for r in good:
            explained.update(r.members)
        unexplained = [i for i in range(len(witnesses)) if i not in explained
                       and not any(on_neuron(witnesses[i], r, tol=1e-6) for r in good)]
        if not unexplained:
            break
        seed_i = int(rng.choice(unexplained))
        traces += 1
        chain = trace_neuron(query, layers, witnesses[seed_i], d0, 2 * witnesses[seed_i].h.size + 4, cfg, rng, rel_tol)
        idx = [seed_i]
        for wt in chain[1:]:
            witnesses.append(wt)
            idx.append(len(witnesses) - 1)
        if len(idx) >= 2:
            chains.append(idx)
        rows, score = _build_rows(witnesses, chains, all_lines, layers, rng, width, triples=False, is_last=is_last,
                                  grouping=grouping)
        # kept rows too: their later kinks were skipped (known), so their witnesses alone may not rebuild them
        rows, score, _ = _with_kept(kept, rows, all_lines, layers, is_last)
        n_good = len(_good(rows, score))
        if n_good > best_traced:
            best_traced, last_gain = n_good, traces
        log.debug("layer %d: trace %d gave %d witnesses; %d complete rows", len(layers) + 1, traces, len(idx),
                  n_good)
    # Rows ranked by the crossings they predict on every line: kinks of deeper neurons, fitted inside
    # one region of the layer before, predict crossings the oracle does not show.
    # Complete, uniquely determined rows first; others only to fill the layer.
    good_ids = {id(r) for r in _good(rows, score)}
    ranked = sorted(zip(rows, score, strict=True), key=lambda t: (id(t[0]) not in good_ids, -t[1]))
    limit = _residual_limit(rows)
    chosen = [r for r, sc in ranked if sc >= 1 and r.residual <= limit][:width]
    # A short layer: rows seen only where some layer-input coordinates were off predict crossings
    # that do not happen (their unseen weights read as zero), so they score badly. Take the best of
    # them anyway; the targeted search below looks for witnesses where the missing coordinates are on,
    # and the re-scoring after it drops those that still fail.
    provisional: set[int] = set()
    if len(chosen) < width:
        chosen_ids = {id(r) for r in chosen}
        extra = [r for r, _sc in ranked if id(r) not in chosen_ids and not r.complete and len(r.members) >= 3
                 and r.residual <= limit and r.coverage.sum() >= 2]
        extra.sort(key=lambda r: (-int(r.coverage.sum()), -len(r.members)))
        for r in extra[: width - len(chosen)]:
            provisional.add(len(chosen))
            chosen.append(r)
    for r, sc in ranked[:width]:
        log.debug("layer %d candidate: score %d, %d witnesses, coverage %d/%d, gap %.1e, residual %.1e",
                  len(layers) + 1, sc, len(r.members), int(r.coverage.sum()), r.coverage.size, r.gap, r.residual)
    # Still short: the witnesses no chosen row explains, fitted as exact points of missing neurons.
    if len(chosen) < width:
        extra_rows = rows_from_unexplained(witnesses, chosen, all_lines, layers, width, rng)
        for r in extra_rows:
            if not r.complete:
                provisional.add(len(chosen))
            chosen.append(r)
        if extra_rows:
            log.debug("layer %d: %d row(s) fitted to unexplained witnesses", len(layers) + 1, len(extra_rows))
    if not chosen:
        from relux.errors import ExtractionFailed

        raise ExtractionFailed(
            f"layer {len(layers) + 1}: no neuron could be identified from {len(witnesses)} witnesses"
        )
    # Re-unify each chosen row with every witness that lies on it (rank-deficient ones included).
    final = _reunify(chosen, witnesses)
    # Coordinates of the layer input never active at a row's witnesses: walk along the row's boundary
    # until they switch on and read their weights from exact kinks there.
    if layers:
        final = [_complete(query, layers, r, witnesses, d0, n_grid, cfg, rel_tol) if not r.complete else r
                 for r in final]
    # Still incomplete: new witnesses on lines that cross the row's boundary where the unseen
    # coordinates are on, re-unified with the row.
    for _attempt in range(3):
        todo = [(j, r) for j, r in enumerate(final) if not r.complete]
        if not todo:
            break
        x0s, us = _targeted_lines(layers, todo, witnesses, d0, cfg)
        if x0s.shape[0] == 0:
            break
        new, _ = collect_witnesses(query, layers, d0, 0, n_grid, cfg, rng, rel_tol, line_offset=lines_used,
                                   lines_given=(x0s, us), executor=executor)
        lines_used += x0s.shape[0]
        witnesses += new
        final = _reunify(final, witnesses)
    # A row whose every witness lies on another row was fitted to other neurons' witnesses. Its slot
    # stays free (a last layer short of rows gets its always-on neuron from the output fit).
    shadowed = shadowed_rows(final, witnesses)
    if shadowed:
        log.debug("layer %d: dropped %d row(s) whose witnesses all lie on other rows", len(layers) + 1,
                  len(shadowed))
        provisional = {j - sum(s < j for s in shadowed) for j in provisional if j not in shadowed}
        final = [r for j, r in enumerate(final) if j not in shadowed]
    if layers:
        final = [_polish(query, layers, r, witnesses, d0, cfg, rng) for r in final]
    if provisional:
        # Keep a provisional row only if, completed, it explains its crossings like the others.
        sc_final, _ = _score_rows(final, all_lines, layers, is_last)
        for j in provisional:
            log.debug("layer %d provisional row %d: complete %s, score %d (all: %s)", len(layers) + 1, j,
                      final[j].complete, sc_final[j], sc_final)
        keep = [j for j in range(len(final)) if j not in provisional or (final[j].complete and sc_final[j] >= 1)]
        if len(keep) < len(final):
            log.debug("layer %d: dropped %d provisional row(s) that stayed incomplete or unconfirmed",
                      len(layers) + 1, len(final) - len(keep))
        final = [final[j] for j in keep]
    if layers:
        # Two candidates a little apart (one wrong in a weight rarely seen on) can refine to the same
        # row: keep one, and give the freed slot to the next candidate that refines to a new row.
        chosen_ids = {id(r) for r in chosen}
        spare = [r for r, sc in ranked if sc >= 1 and r.residual <= limit and id(r) not in chosen_ids]
        final = _distinct_rows(final, spare, width, lambda r: _polish(query, layers, r, witnesses, d0, cfg, rng),
                               witnesses)
    for j, r in enumerate(final):
        log.debug("layer %d row %d: %d witnesses, coverage %d/%d, residual %.1e, gap %.1e", len(layers) + 1, j,
                  len(r.members), int(r.coverage.sum()), r.coverage.size, r.residual, r.gap)
    if not final:
        from relux.errors import ExtractionFailed

        raise ExtractionFailed(
            f"layer {len(layers) + 1}: no row survived confirmation ({len(witnesses)} witnesses); expected "
            f"{width} neurons behind the recovered prefix, found none that explains its kinks"
        )
    W = np.stack([r.w for r in final])
    b = np.array([r.b for r in final])
    sgn, conf, sign_method, on = _layer_signs(query, layers, W, b, d0, is_last, width - len(final), cfg, rng,
                                              np.stack([wt.x for wt in witnesses]),
                                              np.stack([r.coverage for r in final]), executor)
    W = W * sgn[:, None]
    b = b * sgn
    neurons = tuple(
        {"index": j, "witnesses": len(final[j].members), "residual": final[j].residual,
         "uniqueness_gap": final[j].gap, "sign": int(sgn[j]), "sign_confidence": float(conf[j])}
        for j in range(len(final))
    )
    pts = np.stack([witnesses[final[j].members[0]].x for j in range(len(final))])
    out = LayerOutcome(W, b, len(witnesses), lines_used, sign_method, neurons, width - len(final), pts,
                       np.asarray(conf, dtype=float), np.stack([r.coverage for r in final]),
                       float(max(r.residual for r in final)))
    return _with_always_on(out, on)


def _with_always_on(out: LayerOutcome, on: AlwaysOn | None) -> LayerOutcome:
    """The layer with its always-on neuron (:mod:`relux.attack.always_on`) appended, when there is one."""
    if on is None:
        return out
    j = out.W.shape[0]
    neuron = {"index": j, "witnesses": 0, "residual": float("nan"), "uniqueness_gap": float("nan"), "sign": 1,
              "sign_confidence": 1.0, "rows_from": "always-on: the affine part of the output fit",
              "always_on": True, "bias_identifiable": False, "sign_gauge_neurons": list(on.gauge)}
    if on.off_points:
        neuron.update(rows_from=f"rarely off: the affine part of the output fit, its bias from {on.off_points} "
                                "inputs where it is off", always_on=False, bias_identifiable=True)
    return dataclasses.replace(
        out, W=np.concatenate([out.W, on.w[None, :]]), b=np.append(out.b, on.b), neurons=(*out.neurons, neuron),
        dead=out.dead - 1, confidence=np.append(out.confidence, 1.0),
        coverage=np.concatenate([out.coverage, np.ones((1, out.coverage.shape[1]), dtype=bool)]))


def outcome_from_rows(
    query: QueryFn,
    layers: Sequence[pfx.Layer],
    W: FloatArray,
    b: FloatArray,
    row_points: Sequence[FloatArray],
    row_residual: FloatArray,
    width: int,
    d0: int,
    is_last: bool,
    cfg: ExtractionConfig,
    rng: np.random.Generator,
    how: str,
    coverage: np.ndarray | None = None,
    rel_tol: float | None = None,
    settled: np.ndarray | None = None,
    executor: Executor | None = None,
    refined: np.ndarray | None = None,
) -> LayerOutcome:
    """A layer whose rows are already known (from walks, :mod:`relux.attack.walk`, or witness groups,
    :mod:`relux.attack.free_last`): signs as for any layer (the last-layer solve, or the wiggle for an
    inner layer, checked by the next layer's walks). ``coverage``: the layer-input coordinates each
    row's points saw on (all by default); the others are first filled along the row's boundary
    (:func:`relux.attack.complete.complete_row`, with the kink search's ``rel_tol``). ``settled``:
    rows already refined and signed (kept from a failed attempt, :mod:`relux.attack.resume`): not
    refined again, and their signs stay as given. ``refined``: rows already refined on exact
    boundary points (by a polish that passed, as :func:`relux.attack.all_on_layer._with_pattern_rows`
    keeps its seeds) but not signed."""
    nrm = np.linalg.norm(np.concatenate([W, b[:, None]], axis=1), axis=1)
    W, b = W / nrm[:, None], b / nrm
    row_residual = np.array(row_residual, dtype=float)
    cov = np.ones(W.shape, dtype=bool) if coverage is None else np.array(coverage, dtype=bool)
    if layers and not cov.all():
        if rel_tol is None:
            raise ValueError("outcome_from_rows: rows with unseen weights need the kink search's rel_tol")
        n_grid = int(cfg.grid_per_neuron * sum(w.shape[0] for w, _ in layers)) + 16 + 4 * W.shape[0]
        for j in (int(i) for i in np.flatnonzero(~cov.all(axis=1))):
            c = complete_row(query, layers, W[j], float(b[j]), cov[j], row_points[j][:3], d0,
                             cfg.input_scale * float(np.sqrt(d0)), n_grid, rel_tol)
            n = float(np.linalg.norm(np.append(c.w, c.b)))
            W[j], b[j], cov[j] = c.w / n, c.b / n, c.coverage
    done = np.zeros(W.shape[0], dtype=bool) if settled is None else np.asarray(settled, dtype=bool)
    skip = done if refined is None else done | np.asarray(refined, dtype=bool)
    W, b, row_residual = refine_rows(query, layers, W, b, row_points, row_residual, d0, cfg, rng, rel_tol, skip)
    sgn, conf, sign_method, on = _layer_signs(query, layers, W, b, d0, is_last, width - W.shape[0], cfg, rng,
                                              np.concatenate(list(row_points)), cov, executor)
    sgn, conf = np.where(done, 1.0, sgn), np.where(done, 1.0, conf)
    W = W * sgn[:, None]
    b = b * sgn
    neurons = tuple(
        {"index": j, "witnesses": int(row_points[j].shape[0]), "residual": float(row_residual[j]),
         "uniqueness_gap": float("nan"), "sign": int(sgn[j]), "sign_confidence": float(conf[j]), "rows_from": how}
        for j in range(W.shape[0])
    )
    pts = np.stack([p[0] for p in row_points])
    out = LayerOutcome(W, b, int(sum(p.shape[0] for p in row_points)), 0, sign_method, neurons,
                       width - W.shape[0], pts, np.asarray(conf, dtype=float), cov,
                       float(np.max(row_residual)) if row_residual.size else float("nan"))
    return _with_always_on(out, on)


def refine_rows(
    query: QueryFn,
    layers: Sequence[pfx.Layer],
    W: FloatArray,
    b: FloatArray,
    row_points: Sequence[FloatArray],
    row_residual: FloatArray,
    d0: int,
    cfg: ExtractionConfig,
    rng: np.random.Generator,
    rel_tol: float | None,
    skip: np.ndarray | None = None,
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """The rows (unit norm) each refined on exact boundary points near its own (:func:`refine_row`),
    with their residuals; a row the refinement keeps, or one ``skip`` marks, stays as given."""
    W, b, res = np.array(W, dtype=float), np.array(b, dtype=float), np.array(row_residual, dtype=float)
    todo = np.ones(W.shape[0], dtype=bool) if skip is None else ~np.asarray(skip, dtype=bool)
    for j in (int(i) for i in np.flatnonzero(todo)):
        P = row_points[j]
        # Up to three tries, boundary points (and anchors, from a row with more than 8) drawn afresh:
        # the wiggle leans on every row (behind CIFAR layer 1, one row left 3e-7 off gave 15 wrong
        # signs at full confidence).
        for _ in range(3):
            anchors = P[rng.choice(P.shape[0], size=min(8, P.shape[0]), replace=False)]
            got = refine_row(query, layers, W[j], float(b[j]), anchors, d0, cfg, rng, rel_tol=rel_tol)
            if got is not None:
                W[j], b[j], res[j] = got.w, got.b, got.residual
                break
        else:
            # Kept as measured: its residual is that of its own points (behind the unitary CIFAR layers
            # 1-2, a row from 2 points had 5e-8 there and was 6e-4 off: among dense boundaries its
            # polish found 182 boundary points for 256 weights). The wiggle's median verdicts bear its
            # leak, and the self-check judges the result.
            log.info("row %d of layer %d kept unrefined (%d point(s) of its own)", j, len(layers) + 1, P.shape[0])
    return W, b, res


def _layer_signs(
    query: QueryFn,
    layers: Sequence[pfx.Layer],
    W: FloatArray,
    b: FloatArray,
    d0: int,
    is_last: bool,
    missing: int,
    cfg: ExtractionConfig,
    rng: np.random.Generator,
    witness_x: FloatArray,
    coverage: np.ndarray | None = None,
    executor: Executor | None = None,
) -> tuple[FloatArray, FloatArray, str, AlwaysOn | None]:
    """Signs of a layer's rows: the CM24 last-layer solve for the last hidden layer; for an inner one,
    the Jacobian's support where the wiggle finds no all-active region (:func:`_support_signs`), and
    the wiggle for the rest (checked later by the next layer's walks or rows). Returns ``(±1 per row,
    confidence, method, always-on row)``; the last is set when a short last layer's affine part is an
    always-on neuron.
    ``missing``: how many rows the layer lacks."""
    short = missing > 0
    if is_last:
        method, flips, conf, on = _last_layer_signs(query, layers, W, b, d0, cfg, rng, witness_x, short, coverage)
        return np.where(flips, -1.0, 1.0), conf, method, on
    # the wiggle's all-active region, solved once: where there is none the support decides first
    region = active_region(layers, d0, cfg.input_scale) if layers else None
    support = _support_signs(query, layers, W, b, cfg, rng) if layers and region is None and not short else None
    if support is not None and bool(support.decided.all()):
        return support.signs, support.confidence, _support_method(support), None
    ws = wiggle_signs(query, layers, W, b, d0, cfg.input_scale, rng, fallback=witness_x, missing=missing,
                      executor=executor, region=region)
    signs, conf = ws.signs, ws.confidence
    if short:
        # a missing row moves with every probe and can make even a clean-looking verdict wrong
        conf = np.minimum(conf, 0.5)
    leak = f", missing rows' leak projected out at {ws.projected_points}" if short else ""
    method = f"wiggle ({ws.controllable_points}/{ws.points} controllable points{leak}, {int(ws.decided.sum())} decided)"
    if support is not None and support.decided.any():
        # the support's verdicts where it has them, the wiggle's for the rest
        signs = np.where(support.decided, support.signs, signs)
        conf = np.where(support.decided, support.confidence, conf)
        method = f"{_support_method(support)}; the rest by {method}"
    return signs, conf, method, None


def _support_signs(
    query: QueryFn, layers: Sequence[pfx.Layer], W: FloatArray, b: FloatArray, cfg: ExtractionConfig,
    rng: np.random.Generator,
) -> SupportSigns:
    """The signs from the support of the output's Jacobian (:mod:`relux.attack.support_signs`), for an
    inner layer behind a prefix where the wiggle finds no all-active region (then it has no
    controllable point). Where it finds one (the wiggle's measured ground: every suite victim up to
    CIFAR layer 4), :func:`_layer_signs` does not call this."""
    box = 3.0 * cfg.input_scale  # as the pattern regions use
    got = support_signs(query, layers, W, b, pattern_points(layers, box, rng), rng)
    log.info("layer %d: signs from the Jacobian's support at %d/%d point(s), %d decided (%d queries)%s",
             len(layers) + 1, got.certified, got.points, int(got.decided.sum()), got.queries,
             f"; {'; '.join(got.reasons)}" if got.reasons else "")
    return got


def _support_method(s: SupportSigns) -> str:
    """The sign method's words for a support reading."""
    return f"Jacobian support ({s.certified}/{s.points} points certified, {int(s.decided.sum())} decided)"


def _last_layer_signs(
    query: QueryFn,
    layers: Sequence[pfx.Layer],
    W: FloatArray,
    b: FloatArray,
    d0: int,
    cfg: ExtractionConfig,
    rng: np.random.Generator,
    witness_x: FloatArray,
    short: bool = False,
    coverage: np.ndarray | None = None,
) -> tuple[str, np.ndarray, FloatArray, AlwaysOn | None]:
    d_in = W.shape[1]
    n = 2 * (d_in + W.shape[0] + 1) + 64
    near = straddle_points([*layers, (W, b)], witness_x, cfg.input_scale * float(np.sqrt(d0)))
    X = np.concatenate([rng.normal(0.0, cfg.input_scale, size=(n, d0)), near])
    # A weight no witness of its row saw (that layer-input coordinate off at all of them) is not known
    # yet, so the features are exact only where every such coordinate is off: the signs come from
    # such points (chosen with the prefix, before any query) and the coordinates every row saw.
    seen = np.ones(d_in, dtype=bool) if coverage is None else np.asarray(coverage.all(axis=0), dtype=bool)
    if not seen.all():
        Xe = _points_with_off(layers, X, ~seen, 2 * (int(seen.sum()) + W.shape[0] + 1) + 64, d0, cfg, rng)
        if Xe is None:
            seen[:] = True  # too rare: fit everywhere (the solve may fail, and says so)
        else:
            X = Xe
    Y = query(X)
    _, H = pfx.forward(layers, X)
    Z = H @ W.T + b
    # A row on at every point (typical where the points are only those with some coordinates off) has
    # ReLU(ẑ) = ẑ there, and one off at every point has ReLU(ẑ) = 0: a linear term (or none) the fit
    # cannot tell from the others. Such rows leave the features, the solve allows their linear terms,
    # and what the solved rows leave of the affine part then decides their signs.
    n_pts = Z.shape[0]
    all_on = np.all(Z > 0, axis=0) if n_pts else np.zeros(W.shape[0], dtype=bool)
    lin = all_on | np.all(Z <= 0, axis=0) if n_pts else all_on
    if lin.all():
        lin[:] = False
    cols = ~lin
    # a missing (rarely active) neuron leaves misfits where it is on: those points are dropped
    alpha, gamma, c, _, kept = fit_dropping_misfits(Z[:, cols], H[:, seen], Y, rounds=4 if short else 0)
    X, Y, H, Z = X[kept], Y[kept], H[kept], Z[kept]
    sol = solve_flips(alpha, gamma, W[cols][:, seen], cfg.max_enum_bits, linear=W[lin][:, seen])
    if lin.any():
        sol = _with_open(sol, cols)
        if sol.ok:
            ls = linear_row_signs(alpha, gamma, W[cols][:, seen], sol.flips[cols], W[lin][:, seen], all_on[lin])
            sol = _with_linear(sol, lin, ls)
            log.debug("layer %d signs: row(s) %s on (or off) at every fit point: flips %s, confidence %s%s",
                      len(layers) + 1, np.flatnonzero(lin).tolist(), np.flatnonzero(ls.flips).tolist(),
                      np.round(ls.confidence, 2).tolist(), f" ({ls.reason})" if ls.reason else "")
    log.debug("layer %d signs: %s from %d points and %d/%d coordinates", len(layers) + 1, sol.reason or "solved",
              X.shape[0], int(seen.sum()), d_in)
    status = "" if sol.ok else ", FAILED"
    method = f"last-layer {sol.method} (free bits {sol.free_bits}, solutions {sol.solutions}{status})"
    if sol.ok or not short or not layers or lin.any():
        return method, sol.flips, sol.confidence, None
    # A short layer whose fit is exact: the affine part no flip explains is an always-on neuron.
    if not seen.all():
        return method, sol.flips, sol.confidence, None  # an always-on row needs every weight seen
    misfit = float(np.max(affine_relu_residual(Z, H, Y, alpha, gamma, c)))
    if misfit > 1e2 * cfg.selfcheck_tol * max(float(np.max(np.abs(Y))), np.finfo(float).tiny):
        return method, sol.flips, sol.confidence, None
    _, R = pfx.forward([(Wl, np.zeros_like(bl)) for Wl, bl in layers], rng.normal(size=(4096, d0)))
    on = solve_always_on(alpha, gamma, W, R, H)
    log.debug("layer %d: always-on solve: %s", len(layers) + 1, on.reason or f"{on.representations} representation(s)")
    if not on.ok:
        # a neuron on almost everywhere leaves the same affine term, but its row leaves the dual cone:
        # its bias is read where it is off
        def predict(P: FloatArray) -> FloatArray:
            _, Hp = pfx.forward(layers, P)
            out: FloatArray = np.maximum(Hp @ W.T + b, 0.0) @ alpha.T + Hp @ gamma.T + c
            return out

        ro = locate_rarely_off(query, layers, predict, rank_one_leftovers(alpha, gamma, W), d0, cfg.input_scale, rng,
                               rel_tol=max(1e-7, 1e2 * misfit / max(float(np.max(np.abs(Y))), np.finfo(float).tiny)))
        log.debug("layer %d: rarely-off neuron: %s", len(layers) + 1, ro.reason or f"bias from {ro.off_points} inputs")
        if not ro.ok:
            return f"{method}; always-on neuron: {on.reason}; rarely-off neuron: {ro.reason}", sol.flips, \
                sol.confidence, None
        on = AlwaysOn(ro.flips, ro.w, ro.b, ro.out, 1, (), float("nan"), True, "", off_points=ro.off_points)
        method = f"last-layer solve with a neuron rarely off (its bias from {ro.off_points} inputs where it is off)"
        return method, on.flips, np.ones(W.shape[0]), on
    conf = np.ones(W.shape[0])
    conf[list(on.gauge)] = 0.5
    method = (f"last-layer solve with an always-on neuron ({on.representations} equivalent sign choice(s), "
              f"gauge neurons {list(on.gauge)})")
    return method, on.flips, conf, on


def _with_open(sol: SignSolution, cols: np.ndarray) -> SignSolution:
    """``sol`` (solved for the rows ``cols``) spread over every row: the others unflipped, not
    relevant, confidence 0 (their signs are open)."""
    flips = np.zeros(cols.size, dtype=bool)
    relevant = np.zeros(cols.size, dtype=bool)
    conf = np.zeros(cols.size)
    flips[cols], relevant[cols], conf[cols] = sol.flips, sol.relevant, sol.confidence
    return dataclasses.replace(sol, flips=flips, relevant=relevant, confidence=conf)


def _with_linear(sol: SignSolution, lin: np.ndarray, ls: LinearSigns) -> SignSolution:
    """``sol`` with the rows ``lin`` signed by :func:`~relux.attack.signs.linear_row_signs`."""
    flips, relevant, conf = sol.flips.copy(), sol.relevant.copy(), sol.confidence.copy()
    flips[lin], relevant[lin], conf[lin] = ls.flips, ls.present, ls.confidence
    return dataclasses.replace(sol, flips=flips, relevant=relevant, confidence=conf)


def _points_with_off(
    layers: Sequence[pfx.Layer],
    X: FloatArray,
    off: np.ndarray,
    need: int,
    d0: int,
    cfg: ExtractionConfig,
    rng: np.random.Generator,
    max_draws: int = 64,
) -> FloatArray | None:
    """At least ``need`` inputs (``X``'s first, then fresh Gaussian ones) where the layer-input
    coordinates ``off`` are all off, by the prefix alone (no queries); None if too rare."""
    def keep(P: FloatArray) -> FloatArray:
        return P[np.all(pfx.forward(layers, P)[1][:, off] <= 0, axis=1)]

    got = [keep(X)]
    total = got[0].shape[0]
    for _ in range(max_draws):
        if total >= need:
            break
        more = keep(rng.normal(0.0, cfg.input_scale, size=(4 * need, d0)))
        got.append(more)
        total += more.shape[0]
    return np.concatenate(got) if total >= need else None


def straddle_points(layers: Sequence[pfx.Layer], witness_x: FloatArray, scale: float) -> FloatArray:
    """Points on both sides of every last-layer row's boundary (from witnesses on it, up to four per
    row), so that each ReLU feature switches in a fit's sample: a rarely active neuron may be on at no
    random point at all."""
    prev, (W, b) = list(layers[:-1]), layers[-1]
    near: list[FloatArray] = []
    _, Hw = pfx.forward(prev, witness_x)
    hn = np.linalg.norm(Hw, axis=1) + 1.0
    for w_row, b_row in zip(W, b, strict=True):
        on = witness_x[np.abs(Hw @ w_row + b_row) <= 1e-6 * hn * (float(np.linalg.norm(w_row)) + abs(b_row))]
        for x in on[:4]:
            M, _ = pfx.jacobian(prev, x)
            nrm = w_row @ M
            nn = float(np.linalg.norm(nrm))
            if nn == 0:
                continue
            dist = min(pfx.boundary_distance(prev, x), 1e-2 * scale)
            # just across (one prefix region), and farther in: the known prefix gives the features of
            # any point, and large activations of a rare neuron condition the fit of its output weights
            for step in (0.5 * dist, 0.05 * scale, 0.2 * scale):
                near += [x + step * nrm / nn, x - step * nrm / nn]
    return np.asarray(near) if near else np.zeros((0, witness_x.shape[1]))


def check_last_layer(
    query: QueryFn,
    layers: Sequence[pfx.Layer],
    d0: int,
    cfg: ExtractionConfig,
    rng: np.random.Generator,
    extra: FloatArray,
    confidence: FloatArray,
    tol: float,
) -> tuple[list[pfx.Layer], SignCheck]:
    """Check every sign against fresh queries (the output-layer residual) and repair the last layer."""
    d_last = layers[-1][0].shape[0]
    n = 2 * (d_last + 1) + 64
    X = np.concatenate([rng.normal(0.0, cfg.input_scale, size=(n, d0)), extra])
    return check_and_repair(layers, X, query(X), tol, confidence)


def fit_output_layer(
    query: QueryFn, layers: Sequence[pfx.Layer], d0: int, cfg: ExtractionConfig, rng: np.random.Generator,
    extra: FloatArray,
    floor: float = 1e-9,
) -> tuple[FloatArray, FloatArray]:
    """Least squares of ``f`` on the last hidden layer's activations (attack-notes §5), refitted without
    the points it misses far above ``floor`` (relative to ``max |f|``: what rounding and noise leave).
    Where a neuron the layers lack is on (a rarely active one the search did not find), ``f`` leaves the
    affine span of the features, and a plain fit through those points would be wrong everywhere
    (30-15-15-15-1 victim 6: two neurons on at 0.1% each, missing, and the fit off by 4e-2 at every
    input; the self-check's disagreements then no longer point at them)."""
    d_last = layers[-1][0].shape[0]
    n = 2 * (d_last + 1) + 64
    X = np.concatenate([rng.normal(0.0, cfg.input_scale, size=(n, d0)), extra])
    Y = query(X)
    _, H = pfx.forward(layers, X)
    D = np.concatenate([H, np.ones((H.shape[0], 1))], axis=1)
    coef = lstsq_dropping_misfits(D, Y, floor)
    return coef[:-1].T, coef[-1]


def _distinct_rows(
    rows: Sequence[NeuronRow], spare: Sequence[NeuronRow], width: int, refine: Callable[[NeuronRow], NeuronRow],
    witnesses: Sequence[Witness], same: float = 1e-6,
) -> list[NeuronRow]:
    """``rows`` without repeats, refilled up to ``width`` from ``spare`` (refined with ``refine``) with
    rows that are new once refined. Two rows are one neuron when they agree within ``same`` on the
    coordinates both have seen, or when nine in ten witnesses of one lie on the other (a row wrong in
    weights its points never saw on, or bent by a stray witness); the earlier row (better confirmed)
    stays."""
    out: list[NeuronRow] = []

    def one_neuron(a: NeuronRow, c: NeuronRow) -> bool:
        both = np.append(a.coverage & c.coverage, True)
        ka, kc = np.append(a.w, a.b)[both], np.append(c.w, c.b)[both]
        na, nc = float(np.linalg.norm(ka)), float(np.linalg.norm(kc))
        if na == 0 or nc == 0:
            return False
        dist = float(hyperplane_distance(ka / na, (kc / nc)[None, :])[0])
        if dist < same:
            return True
        if dist > 0.5:  # unit rows of two neurons sit ~1.4 apart; a bent copy stays close
            return False
        sample = a.members[:20]
        on = sum(on_neuron(witnesses[i], c, tol=1e-6) for i in sample)
        return len(sample) >= 2 and on >= 0.9 * len(sample)

    def is_new(r: NeuronRow) -> bool:
        return not any(one_neuron(r, x) or one_neuron(x, r) for x in out)

    for r in rows:
        if is_new(r):
            out.append(r)
    dropped = len(rows) - len(out)
    tries = 0
    for r in spare:
        if len(out) >= min(width, len(rows)) or tries >= 2 * dropped:
            break
        if not is_new(r):
            continue
        tries += 1
        r2 = refine(r)
        if is_new(r2):
            out.append(r2)
    if dropped:
        log.debug("%d repeated row(s) dropped, %d refilled", dropped, len(out) - (len(rows) - dropped))
    return out


def _reunify(rows: Sequence[NeuronRow], witnesses: Sequence[Witness]) -> list[NeuronRow]:
    out: list[NeuronRow] = []
    for r in rows:
        members = [i for i, wt in enumerate(witnesses)
                   if on_neuron(wt, r, tol=1e-5)
                   or (not r.complete and agrees_on_overlap(wt, r, tol=1e-8,
                                                            min_overlap=max(3, int(r.coverage.sum()) // 2)))]
        if len(members) < 2:
            out.append(r)
            continue
        new = robust_unify(witnesses, members)
        # A complete row only takes new witnesses that keep its witnesses in agreement.
        out.append(r if r.complete and new.residual > max(3.0 * r.residual, 1e-12) else new)
    return out


def _targeted_lines(
    layers: Sequence[pfx.Layer],
    todo: Sequence[tuple[int, NeuronRow]],
    witnesses: Sequence[Witness],
    d0: int,
    cfg: ExtractionConfig,
) -> tuple[FloatArray, FloatArray]:
    """Lines that cross a row's boundary where an unseen layer-input coordinate is active.

    From a witness of the row, walk along its (estimated) boundary in the direction that raises the
    unseen coordinate until that coordinate is active, then cross the boundary along its normal.
    """
    x0s: list[FloatArray] = []
    us: list[FloatArray] = []
    scale = cfg.input_scale * float(np.sqrt(d0))
    for _j, row in todo:
        wt = witnesses[row.members[0]]
        x = wt.x
        M, pre_jacs = pfx.jacobian(layers, x)
        n = row.w @ M  # gradient of the estimated pre-activation
        nn = float(np.linalg.norm(n))
        if nn == 0:
            continue
        n = n / nn
        for m in np.flatnonzero(~row.coverage)[:4]:
            g = pre_jacs[-1][m]  # gradient of the unseen coordinate's pre-activation
            d = g - (g @ n) * n
            if not np.any(d):
                continue
            d = d / np.linalg.norm(d)
            step = 0.01 * scale
            for _ in range(40):
                Zs, _ = pfx.forward(layers, (x + step * d)[None, :])
                if Zs[-1][0, m] > 0:
                    break
                step *= 1.5
            else:
                continue
            x0s.append(x + 1.5 * step * d)
            us.append(n)
    if not x0s:
        return np.zeros((0, d0)), np.zeros((0, d0))
    return np.asarray(x0s), np.asarray(us)


def _merge_kept(kept: Sequence[NeuronRow], good: Sequence[NeuronRow]) -> list[NeuronRow]:
    """``kept`` plus the rows of ``good`` that are new (a kept row is replaced by a better-supported
    measurement of the same hyperplane)."""
    out = list(kept)
    for r in good:
        key = np.append(r.w, r.b)
        if out:
            dist = hyperplane_distance(key, np.stack([np.append(x.w, x.b) for x in out]))
            j = int(np.argmin(dist))
            if float(dist[j]) < 1e-4:
                if len(r.members) > len(out[j].members):
                    out[j] = r
                continue
        out.append(r)
    return out


def _with_kept(
    kept: Sequence[NeuronRow],
    rows: Sequence[NeuronRow],
    lines: Sequence[LineKinks],
    layers: Sequence[pfx.Layer],
    is_last: bool = False,
) -> tuple[list[NeuronRow], list[int], int]:
    """The candidate rows with every kept row among them (kept first), their scores, and how many kept
    rows lead the list. A kept row that now misses more than a tenth of its crossings is dropped: a
    real neuron misses only where everything after it is off, a row wrong in a weight rarely seen on
    misses wherever that coordinate is on."""
    if kept:
        sc, miss = _score_rows(kept, lines, layers, is_last)
        hits = sc + 2 * miss
        kept = [r for r, ok in zip(kept, mostly_confirmed(hits, miss), strict=True) if ok]
    if not kept:
        return list(rows), list(_score_rows(rows, lines, layers, is_last)[0]) if rows else [], 0
    keys = np.stack([np.append(x.w, x.b) for x in kept])
    rest = [r for r in rows if float(np.min(hyperplane_distance(np.append(r.w, r.b), keys))) >= 1e-4]
    merged = [*kept, *rest]
    return merged, list(_score_rows(merged, lines, layers, is_last)[0]), len(kept)


def _score_rows(
    cand: Sequence[NeuronRow], lines: Sequence[LineKinks], layers: Sequence[pfx.Layer], is_last: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Per row: confirmed crossings minus twice the missed ones, and the misses. In the last hidden
    layer (no deeper neuron can fake a row there) a row's unseen weights, fitted later from the
    output, excuse the crossings it misses where those coordinates are on."""
    W = np.stack([r.w for r in cand])
    b = np.array([r.b for r in cand])
    cov = np.stack([r.coverage for r in cand]) if is_last else None
    hits, misses = crossing_hits(W, b, lines, layers, coverage=cov)
    # A row fitted to a deeper neuron inside one region predicts crossings that are mostly not there;
    # a real neuron misses only where everything after it is off.
    return hits - 2 * misses, misses


def _complete(
    query: QueryFn,
    layers: Sequence[pfx.Layer],
    row: NeuronRow,
    witnesses: Sequence[Witness],
    d0: int,
    n_grid: int,
    cfg: ExtractionConfig,
    rel_tol: float,
) -> NeuronRow:
    anchors = np.stack([witnesses[i].x for i in row.members[:3]])
    c = complete_row(query, layers, row.w, row.b, row.coverage, anchors, d0,
                     cfg.input_scale * float(np.sqrt(d0)), n_grid, rel_tol)
    nrm = float(np.linalg.norm(np.append(c.w, c.b)))
    return dataclasses.replace(row, w=c.w / nrm, b=c.b / nrm, coverage=c.coverage)


def _polish(
    query: QueryFn,
    layers: Sequence[pfx.Layer],
    row: NeuronRow,
    witnesses: Sequence[Witness],
    d0: int,
    cfg: ExtractionConfig,
    rng: np.random.Generator,
) -> NeuronRow:
    anchors = np.stack([witnesses[i].x for i in row.members[:8]])
    got = refine_row(query, layers, row.w, row.b, anchors, d0, cfg, rng)
    if got is None:
        return row
    return dataclasses.replace(row, w=got.w, b=got.b, residual=got.residual)


def refine_row(
    query: QueryFn,
    layers: Sequence[pfx.Layer],
    w: FloatArray,
    b: float,
    anchors: FloatArray,
    d0: int,
    cfg: ExtractionConfig,
    rng: np.random.Generator,
    untrusted: np.ndarray | None = None,
    rel_tol: float | None = None,
) -> Polished | None:
    """A row refined on exact boundary points near ``anchors`` (attack-notes §3), unit-norm (None when
    the refinement kept it as given). ``untrusted``: weights known to be imprecise
    (:func:`relux.attack.polish.polish_row`). ``rel_tol``: the run's kink tolerance (for the
    completion of a suspect weight; the configured or float64 one when None)."""
    # A row's own points may be few or bunched (one walk's): a fit to points near them alone can leave a
    # weight that few of them see on fixed by a point or two, which then fit it exactly whatever its
    # error. Anchors spread over the inputs beside them (prefix bisection, no query) see more.
    spread = cfg.input_scale * float(np.sqrt(d0))
    fresh = estimated_boundary_points(layers, w, b, d0, cfg.input_scale, rng) if layers else anchors[:0]
    pol = polish_unit(query, layers, w, b, anchors, d0, spread, rng, fresh, untrusted)
    if not pol.ok and pol.fit is not None and pol.change <= 1e-3:
        # A row a little off (one finite-difference gradient near other boundaries) predicts its
        # boundary points a little off, and a few of those found are a neighbour's: the fit, though it
        # does not pass, is closer, and its predictions find the right ones.
        log.debug("polish kept the row (%s); again from its fit", pol.reason)
        pol = _polish_spread(query, layers, *pol.fit, anchors, d0, cfg, rng, untrusted)
    if not pol.ok and fresh.shape[0]:
        log.debug("polish kept the row (%s); again from %d spread anchors only", pol.reason, fresh.shape[0])
        pol = polish_unit(query, layers, w, b, anchors[:0], d0, spread, rng, fresh, untrusted)
    if layers and untrusted is None and pol.on_share is not None:
        # One weight far off (its coordinate rarely on where the row was measured) predicts every kink
        # where that coordinate is on outside its bracket, so the points found avoid it: the polish then
        # fails for too few points, or passes with that weight as it was (no point saw it).
        w0, b0 = (pol.w, pol.b) if pol.ok else (w, b)
        sus = suspect_coordinates(layers, w0, b0, d0, cfg.input_scale, pol.on_share, rng)
        if sus.any():
            log.debug("polish %s; again with coordinates %s free",
                      "passed" if pol.ok else f"kept the row ({pol.reason})", np.flatnonzero(sus).tolist())
            # a refit counts only where its points saw those coordinates on: points that avoid them fit
            # any weights there (a first polish that passed can be right, its anchors merely bunched
            # where they are off)
            again = _refit_free(query, layers, w0, b0, anchors, d0, cfg, rng, sus, rel_tol)
            pol = again if again is not None else pol
    if not pol.ok:
        log.debug("polish kept the row: %s", pol.reason)
        return None
    log.debug("polish: %d points, %d dropped, residual %.1e, change %.1e", pol.points, pol.dropped, pol.residual,
              pol.change)
    return pol


def _refit_free(
    query: QueryFn,
    layers: Sequence[pfx.Layer],
    w: FloatArray,
    b: float,
    anchors: FloatArray,
    d0: int,
    cfg: ExtractionConfig,
    rng: np.random.Generator,
    free: np.ndarray,
    rel_tol: float | None = None,
) -> Polished | None:
    """The weights of ``free`` read again: the polish with them allowed any change (their kinks searched
    in wide brackets), then again from its fit with every weight held; where that fails, completed
    from kinks where each coordinate switches on along the boundary, as if no witness had seen them
    (:func:`relux.attack.complete.complete_row`, from points where every one of them is off), then
    polished with every weight held. A result counts only when the last polish passed and saw every
    one of those coordinates on at three exact points or more (else None)."""
    def seen(pol: Polished) -> bool:
        return bool(pol.ok and pol.on_share is not None and np.all(np.rint(pol.on_share[free] * pol.points) >= 3))

    pol = _polish_spread(query, layers, w, b, anchors, d0, cfg, rng, free)
    fit = (pol.w, pol.b) if pol.ok else pol.fit if pol.fit is not None and pol.change <= 1e-3 else None
    if fit is not None:
        pol = _polish_spread(query, layers, *fit, anchors, d0, cfg, rng)
        if seen(pol):
            return pol
    P = np.concatenate([anchors, estimated_boundary_points(layers, w, b, d0, cfg.input_scale, rng, n=64)])
    _, H = pfx.forward(layers, P)
    off = P[~(H[:, free] > 0).any(axis=1)]
    if not off.shape[0]:
        return None
    n_grid = int(cfg.grid_per_neuron * sum(W.shape[0] for W, _ in layers)) + 16
    if rel_tol is None:
        rel_tol = cfg.kink_rel_tol if cfg.kink_rel_tol is not None else 2.0**-36
    c = complete_row(query, layers, np.where(free, 0.0, w), b, ~free, off, d0, cfg.input_scale * float(np.sqrt(d0)),
                     n_grid, rel_tol, max_anchors=8)
    if not c.coverage.all():
        return None
    # from points spread over the completed boundary, which see those coordinates on as often as it
    # has them on
    pol = _polish_spread(query, layers, c.w, c.b, off[:0], d0, cfg, rng, n=16)
    return pol if seen(pol) else None


def _polish_spread(
    query: QueryFn,
    layers: Sequence[pfx.Layer],
    w: FloatArray,
    b: float,
    anchors: FloatArray,
    d0: int,
    cfg: ExtractionConfig,
    rng: np.random.Generator,
    untrusted: np.ndarray | None = None,
    n: int = 8,
) -> Polished:
    """:func:`relux.attack.polish.polish_unit` from ``anchors`` and ``n`` points spread over the row's
    estimated boundary (:func:`relux.attack.polish.estimated_boundary_points`; none without a prefix)."""
    spread_anchors = estimated_boundary_points(layers, w, b, d0, cfg.input_scale, rng, n=n) if layers else None
    return polish_unit(query, layers, w, b, anchors, d0, cfg.input_scale * float(np.sqrt(d0)), rng, spread_anchors,
                       untrusted)


def _on_row(H: FloatArray, w: FloatArray, b: float, points: FloatArray) -> FloatArray:
    """The ``points`` (layer inputs ``H``) that lie on the boundary of row ``(w, b)``, to 1e-8 of the
    pre-activation's scale."""
    scale = float(np.linalg.norm(w)) * (np.linalg.norm(H, axis=1) + 1.0)
    out: FloatArray = points[np.abs(H @ w + b) <= 1e-8 * scale]
    return out


def complete_unseen(
    query: QueryFn,
    layers: Sequence[pfx.Layer],
    coverage: np.ndarray,
    points: FloatArray,
    d0: int,
    n_total: int,
    cfg: ExtractionConfig,
    rel_tol: float,
) -> tuple[list[pfx.Layer], np.ndarray]:
    """The last layer's weights on the coordinates its rows' witnesses never saw on (``~coverage``),
    read from exact kinks where the boundary crosses the region those coordinates are on
    (:func:`relux.attack.complete.complete_row`, attack-notes §3). ``points`` are the witnesses: each
    row's anchors are those on its boundary. Returns the layers and the coverage after; the weights
    still unseen are left for the output fit (:func:`complete_last_layer`)."""
    W, b = (np.array(a, dtype=float) for a in layers[-1])
    prefix = list(layers[:-1])
    cov = np.array(coverage, dtype=bool)
    n_grid = int(cfg.grid_per_neuron * n_total) + 16
    _, H = pfx.forward(prefix, points)
    for j in (int(i) for i in np.flatnonzero(~cov.all(axis=1))):
        anchors = _on_row(H, W[j], float(b[j]), points)
        if anchors.shape[0] == 0:
            continue
        c = complete_row(query, prefix, W[j], float(b[j]), cov[j], anchors, d0,
                         cfg.input_scale * float(np.sqrt(d0)), n_grid, rel_tol)
        log.debug("last layer row %d: completion filled %s, left %s", j, list(c.filled), c.reasons)
        W[j], b[j], cov[j] = c.w, c.b, c.coverage
    return [*prefix, (W, b)], cov


def polish_filled(
    query: QueryFn,
    layers: Sequence[pfx.Layer],
    filled: np.ndarray,
    points: FloatArray,
    d0: int,
    cfg: ExtractionConfig,
    rng: np.random.Generator,
) -> tuple[list[pfx.Layer], int]:
    """The last layer's rows refined on exact boundary points after the weights marked in ``filled``
    (rows x layer inputs) were fitted from the output (:func:`complete_last_layer`, precise only as
    far as its data see those coordinates on): the polish steers along each boundary to where a
    weakly seen coordinate is on (:func:`relux.attack.polish.polish_row`). Anchors are the ``points``
    on the row's boundary. Each row keeps its norm and sign; returns the layers and how many rows had
    every filled weight refitted (a polish whose points never saw a filled coordinate on keeps it)."""
    W, b = (np.array(a, dtype=float) for a in layers[-1])
    prefix = list(layers[:-1])
    done = 0
    _, H = pfx.forward(prefix, points)
    for j in (int(i) for i in np.flatnonzero(filled.any(axis=1))):
        on = _on_row(H, W[j], float(b[j]), points)
        if on.shape[0] == 0:
            continue
        got = refine_row(query, prefix, W[j], float(b[j]), on[:8], d0, cfg, rng, untrusted=filled[j])
        if got is None:
            continue
        nrm = float(np.linalg.norm(np.append(W[j], b[j])))
        W[j], b[j] = got.w * nrm, got.b * nrm
        if got.seen is not None and bool(got.seen[filled[j]].all()):
            done += 1
    return [*prefix, (W, b)], done


def _rank_rows(
    cand: Sequence[NeuronRow], lines: Sequence[LineKinks], layers: Sequence[pfx.Layer], is_last: bool = False
) -> tuple[list[NeuronRow], list[int]]:
    """Deduplicate candidate rows and sort them by confirmed crossings (hits minus twice the misses)."""
    if not cand:
        return [], []
    score, _ = _score_rows(cand, lines, layers, is_last)
    order = np.argsort(-score, kind="stable")
    rows: list[NeuronRow] = []
    scores: list[int] = []
    for i in order:
        r = cand[int(i)]
        key = np.append(r.w, r.b)
        if rows and np.min(hyperplane_distance(key, np.stack([np.append(x.w, x.b) for x in rows]))) < 1e-4:
            continue
        rows.append(r)
        scores.append(int(score[i]))
    return rows, scores


def _residual_limit(rows: Sequence[NeuronRow]) -> float:
    """Rows whose witnesses agree: residual within 30x the layer's typical one (never below 1e-8)."""
    if not rows:
        return 1e-8
    return max(1e-8, 30.0 * float(np.median([r.residual for r in rows])))


def _good(rows: Sequence[NeuronRow], score: Sequence[int]) -> list[NeuronRow]:
    # the typical residual of confirmed rows only: candidates fitted to mixed witnesses must not move it
    confirmed = [r for r, sc in zip(rows, score, strict=True) if r.complete and sc >= 3]
    limit = _residual_limit(confirmed or rows)
    return [r for r, sc in zip(rows, score, strict=True)
            if r.complete and sc >= 3 and r.gap >= 1e3 and r.residual <= limit]


def _build_rows(
    witnesses: Sequence[Witness],
    chains: Sequence[Sequence[int]],
    lines: Sequence[LineKinks],
    layers: Sequence[pfx.Layer],
    rng: np.random.Generator,
    width: int,
    triples: bool = True,
    is_last: bool = False,
    grouping: Grouping | None = None,
) -> tuple[list[NeuronRow], list[int]]:
    """Candidate rows from every source (agreeing partial signatures, traced chains, triples), merged
    and ranked by confirmed crossings. ``grouping`` carries the grouping and the groups' rows over
    from earlier calls on the same (growing) witness list; the result is the same."""
    grouped = grouping.update(witnesses) if grouping is not None else group_witnesses(witnesses)
    groups = [g for g in grouped if len(g) >= 2]
    memo = grouping.rows if grouping is not None else {}
    base = []
    for g in groups:  # a group's row depends on its members only (cleared when the list is regrouped)
        key = tuple(g)
        if key not in memo:
            memo[key] = robust_unify(witnesses, g)
        base.append(memo[key])
    if grouping is not None:  # only the current groups' rows can be asked for again
        grouping.rows = {tuple(g): memo[tuple(g)] for g in groups}
    base += [unify(witnesses, list(c)) for c in chains]
    explained: set[int] = set()
    for r in base:
        if r.complete:
            explained.update(r.members)
    if triples:
        pool = [i for i in range(len(witnesses)) if i not in explained]
        base += ransac_rows(witnesses, pool, rng, trials=20 * width)
    return _rank_rows(merge_rows(base, witnesses), lines, layers, is_last)


def complete_last_layer(
    layers: Sequence[pfx.Layer],
    coverage: np.ndarray,
    X: FloatArray,
    Y: FloatArray,
    iterations: int = 30,
) -> tuple[list[pfx.Layer], int]:
    """Weights of the last hidden layer that no kink can show, from the output instead.

    A neuron whose boundary never enters the region where layer-input coordinate ``m`` is on is
    active (or inactive) throughout that region, so its weight on ``m`` only adds a linear term in
    ``h_m`` there: a least-squares fit of ``f`` on ``[ReLU(ẑ), h, 1]`` measures it as the coefficient
    of ``h_m``. Each unseen weight is updated from that coefficient and the neuron's output weight
    until the linear term vanishes. Returns the layers and the number of weights filled in.
    """
    W, b = (np.array(a) for a in layers[-1])
    missing = ~coverage
    if not missing.any():
        return list(layers), 0
    _, Hin = pfx.forward(layers[:-1], X)
    for _ in range(iterations):
        Z = Hin @ W.T + b
        D = np.concatenate([np.maximum(Z, 0.0), Hin, np.ones((X.shape[0], 1))], axis=1)
        coef = lstsq(D, Y)
        a = coef[: W.shape[0]].T  # (k, m) output weights
        gamma = coef[W.shape[0] : W.shape[0] + Hin.shape[1]].T  # (k, d_in) leftover linear terms
        step = 0.0
        for m_idx in np.flatnonzero(missing.any(axis=0)):
            rows = np.flatnonzero(missing[:, m_idx])
            # the leftover linear term of coordinate m, shared by the rows that lack it (least squares)
            A = a[:, rows]
            upd = lstsq(A, gamma[:, m_idx])
            W[rows, m_idx] += upd
            step = max(step, float(np.max(np.abs(upd))))
        if step <= 1e-15 * float(np.max(np.abs(W))):
            break
    return [*layers[:-1], (W, b)], int(missing.sum())
