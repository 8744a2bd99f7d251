"""Search lines along which every known neuron is on (attack-notes §3, "space of control").

A witness of layer ``i`` sees its neuron's weights only on the layer-``(i-1)`` neurons active there,
and only through the prefix's local Jacobian: on a random line about half of each layer is off, so a
single witness shows about half a row, and rows must be pieced together from many witnesses whose
active sets cover each other (CM24 §3.2; LSELBP26 on the rank loss). Where every known neuron is on,
the prefix is one affine map ``z = A x + c``; when the block of ``A`` for layer ``i - 1`` has full
row rank, one witness there shows the whole row.

That region, ``{x : A x + c ≥ margin}``, is a convex polyhedron (empty when the linear program finds
no point in it). It is thin but long: behind the 256-wide layers of a CIFAR-scale network, random
directions leave it within 1% of the input scale once two layers are known, while chords between
two of its vertices are tens of times longer and cross dozens of next-layer boundaries. So lines are
chords between vertices, inside a box, where neurons of the last known layer are lowest or highest
(linear programs; :func:`active_lines` says which). By convexity every point of a chord is in
the region. No queries are made here.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import linprog

from relux.attack import prefix as pfx
from relux.attack.simplex import dense_vertex
from relux.oracle.base import FloatArray
from relux.parallel import Executor, map_rows

log = logging.getLogger(__name__)

#: Each end of a chord is pulled in by this fraction of its length: a vertex lies on some neuron's
#: margin, and the kink search needs the line's ends clear of the region's edge.
END_TRIM = 1e-3


@dataclass(frozen=True)
class ActiveLines:
    """Lines ``x0 + t u`` (``u`` of norm ``scale``, ``|t| ≤ half[i]`` for line ``i``) along which every
    known neuron is on; ``reason`` says why fewer than asked were found (empty when all were)."""

    x0: FloatArray
    u: FloatArray
    half: FloatArray
    reason: str = ""


def all_on_map(layers: Sequence[pfx.Layer]) -> tuple[FloatArray, FloatArray]:
    """Every known pre-activation as an affine map of the input where every known neuron is on:
    ``(A, c)`` with one row per neuron, layers stacked in order."""
    return cell_map(layers, None)


def cell_map(layers: Sequence[pfx.Layer], masks: Sequence[np.ndarray] | None) -> tuple[FloatArray, FloatArray]:
    """Every known pre-activation as an affine map of the input where layer ``j``'s neurons are on
    where ``masks[j]`` is true and off elsewhere (an off neuron passes zero on; a layer without a mask,
    or all when ``masks`` is None, is all on): ``(A, c)`` with one row per neuron, layers stacked in
    order. Inside such a cell the prefix is affine (CJM20 §2, a linear region)."""
    d = layers[0][0].shape[1]
    M = np.eye(d)
    m = np.zeros(d)
    As: list[FloatArray] = []
    cs: list[FloatArray] = []
    for j, (W, b) in enumerate(layers):
        M = W @ M
        m = W @ m + b
        As.append(M)
        cs.append(m)
        if masks is not None and j < len(masks):
            on = np.asarray(masks[j], dtype=float)
            M, m = M * on[:, None], m * on
    return np.concatenate(As), np.concatenate(cs)


def cell_masks(
    layers: Sequence[pfx.Layer], on: np.ndarray | None, before: Sequence[np.ndarray] | None = None,
) -> list[np.ndarray]:
    """One mask per layer: ``before`` for the layers before the last and ``on`` for the last, a layer
    all on where it is None."""
    masks = [np.ones(W.shape[0], dtype=bool) for W, _ in layers[:-1]] if before is None else \
        [np.asarray(m, dtype=bool) for m in before]
    masks.append(np.ones(layers[-1][0].shape[0], dtype=bool) if on is None else np.asarray(on, dtype=bool))
    return masks


def cell_constraints(layers: Sequence[pfx.Layer], masks: Sequence[np.ndarray]) -> tuple[FloatArray, FloatArray]:
    """The cell where each layer follows its mask as ``A x + c ≥ 0``: :func:`cell_map` with an off
    neuron's row negated."""
    A, c = cell_map(layers, masks)
    s = np.where(np.concatenate(masks), 1.0, -1.0)
    return A * s[:, None], c * s


