"""The first hidden layer of a deeper network (attack-notes §2-3, CJM20 §4.2).

A first-layer neuron's boundary is a true hyperplane of the input space, so the one-layer discovery
applies unchanged: every signature is confirmed by the crossings it predicts on all search lines,
which kinks of deeper neurons (bent boundaries) fail. Refinement differs: the boundaries of deeper
neurons are unknown, so a probe can cross one unseen. Each row is therefore measured twice, at two
base points, and a measurement is accepted only when both agree; rows whose measurements never agree
keep the discovery estimate and are reported.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from relux.attack.config import ExtractionConfig
from relux.attack.deep import LayerOutcome
from relux.attack.first_layer import RefinedRow, discover_first_layer, refine_first_layer
from relux.attack.hyperplanes import stack_signatures
from relux.attack.polish import polish_row
from relux.attack.wiggle import wiggle_signs
from relux.oracle.base import FloatArray, QueryFn
from relux.parallel import Executor

log = logging.getLogger(__name__)

#: Random directions of a kink's sketch (:func:`relux.attack.first_layer.discover_first_layer`): two
#: jumps of different neurons agree in this many random projections only by accident (never, at 1e-4).
SKETCH_DIM = 24


@dataclass(frozen=True)
class FirstLayer:
    """Unit rows ``(W, b)`` of the first hidden layer (signs not yet decided) and how they were measured."""

    W: FloatArray
    b: FloatArray
    points: FloatArray  # a witness on each hyperplane
    refined: np.ndarray  # rows whose refinement was confirmed by a second measurement
    agreement: FloatArray  # distance between the two accepted measurements (inf when not refined)
    lines: int
    kinks: int


def _distance(r1: RefinedRow, r2: RefinedRow) -> float:
    v1 = np.append(r1.w, r1.b)
    v2 = np.append(r2.w, r2.b)
    return float(min(np.linalg.norm(v1 - v2), np.linalg.norm(v1 + v2)))


def _reach(attempt: int) -> float:
    """Scale of the probe radius and the steps in refinement round ``attempt``: 1/4, 1/8, 1/16, ... (the
    radius is this fraction of half the clearance). Smaller probes cross fewer unseen boundaries (their
    rounding grows only as fast as the steps shrink). Every round uses its own step size: two rounds
    with the same steps at nearby base points can cross the same unseen boundary along the same
    coordinates and agree on a wrong row."""
    return 2.0 ** -(attempt + 2)


#: Largest number of boundary points (about ``2 (d0 + 1)`` a row) spent polishing every first-layer row
#: of a deep network; beyond it only the rows whose two measurements disagreed are polished.
POLISH_ALL_POINTS = 2**18


def _agreement_tol(r1: RefinedRow, r2: RefinedRow) -> float:
    """How far apart two clean measurements of one row may be, relative to its norm: ``1e-9``, or more
    when their own precision is coarser, namely the rounding expected from their steps
    (:attr:`RefinedRow.noise`; the measured error stays within 8 times it). A probe that crossed an
    unseen boundary is off by orders of magnitude more (attack-notes §3); a jump that is not rank one
    is no reason to widen the bound (that is how such a crossing shows)."""
    return max(1e-9, 16.0 * (r1.noise + r2.noise))


def first_layer_of_deep(
    query: QueryFn,
    d0: int,
    width: int,
    total_hidden: int,
    cfg: ExtractionConfig,
    rng: np.random.Generator,
    rel_tol: float,
    attempts: int = 6,
    executor: Executor | None = None,
    polish_all: bool = False,
) -> FirstLayer:
    """Discover and refine the first hidden layer of a network with ``total_hidden`` hidden neurons.

    Search lines are gridded for the kinks of every layer (``total_hidden``), not only the first.
    A refined row is accepted when two measurements at different base points agree to within their
    own precision (:func:`_agreement_tol`: ``1e-9`` of the row's norm or the rounding their steps
    imply, whichever is larger; a probe that crossed an unseen boundary is off by far more) and each
    passed the refinement's own checks (it moved by at most ``1e-3`` from the discovery estimate).
    Rows that never agree are fitted to exact points of their hyperplane (:mod:`relux.attack.polish`);
    with ``polish_all`` every row is, since a gradient measurement is precise to about ``1e-10`` only
    and each deeper layer's own fit inherits the prefix's error (unless that would take more than
    :data:`POLISH_ALL_POINTS` boundary points).
    """
    dcfg = cfg.replace(grid_per_neuron=cfg.grid_per_neuron * max(total_hidden, width) / width)
    # Deeper kinks outnumber first-layer ones: with a wide input, sketch each kink before paying for
    # its gradients (a sketch of SKETCH_DIM directions costs a fraction of a gradient only then).
    sketch = SKETCH_DIM if total_hidden > width and d0 >= 8 * SKETCH_DIM else 0
    sigs, info = discover_first_layer(query, d0, width, dcfg, rng, rel_tol, sketch_dim=sketch)
    if not sigs:
        from relux.errors import ExtractionFailed

        raise ExtractionFailed(
            "layer 1: no kink of f was confirmed as a first-layer hyperplane on any search line: expected the "
            "kinks of a ReLU network, found none; check the oracle and --input-scale"
        )
    W, b, starts = stack_signatures(sigs)
    n = W.shape[0]
    accepted = np.zeros(n, dtype=bool)
    agreement = np.full(n, np.inf)
    seen: list[list[RefinedRow]] = [[] for _ in range(n)]
    W_out, b_out, pts = W.copy(), b.copy(), starts.copy()
    for attempt in range(attempts):
        todo = [j for j in range(n) if not accepted[j]]
        if not todo:
            break
        st = starts.copy()
        if attempt:
            jitter = rng.normal(0.0, cfg.input_scale, size=(len(todo), d0)) * (0.05 * 2.0**attempt)
            st[todo] += jitter
        rows, _, _ = refine_first_layer(query, W, b, st, cfg, rng, only=todo, reach=_reach(attempt),
                                        check_segments=True, executor=executor)
        for j, row in zip(todo, rows, strict=True):
            if not row.ok:
                continue
            for p in seen[j]:
                dist = _distance(p, row)
                if dist <= _agreement_tol(p, row) * float(np.linalg.norm(np.append(row.w, row.b))):
                    best = row if row.noise <= p.noise else p  # the finer of the two agreeing measurements
                    accepted[j] = True
                    agreement[j] = dist
                    W_out[j], b_out[j], pts[j] = best.w, best.b, best.point
                    break
            seen[j].append(row)
    # Rows whose gradient measurements never agreed (or every row, with polish_all): fit them to exact
    # points of their hyperplane. A polish takes about 2 (d0 + 1) boundary points a row: past
    # POLISH_ALL_POINTS in all (a 3072-256 first layer needs 1.6 M) the agreed rows stay as measured.
    if polish_all and 2 * (d0 + 1) * n > POLISH_ALL_POINTS:
        log.info("layer 1: %d agreed rows kept as measured (polishing all would take about %d boundary points)",
                 int(accepted.sum()), 2 * (d0 + 1) * n)
        polish_all = False
    for j in range(n) if polish_all else (int(i) for i in np.flatnonzero(~accepted)):
        pol, _ = polish_row(query, [], W_out[j], float(b_out[j]), pts[j][None, :], d0,
                            cfg.input_scale * float(np.sqrt(d0)), rng)
        log.debug("layer 1 row %d: polish %s %s (%d points, %d dropped)", j, pol.ok, pol.reason, pol.points,
                  pol.dropped)
        if pol.ok:
            W_out[j], b_out[j] = pol.w, pol.b
            if not accepted[j]:  # an agreed row keeps its two measurements' distance as its agreement
                agreement[j] = pol.residual
            accepted[j] = True
    log.info("layer 1: %d/%d rows refined and confirmed", int(accepted.sum()), n)
    return FirstLayer(W_out, b_out, pts, accepted, agreement, info.lines, info.kinks)


def first_layer_outcome(
    query: QueryFn,
    d0: int,
    width: int,
    total_hidden: int,
    cfg: ExtractionConfig,
    rng: np.random.Generator,
    rel_tol: float,
    executor: Executor | None = None,
    polish_all: bool = False,
) -> LayerOutcome:
    """Layer 1 of a deep network as a :class:`~relux.attack.deep.LayerOutcome`: rows from
    :func:`first_layer_of_deep`, signs from the wiggle with no prefix (CM24 §4: the first layer is
    controllable wherever it is not wider than the input). The per-row refinement work runs on
    ``executor`` (serial by default; the result does not depend on it)."""
    fl = first_layer_of_deep(query, d0, width, total_hidden, cfg, rng, rel_tol, executor=executor,
                            polish_all=polish_all)
    ws = wiggle_signs(query, [], fl.W, fl.b, d0, cfg.input_scale, rng)
    W = fl.W * ws.signs[:, None]
    b = fl.b * ws.signs
    neurons = tuple(
        {"index": j, "refined": bool(fl.refined[j]), "refine_agreement": float(fl.agreement[j]),
         "sign": int(ws.signs[j]), "sign_confidence": float(ws.confidence[j])}
        for j in range(W.shape[0])
    )
    method = f"wiggle ({ws.controllable_points}/{ws.points} controllable points, {int(ws.decided.sum())} decided)"
    return LayerOutcome(W, b, fl.kinks, fl.lines, method, neurons, width - W.shape[0], fl.points,
                        np.asarray(ws.confidence, dtype=float), np.ones((W.shape[0], d0), dtype=bool),
                        float(np.max(fl.agreement[np.isfinite(fl.agreement)], initial=0.0)))