def region_margin(A: FloatArray, c: FloatArray, box: float) -> FloatArray:
    """The margin each neuron keeps inside the region: ``1e-6`` of its pre-activation's range over the
    box, so that rounding in the prefix cannot switch it off."""
    out: FloatArray = 1e-6 * (box * np.abs(A).sum(axis=1) + np.abs(c))
    return out


def vertex(
    A: FloatArray, c: FloatArray, box: float, margin: FloatArray, objective: FloatArray,
    start: FloatArray | None = None,
) -> FloatArray | None:
    """The point of ``{x : A x + c ≥ margin, |x_i| ≤ box}`` that maximises ``objective · x`` (a vertex),
    or None when that set is empty. ``start``: a point inside that set, from which a dense primal
    simplex finds the vertex (:func:`relux.attack.simplex.dense_vertex`, 2.5-4.5x faster than HiGHS on
    the CIFAR-scale regions) when it is the unique optimum; HiGHS solves it otherwise (a face, as
    where a neuron of the region is lowest, or a near-tie), or without a start."""
    if start is not None:
        x, info = dense_vertex(A, c, margin, box, objective, start)
        if x is not None:
            return x
        log.debug("vertex: the dense simplex gave up (%s); HiGHS solves it", info.reason)
    res = linprog(-objective, A_ub=-A, b_ub=c - margin, bounds=[(-box, box)] * A.shape[1], method="highs")
    if res.status != 0:
        return None
    return np.asarray(res.x, dtype=float)


@dataclass
class AllOnRegion:
    """The region where every known neuron is on (or the last layer's follow a pattern,
    :func:`pattern_region`), inside ``[-box, box]^d``: ``A x + c ≥ margin``, a point deep inside it
    (``centre``, the centre of the largest ball in it)."""

    A: FloatArray
    c: FloatArray
    margin: FloatArray
    box: float
    centre: FloatArray
    depth: float  # radius of that ball


def all_on_region(layers: Sequence[pfx.Layer], box: float) -> AllOnRegion | None:
    """The all-on region of ``layers`` inside the box, or None when it is empty (the largest ball in it
    has no radius)."""
    return pattern_region(layers, box, None)


def pattern_region(
    layers: Sequence[pfx.Layer], box: float, on: np.ndarray | None, before: Sequence[np.ndarray] | None = None,
) -> AllOnRegion | None:
    """The region inside the box where every neuron of the layers before the last is on (or follows
    ``before``, one mask per layer before the last) and the last layer's neurons are on where ``on`` is
    true and off elsewhere (all on when ``on`` is None), or None when it is empty. The prefix is one
    affine map there too (:func:`cell_map`). Its constraints are kept as ``A x + c ≥ margin`` with an
    off neuron's row negated, so that the chords and tips (:func:`active_lines`, :func:`tip_lines`)
    run in it unchanged."""
    A, c = cell_constraints(layers, cell_masks(layers, on, before))
    margin = region_margin(A, c, box)
    depth, centre = largest_ball(A, c, margin, box)
    if centre is None or depth <= 0.0:
        return None
    return AllOnRegion(A, c, margin, box, centre, depth)


def largest_ball(
    A: FloatArray, c: FloatArray, margin: FloatArray, box: float,
    plane: tuple[FloatArray, float] | None = None, loose: np.ndarray | None = None, cap: float = 0.0,
) -> tuple[float, FloatArray | None]:
    """The radius of the largest ball in ``{x : A x + c ≥ margin, |x_i| ≤ box}`` and its centre (a
    linear program; 0 and None when the set is empty). ``plane = (g, g0)``: the centre must lie on
    ``g · x + g0 = 0``. ``loose`` (a mask over the rows): those rows need only hold at the centre,
    and there be at most ``cap`` times the radius from their boundary
    (:func:`relux.attack.cell_fill.fill_in_cells`)."""
    d = A.shape[1]
    nrm = np.linalg.norm(A, axis=1)
    # max s: A x + c - margin >= s |A_i|, |x_i| <= box - s
    if loose is None:
        A_ub = np.block([[-A, nrm[:, None]], [np.eye(d), np.ones((d, 1))], [-np.eye(d), np.ones((d, 1))]])
        b_ub = np.concatenate([c - margin, np.full(2 * d, box)])
    else:
        lo = np.asarray(loose, dtype=bool)
        A_ub = np.block([[-A, np.where(lo, 0.0, nrm)[:, None]], [A[lo], -cap * nrm[lo][:, None]],
                         [np.eye(d), np.ones((d, 1))], [-np.eye(d), np.ones((d, 1))]])
        b_ub = np.concatenate([c - margin, margin[lo] - c[lo], np.full(2 * d, box)])
    eq = {} if plane is None else {"A_eq": np.append(plane[0], 0.0)[None, :], "b_eq": np.array([-plane[1]])}
    res = linprog(np.append(np.zeros(d), -1.0), A_ub=A_ub, b_ub=b_ub, bounds=[(None, None)] * d + [(0.0, box)],
                  method="highs", **eq)
    if res.status != 0:
        return 0.0, None
    return float(res.x[d]), np.asarray(res.x[:d], dtype=float)


def _segment(a: FloatArray, b: FloatArray, scale: float) -> tuple[FloatArray, FloatArray, float] | None:
    """The segment from ``a`` to ``b`` as a line ``x0 + t u`` (``u`` of norm ``scale``, ``|t| ≤ half``,
    each end trimmed by ``END_TRIM`` of its length), or None when the two are one point."""
    nv = float(np.linalg.norm(b - a))
    if nv == 0.0:
        return None
    return 0.5 * (a + b), (b - a) * (scale / nv), 0.5 * (1.0 - 2 * END_TRIM) * nv / scale


def active_lines(
    region: AllOnRegion,
    n_lines: int,
    scale: float,
    rng: np.random.Generator,
    d_last: int | None = None,
    facets: Sequence[int] = (),
    executor: Executor | None = None,
) -> ActiveLines:
    """``n_lines`` chords of ``region`` (module docstring); ``u`` has norm ``scale`` and line ``i`` spans
    ``|t| ≤ half[i]``. Two kinds alternate, both built from the neurons of the last known layer
    (``d_last`` neurons: the last rows of ``region.A``; the whole stack by default):

    - *across*: the two vertices where one such neuron is lowest and highest, the objective tilted at
      random (a quarter of its norm) so that a neuron drawn twice gives a new chord. A next-layer
      neuron leans on some neurons of the layer before, so the chord between their extremes crosses
      it.
    - *between facets*: the vertices where two different such neurons are lowest, untilted, so that
      each lies on its neuron's facet of the region (that neuron at its margin): a corner. A
      next-layer neuron whose zero lies near one end of its range over the region is crossed only by
      chords that reach such corners, while the two ends of an *across* chord stay in step along one
      direction. Behind the true first two layers of the CIFAR-scale unitary network, 48 *across*
      chords crossed 4 of the 20 least-crossed layer-3 neurons twice and 48 *between facets* chords
      17 (tilting their objectives too brought it back to 2); behind three layers the *across* chords
      did better (228 of 256 neurons crossed twice against 202), and the two kinds alternating did
      well at both depths (250 and 226).

    Chords sharing a vertex meet one deeper neuron's kinks near it under the same activation pattern,
    where its keys agree (:mod:`relux.attack.all_on_layer` confirms a row only on kinks far apart), so
    ``facets`` lists the neurons whose vertices end the *between facets* chords, two per chord in
    order (a caller passes each neuron once while it can); when they run out, neurons are drawn at
    random. Each end is pulled towards the centre by a random 1-3% of the way. A chord's two vertices
    are found side by side on two of ``executor``'s workers."""
    A, box = region.A, region.box
    d = A.shape[1]
    last = A[-(d_last or A.shape[0]):]
    last = last / np.maximum(np.linalg.norm(last, axis=1, keepdims=True), np.finfo(float).tiny)
    x0s: list[FloatArray] = []
    us: list[FloatArray] = []
    halves: list[float] = []
    tries = 0
    queue = [int(m) for m in facets]
    while len(x0s) < n_lines and tries < 4 * n_lines:  # two objectives may pick one vertex (few in low d)
        tries += 1
        ends: list[FloatArray | None] = [None, None]
        if len(x0s) % 2 == 1 and last.shape[0] >= 2:
            pair = queue[:2] if len(queue) >= 2 else rng.choice(last.shape[0], 2, replace=False).tolist()
            del queue[:2]
            ends = _vertex_pair(region, -last[pair[0]], -last[pair[1]], executor)
        if ends[0] is None or ends[1] is None or np.linalg.norm(ends[1] - ends[0]) <= 1e-9 * box * np.sqrt(d):
            # an across chord (also in place of a facet chord whose two neurons are lowest at one
            # vertex, as happens in few dimensions: pulled in by different amounts, a sliver)
            g = last[rng.integers(last.shape[0])] + 0.25 * rng.standard_normal((d,)) / np.sqrt(d)
            ends = _vertex_pair(region, -g, g, executor)
        if ends[0] is None or ends[1] is None:
            continue
        # a vertex lies on some neurons' margins: pulled a little of the way to the centre, the chord
        # is strictly inside
        pa, pb = rng.uniform(0.01, 0.03, size=2)
        a = (1.0 - pa) * ends[0] + pa * region.centre
        b = (1.0 - pb) * ends[1] + pb * region.centre
        seg = _segment(a, b, scale)
        if seg is None:
            continue
        x0s.append(seg[0])
        us.append(seg[1])
        halves.append(seg[2])
    reason = "" if len(x0s) == n_lines else f"{len(x0s)} of {n_lines} chords found"
    return ActiveLines(np.array(x0s).reshape(-1, d), np.array(us).reshape(-1, d), np.array(halves), reason)


#: How far into the region a tip reaches, as a fraction of the way from its vertex to its target.
#: Behind the true first two layers of the CIFAR-scale unitary network, the zero of each of the five
#: least-crossed layer-3 neurons lies 0.04-0.5 of the way from a vertex where it has its rarer sign to
#: the centre, mostly below a quarter (neuron 10: rarer at 2 of the 512 facet vertices, zero at 0.05
#: and 0.16 of the way); a quarter keeps a tip at about a tenth of a chord's kinks.
TIP_REACH = 0.25
#: Where a tip starts: this fraction of the way in from its vertex (which lies on some margins).
TIP_START = 2e-3


def _vertices(
    item: tuple[FloatArray, FloatArray, float, FloatArray, FloatArray, FloatArray],
) -> list[FloatArray | None]:
    """:func:`vertex` for each row of the objectives ``G``, from the region's centre (a task of
    :func:`facet_vertices`, or one end of a chord)."""
    A, c, box, margin, centre, G = item
    return [vertex(A, c, box, margin, g, start=centre) for g in G]


def _vertex_pair(
    region: AllOnRegion, g1: FloatArray, g2: FloatArray, executor: Executor | None
) -> list[FloatArray | None]:
    """The vertices of ``region`` that maximise ``g1`` and ``g2``, on two workers when there are."""
    return map_rows(executor, _vertices, np.stack([g1, g2]), region.A, region.c, region.box, region.margin,
                    region.centre)


def facet_vertices(region: AllOnRegion, d_last: int, executor: Executor | None = None) -> FloatArray:
    """The vertices of ``region`` where each of the last known layer's ``d_last`` neurons is lowest and
    highest (linear programs, no queries), without repeats: ``(n, d)``, ``n ≤ 2 d_last``. The linear
    programs are split among ``executor``'s workers (behind a 256-wide CIFAR layer, 512 of them take
    about 7 minutes on one core); the vertices do not depend on how."""
    A, c, margin, box = region.A, region.c, region.margin, region.box
    last = A[-d_last:] if d_last > 0 else A
    last = last / np.maximum(np.linalg.norm(last, axis=1, keepdims=True), np.finfo(float).tiny)
    solved = map_rows(executor, _vertices, np.concatenate([-last, last]), A, c, box, margin, region.centre)
    found = [v for v in solved if v is not None]
    if not found:
        return np.zeros((0, A.shape[1]))
    V = np.stack(found)
    tol = 1e-9 * box * np.sqrt(A.shape[1])
    keep = [i for i in range(V.shape[0]) if not np.any(np.linalg.norm(V[:i] - V[i], axis=1) <= tol)]
    out: FloatArray = V[keep]
    return out


def corner_scores(Z: FloatArray) -> FloatArray:
    """How much each vertex is a corner, from ``Z`` (vertices x neurons: the known next-layer neurons'
    values there): the sum, over neurons, of ``1 / (vertices where the neuron has its rarer sign)``
    where this vertex is one of them. Corners are shared: behind the true first two layers of the
    CIFAR-scale unitary network, the two vertices (of 512) where layer-3 neuron 10 is negative ranked
    2nd and 22nd by the other 255 neurons' scores, and the rarest five neurons' rarer-sign vertices
    mostly in the first 40."""
    S = Z > 0
    rare = S != (S.mean(axis=0) > 0.5)[None, :]
    out: FloatArray = rare @ (1.0 / np.maximum(rare.sum(axis=0), 1))
    return out


def tip_lines(
    region: AllOnRegion, vertices: FloatArray, scale: float, partners: FloatArray | None = None,
) -> ActiveLines:
    """Two short lines (*tips*) from each of ``vertices`` (rows; :func:`facet_vertices`): one towards
    the centre, one towards the middle of the centre and its partner (row ``i`` of ``partners``, by
    default the next of ``vertices``), each reaching ``TIP_REACH`` of the way (attack-notes §3). A
    next-layer neuron whose sign at nearly every vertex is the same is switched only in small
    corners of the region; a chord crosses it only when one of its ends lies in such a corner, and
    then once. Both tips of a corner's vertex cross it when its zero is within their reach, at
    points of its boundary where the layer's known neurons differ
    (:func:`relux.attack.all_on_layer.all_on_rows` confirms a row on such a pair). ``u`` has norm
    ``scale``; line ``i`` spans ``|t| ≤ half[i]``. No queries are made."""
    d = region.A.shape[1]
    tol = 1e-9 * region.box * np.sqrt(d)
    x0s: list[FloatArray] = []
    us: list[FloatArray] = []
    halves: list[float] = []
    n = vertices.shape[0]
    for i, v in enumerate(vertices):
        other = partners[i] if partners is not None else vertices[(i + 1) % n]
        targets = [region.centre]
        if np.linalg.norm(other - v) > tol:  # else both tips would be one line
            targets.append(0.5 * (region.centre + other))
        for target in targets:
            seg = _segment(v + TIP_START * (target - v), v + TIP_REACH * (target - v), scale)
            if seg is None:
                continue
            x0s.append(seg[0])
            us.append(seg[1])
            halves.append(seg[2])
    want = 2 * n
    reason = "" if len(x0s) == want else f"{len(x0s)} of {want} tips found"
    return ActiveLines(np.array(x0s).reshape(-1, d), np.array(us).reshape(-1, d), np.array(halves), reason)
