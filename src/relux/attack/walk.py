"""Walking a next-layer boundary across a layer whose signs are unknown (the CM24 last-layer solve one
layer down; attack-notes §4, "every sign decision must be checked").

Layer ``i`` is known up to the sign of each row: ``ẑ_j = ŵ_j·h + b̂_j`` with ``h = h_{i-1}(x)`` from the
known prefix. Because ``ReLU(-ẑ) = ReLU(ẑ) - ẑ``, every neuron ``k`` of layer ``i+1`` is, whatever
those signs are,

    z'_k = Σ_j u_j ReLU(ẑ_j) + a·h + c,     a = -Σ_{j flipped} u_j ŵ_j,

linear in ``θ = (u, a, c)``. Each point found exactly on the boundary ``z'_k = 0`` is one linear
equation on ``θ``, and the signs follow from several neurons' ``(u, a)`` by the same binary solve as
the last hidden layer (:func:`relux.attack.signs.solve_flips`). No point of the layer needs to be
controllable, so this decides expansive layers, where the wiggle cannot.

Grouping exact points by neuron needs no signature: from a kink of ``k`` the walk steps along ``k``'s
local hyperplane just across the boundary of one prefix neuron ``m``; there ``z'_k`` gains
``μ·z_m`` (a multiple of ``m``'s affine pre-activation, sign-free), so one kink on a short line across
the new piece gives ``μ`` and a second, predicted one confirms it is still ``k``. Once the walk has
switched every neuron of layer ``i``, the null vector of the stacked features ``[ReLU(ẑ), h, 1]`` of
its points is ``θ``; kinks of deeper neurons bend at boundaries the prefix does not know, and their
walks fail the fit. A walk that stops earlier still counts for the signs: its points are fitted with
the neurons whose state varied, the others projected out (:mod:`relux.attack.walk_fit`), which also
lets a neuron of layer ``i`` that no kink showed appear as a leftover shared by every walk.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from relux.attack import prefix as pfx
from relux.attack.config import ExtractionConfig
from relux.attack.critical import LineKinks, find_kinks
from relux.attack.signs import SignSolution
from relux.attack.walk_fit import PartialFit, features, fit_partial, fit_theta, solve_walk_signs
from relux.attack.walk_system import StepFit, WalkSystem
from relux.attack.witnesses import Candidate, find_candidates, measure_candidates
from relux.oracle.base import FloatArray, QueryFn
from relux.parallel import Executor

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Walk:
    """One walk along a next-layer boundary. ``theta`` is unit-norm ``(u, a, c)`` when ``ok``."""

    theta: FloatArray
    points: FloatArray
    switched: np.ndarray  # neurons of layer i the walk crossed (signed: or fixed at its start)
    steps: int
    residual: float  # smallest / largest singular value of the point system
    gap: float  # second-smallest / smallest singular value
    ok: bool
    reason: str
    partial: PartialFit | None = None  # the walk's points as one row, complete or not


@dataclass(frozen=True)
class WalkOutcome:
    """Signs of layer ``i`` and rows of layer ``i+1`` (in the sign-corrected coordinates)."""

    flips: np.ndarray  # rows of layer i to negate
    confidence: FloatArray  # per neuron of layer i; 0 where no walk decided it
    decided: np.ndarray
    W_next: FloatArray  # (rows, n_i): rows of layer i+1 behind the corrected layer i
    b_next: FloatArray
    points: tuple[FloatArray, ...]  # exact boundary points of each row
    row_residual: FloatArray  # misfit of each row to its points
    walks: int
    complete_walks: int
    solution: SignSolution | None
    reason: str
    fits: tuple[PartialFit, ...] = ()  # the walks' partial fits that took part in the sign solve
    missing: FloatArray = field(default_factory=lambda: np.zeros((0, 0)))  # (p, r) missing rows' directions
    missing_on: FloatArray = field(default_factory=lambda: np.zeros((0, 0)))  # walk points, mostly where they are on
    own_rows: tuple[tuple[FloatArray, FloatArray], ...] = ()  # (row (w, b), exact points) of walks along layer i

    @property
    def partial_walks(self) -> int:
        """Walks whose partial fit took part in the sign solve."""
        return len(self.fits)


@dataclass
class _Chain:
    x: FloatArray  # current exact point on the boundary
    g: FloatArray  # gradient of z'_k in the current region (unit)
    points: list[FloatArray]
    switched: np.ndarray  # over every prefix neuron
    system: WalkSystem  # the points so far as equations on the row, with the start's normal
    skip: set[int] = field(default_factory=set)
    virtual: list[FloatArray] = field(default_factory=list)  # signed walks: points reached by prediction
    failed: bool = False  # signed walks: a point measured at the end contradicts the row
    saved: tuple[FloatArray, FloatArray, int] | None = None  # signed walks: where this step's teleports began
    no_teleport: int = 0  # signed walks: steps to take without teleports (after teleports led nowhere)
    steps: int = 0
    last_new: int = 0  # the step that last switched a neuron
    moves: int = 0  # signed walks: relocations after stalls (:func:`_relocate`)
    failures: int = 0
    done: bool = False
    reason: str = ""




def _first_crossings(z: FloatArray, G: FloatArray, d: FloatArray) -> tuple[int, float, float]:
    """Along ``x + t d``: the first prefix neuron crossed, when, and when the next one is crossed."""
    rate = G @ d
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(z * rate < 0, -z / rate, np.inf)
    order = np.argsort(t)
    t1 = float(t[order[0]])
    t2 = float(t[order[1]]) if t.size > 1 else np.inf
    return int(order[0]), t1, t2


def _plan(
    ch: _Chain, z: FloatArray, G: FloatArray, layer_idx: FloatArray, rng: np.random.Generator,
    nearest: int | None = None,
) -> tuple[FloatArray, int, float, float] | None:
    """:func:`_plan_target` without its target."""
    plan = _plan_target(ch, z, G, layer_idx, rng, nearest)
    return None if plan is None else plan[:4]


def _toward(z: FloatArray, G: FloatArray, n: FloatArray, j: int) -> tuple[FloatArray, int, float, float] | None:
    """The tangent direction (normal ``n``) towards neuron ``j``'s boundary, its first crossing, when,
    and when the next one is crossed (:func:`_plan_target` for one target)."""
    Pj = G[j] - float(G[j] @ n) * n
    nrm = float(np.linalg.norm(Pj))
    if nrm <= 1e-12 * float(np.linalg.norm(G[j])):
        return None
    d = Pj * ((-np.sign(z[j]) if z[j] != 0 else 1.0) / nrm)
    m1, t1, t2 = _first_crossings(z, G, d)
    return (d, m1, t1, t2) if np.isfinite(t1) else None


def _plan_target(
    ch: _Chain, z: FloatArray, G: FloatArray, layer_idx: FloatArray, rng: np.random.Generator,
    nearest: int | None = None,
) -> tuple[FloatArray, int, float, float, int] | None:
    """A tangent direction whose first crossing switches a layer-i neuron the walk has not switched
    (the nearest such), else one towards the nearest unswitched neuron whatever it crosses first.
    After failures, a random tangent direction (to look again from another region). ``nearest``:
    consider only that many unswitched neurons, the nearest along the boundary. Returns the direction,
    its first crossing, when, when the next one is crossed, and the neuron aimed at (-1: none)."""
    n = ch.g
    free = layer_idx[~ch.switched[layer_idx]]
    todo = [int(j) for j in free if int(j) not in ch.skip] if ch.skip else free.tolist()
    if (ch.failures >= 3 and ch.failures % 2 == 1) or not todo:
        d = rng.normal(size=n.size)
        d -= (d @ n) * n
        d /= float(np.linalg.norm(d))
        m1, t1, t2 = _first_crossings(z, G, d)
        if not todo:
            ch.skip = set()  # look again from wherever the random step lands
        return (d, m1, t1, t2, -1) if np.isfinite(t1) else None
    # every candidate direction at once: towards neuron j's boundary within the current boundary
    J = np.asarray(todo)
    if nearest is not None and J.size > nearest:
        # the neurons nearest along the boundary only (each candidate costs a pass over all neurons):
        # the distance from the projection's length, |P_j|² = |G_j|² - (G_j·n)², before any P_j
        GJ = G[J]
        gg = np.einsum("ij,ij->i", GJ, GJ)
        nrm = np.sqrt(np.maximum(gg - (GJ @ n) ** 2, 0.0))
        ok = nrm > 1e-6 * np.sqrt(gg)  # (the squares' rounding: a boundary nearly parallel is far anyway)
        if not ok.any():
            return None
        J, nrm = J[ok], nrm[ok]
        if J.size > nearest:
            keep = np.argpartition(np.abs(z[J]) / nrm, nearest)[:nearest]
            J = J[keep]
        Pj = G[J] - np.outer(G[J] @ n, n)
        nrm = np.linalg.norm(Pj, axis=1)
    else:
        Pj = G[J] - np.outer(G[J] @ n, n)
        nrm = np.linalg.norm(Pj, axis=1)
        ok = nrm > 1e-12 * np.linalg.norm(G[J], axis=1)
        if not ok.any():
            return None
        J, Pj, nrm = J[ok], Pj[ok], nrm[ok]
    sgn = np.where(z[J] != 0, -np.sign(z[J]), 1.0)
    D = Pj * (sgn / nrm)[:, None]
    rate = G @ D.T  # (neurons, candidates)
    with np.errstate(divide="ignore", invalid="ignore"):
        T = np.where(z[:, None] * rate < 0, -z[:, None] / rate, np.inf)
    if T.shape[0] > 1:
        two = np.argpartition(T, 1, axis=0)[:2]
        t_two = np.take_along_axis(T, two, axis=0)
        swap = t_two[1] < t_two[0]
        first = np.where(swap, two[1], two[0])
        t1s, t2s = np.minimum(t_two[0], t_two[1]), np.maximum(t_two[0], t_two[1])
    else:
        first = np.zeros(T.shape[1], dtype=int)
        t1s, t2s = T[0], np.full(T.shape[1], np.inf)
    finite = np.isfinite(t1s)
    fresh = finite & ~ch.switched[first]  # earlier layers' neurons are marked switched from the start
    if fresh.any():
        c = int(np.flatnonzero(fresh)[np.argmin(t1s[fresh])])
    elif finite.any():
        dist = np.where(finite, np.abs(z[J]) / nrm, np.inf)
        c = int(np.argmin(dist))
    else:
        return None
    return D[c], int(first[c]), float(t1s[c]), float(t2s[c]), int(J[c])


def _teleport(
    ch: _Chain, layers: Sequence[pfx.Layer], layer_idx: FloatArray, spread: float, rng: np.random.Generator,
    limit: int = 64,
) -> tuple[tuple[FloatArray, FloatArray] | None, tuple[FloatArray, int, float, float] | None]:
    """Signed walks: follow the row's predicted boundary across the boundaries of neurons the walk has
    switched already (known neurons, neurons of layer ``i`` on at a determined start, or with a
    column and crossed at a measured step) until the next crossing is of a neuron not switched yet,
    without a query. Each piece's boundary is exact there (nothing unknown is on), so the walk queries
    only where a new weight enters; the pieces passed are checked by points measured at the end
    (:func:`_check_virtual`). The walk heads for the unswitched neuron :func:`_plan_target` picks
    first, until it is switched.
    Returns the prefix's forms (:func:`relux.attack.prefix.forms`) where the walk is left and the plan made there, when
    they were computed."""
    forms: tuple[FloatArray, FloatArray] | None = None
    target = -1
    for _ in range(limit):
        todo = layer_idx[~ch.switched[layer_idx]]
        if ch.failures >= 3 or not todo.size or not ch.system.determined:
            return forms, None
        if ch.skip and ch.skip.issuperset(todo.tolist()):
            return forms, None  # (the plan would pick a random direction and forget the skipped neurons)
        z, G = forms if forms is not None else pfx.forms(layers, ch.x)
        forms = (z, G)
        aim = _toward(z, G, ch.g, target) if target >= 0 and not ch.switched[target] else None
        if aim is None:
            full = _plan_target(ch, z, G, layer_idx, rng, nearest=16)  # not random: under 3 failures, some todo
            if full is None:
                return forms, None
            aim, target = full[:4], full[4]
        plan: tuple[FloatArray, int, float, float] | None = aim
        d, m1, t1, t2 = aim
        if not ch.switched[m1] or not np.isfinite(t1):
            return forms, plan  # a neuron to switch first: the step measures there
        q = ch.x + t1 * d
        probe = q + 1e-6 * min(t2 - t1, spread) * d
        n_new = ch.system.normal_at(probe)
        if n_new is None:
            return forms, plan
        d2 = d - (d @ n_new) * n_new
        nd = float(np.linalg.norm(d2))
        if nd <= 1e-9 or (G[m1] @ d2) * (G[m1] @ d) <= 0:
            return forms, plan  # the boundary folds back at m1: the step must look for its piece
        d2 /= nd
        zq, Gq = pfx.forms(layers, probe)
        rate = Gq @ d2
        with np.errstate(divide="ignore", invalid="ignore"):
            tt = np.where(zq * rate < 0, -zq / rate, np.inf)
        tt[m1] = np.inf
        t_next = float(np.min(tt))
        tau = 0.5 * min(t_next, spread)
        if not np.isfinite(tau) or tau <= 1e-9 * spread:
            return forms, plan
        ch.x = q + tau * d2
        ch.g = n_new
        ch.virtual.append(ch.x.copy())
        forms = (zq + Gq @ (ch.x - probe), Gq)  # affine in the piece's region (the forms at probe hold there)
    return forms, None


def _relocate(
    ch: _Chain, layers: Sequence[pfx.Layer], layer_idx: FloatArray, spread: float, rng: np.random.Generator,
    lines: int = 16, grid: int = 129, span: float = 2.0,
) -> bool:
    """Signed walks: move the walk, without a query, to a point of its row's predicted boundary far
    from where it stalled, near the boundary of a neuron it has not switched. Where every neuron on is
    switched the row is exact, so its boundary there is where it predicts: random lines (``lines``
    of them, ``±span·spread`` long, ``grid`` points each) are cut with the predicted boundary, and of
    the crossings in such regions the one nearest (along the boundary) to an unswitched neuron's
    boundary is taken. The point is checked with the others reached by prediction at the end
    (:func:`_check_virtual`). Returns whether the walk moved."""
    if not ch.system.determined:
        return False
    todo = layer_idx[~ch.switched[layer_idx]]
    if not todo.size:
        return False
    u, c = ch.system.row()
    d0 = ch.x.size
    x0 = ch.x[None, :] + rng.normal(0.0, spread / np.sqrt(d0), size=(lines, d0))
    v = rng.normal(size=(lines, d0))
    v *= (span * spread / np.linalg.norm(v, axis=1))[:, None]
    T = np.linspace(-1.0, 1.0, grid)
    X = (x0[:, None, :] + T[None, :, None] * v[:, None, :]).reshape(-1, d0)
    Zs, _ = pfx.forward(layers, X)
    Zi = Zs[-1][:, layer_idx - layer_idx[0]]
    val = (np.maximum(Zi, 0.0) @ u + c).reshape(lines, grid)
    exact = ~np.any(Zi[:, todo - layer_idx[0]] > 0, axis=1).reshape(lines, grid)
    pattern = np.concatenate([Z > 0 for Z in Zs], axis=1).reshape(lines, grid, -1)
    # a sign change between two grid points of one region: the predicted boundary, by interpolation
    same = np.all(pattern[:, 1:] == pattern[:, :-1], axis=2)
    li, gi = np.nonzero((np.sign(val[:, 1:]) != np.sign(val[:, :-1])) & exact[:, 1:] & exact[:, :-1] & same)
    best: tuple[float, FloatArray, FloatArray] | None = None
    for a, k in zip(li.tolist(), gi.tolist(), strict=True):
        f = val[a, k] / (val[a, k] - val[a, k + 1])
        p = x0[a] + (T[k] + f * (T[k + 1] - T[k])) * v[a]
        n = ch.system.normal_at(p)
        if n is None:
            continue
        z, G = pfx.forms(layers, p)
        GJ = G[todo]
        pn = np.sqrt(np.maximum(np.einsum("ij,ij->i", GJ, GJ) - (GJ @ n) ** 2, 0.0))
        with np.errstate(divide="ignore"):
            dist = float(np.min(np.where(pn > 0, np.abs(z[todo]) / pn, np.inf)))
        if np.isfinite(dist) and (best is None or dist < best[0]):
            best = (dist, p, n)
    if best is None:
        return False
    ch.x, ch.g = best[1], best[2]
    ch.virtual.append(ch.x.copy())
    ch.skip = set()
    ch.failures = 0
    ch.no_teleport = 0
    return True


def _undo(ch: _Chain) -> None:
    """A failed step of a signed walk: back to where its teleports began (a row still wrong in some
    weight predicts pieces that are not there), and a few steps without them."""
    if ch.saved is None or len(ch.virtual) == ch.saved[2]:
        return
    ch.x, ch.g, n = ch.saved
    del ch.virtual[n:]
    ch.no_teleport = 2


def _check_virtual(
    query: QueryFn, layers: Sequence[pfx.Layer], chains: Sequence[_Chain], spread: float,
    rng: np.random.Generator,
) -> None:
    """Signed walks: measure exact points where the complete walks' rows predict their boundary, in
    pieces reached by prediction (and beside measured points), until each row's points outnumber its
    unknowns by an eighth; 6 queries a point (:func:`relux.attack.polish.kink_in_bracket`). A point off
    the prediction ends its walk as failed."""
    from relux.attack.polish import OFFSETS, kink_in_bracket

    # points wanted per walk: enough to outnumber its unknowns by an eighth
    wanted = {id(ch): max(len(ch.system.cols) - ch.system.F.shape[0], 0) + max(8, len(ch.system.cols) // 8)
              for ch in chains}
    plans: list[tuple[_Chain, FloatArray, FloatArray, FloatArray]] = []
    for ch in chains:
        want = wanted[id(ch)]
        cand = list(ch.virtual)
        rng.shuffle(cand)
        for y in ch.points[1:] if len(ch.points) > 1 else ch.points:  # (a walk may end at its start)
            n = ch.system.normal_at(y)
            if n is None:
                continue
            v = rng.normal(size=y.size)
            v -= (v @ n) * n
            v /= float(np.linalg.norm(v))
            zy, Gy = pfx.forms(layers, y)
            cand.append(y + 0.3 * min(pfx.region_radius(zy, Gy, v), spread) * v)
        for v in cand[: 2 * want]:
            n = ch.system.normal_at(v)
            if n is None:
                continue
            zv, Gv = pfx.forms(layers, v)
            delta = min(0.25 * pfx.region_radius(zv, Gv, n), 1e-2 * spread)
            if not np.isfinite(delta) or delta <= 1e-9 * spread:
                continue
            plans.append((ch, v, n, delta * np.asarray(OFFSETS)))
    if not plans:
        for ch in chains:
            ch.failed, ch.reason = True, "no piece to check the row on"
        return
    X = np.concatenate([v[None, :] + T[:, None] * n[None, :] for _ch, v, n, T in plans])
    Y = query(X).reshape(len(plans), len(OFFSETS), -1)
    got: dict[int, list[FloatArray]] = {}
    tried: dict[int, int] = {}
    displaced: dict[int, int] = {}
    for (ch, v, n, T), Yi in zip(plans, Y, strict=True):
        tried[id(ch)] = tried.get(id(ch), 0) + 1
        t = kink_in_bracket(T, Yi)
        # where the row predicts it (a row good to 1e-9 misses by about that much; a kink elsewhere in
        # the bracket's middle is another neuron's while this one is not where predicted). No kink
        # (a side bent by another kink near by) says nothing.
        if t is not None and abs(t) <= 1e-7 * spread:
            got.setdefault(id(ch), []).append(v + t * n)
        elif t is not None:
            displaced[id(ch)] = displaced.get(id(ch), 0) + 1
    for ch in chains:
        pts = got.get(id(ch), [])
        want = wanted[id(ch)]
        P = np.asarray(pts[:want])
        # three quarters of the predicted kinks where predicted, and at most a fifth elsewhere: a wrong
        # row misses most of its predictions, while a right one meets another neuron's kink in a
        # bracket now and then (2 of 16 brackets, in complete walks of 20-40-40-1 that a tenth failed)
        n_tried = tried.get(id(ch), 0)
        if not P.shape[0] or P.shape[0] < min(want, (3 * n_tried) // 4) or displaced.get(id(ch), 0) > n_tried // 5:
            ch.failed, ch.reason = True, (f"{len(pts)} of {n_tried} predicted kinks found where predicted, "
                                          f"{displaced.get(id(ch), 0)} elsewhere")
            continue
        fit = ch.system.try_points(P, P[0])
        if not (fit.residual <= 1e-8 and fit.prior <= _PRIOR_TOL):
            ch.failed, ch.reason = True, (f"predicted kinks misfit the row (residual {fit.residual:.1e}, start "
                                          f"normal {fit.prior:.1e})")
            continue
        ch.system.commit()
        ch.points += list(P)


# A check's walks stop once their partial fits have decided every sign, uniquely and the same way
# after two batches in a row that each added fits, from at least this many fits (on layer 3 of the
# digits-trained 64-40x4-10 the 64 walks of a full check cost 330k queries and 54 s).
_SETTLE_FITS = 6

# A signed walk stalls after this many steps without a new neuron, and then moves elsewhere on its
# predicted boundary (:func:`_relocate`) at most _MOVES times before it stops. On layer 3 of the
# digits-trained 64-40x4-10 (true layers 1-2) this took the rows found from 34 to 38 of 40 (the other
# two are on for 0 and 0.4% of inputs), in 364k queries and 19 s instead of 504k and 55 s.
_STALL = 16
_MOVES = 6

# A signed walk's row may turn from its start's measured normal by this much (the sine): a normal is
# measured to about 1e-8 and at worst a few 1e-6 (from a kink near other boundaries); a row bent to fit
# another neuron's points turns by 1e-4 or far more.
_PRIOR_TOL = 1e-5
# A signed walk's second point is looked for this close to where its first point predicts it (in
# units of the piece's reach there): the prediction is good to about 1e-8 of it, and a narrow bracket
# rarely holds another neuron's kink.
_BRACKET = 2e-3


def _predicted_kinks(query: QueryFn, X0: FloatArray, U: FloatArray) -> list[FloatArray | None]:
    """The kink in a narrow bracket about each predicted point ``X0[i]`` along ``U[i]``, or None (no
    kink there, or another one beside it); 6 queries each (:func:`relux.attack.polish.kink_in_bracket`)."""
    from relux.attack.polish import OFFSETS, kink_in_bracket

    T = _BRACKET * np.asarray(OFFSETS)
    X = X0[:, None, :] + T[None, :, None] * U[:, None, :]
    Y = query(X.reshape(-1, X0.shape[1])).reshape(X0.shape[0], T.size, -1)
    out: list[FloatArray | None] = []
    for x0, u, Yi in zip(X0, U, Y, strict=True):
        t = kink_in_bracket(T, Yi)
        out.append(None if t is None else x0 + t * u)
    return out


@dataclass(frozen=True, eq=False)
class _Step:
    """One step of a walk: its chain, the neuron ``m`` to cross, and a search line ``p + t u`` with
    ``t`` in ``[lo, hi]`` (input distance) for the boundary's piece past ``m``; ``R`` bounds the
    second point's reach."""

    ch: _Chain
    m: int
    p: FloatArray
    zp: FloatArray
    Gp: FloatArray
    u: FloatArray
    lo: float
    hi: float
    R: float


def _fail(ch: _Chain, m: int) -> None:
    """A step that found no next piece: count it, undo its teleports, and try another neuron first."""
    ch.failures += 1
    _undo(ch)
    ch.skip.add(m)


def _beside(layers: Sequence[pfx.Layer], ch: _Chain, m: int, p: FloatArray, spread: float) -> _Step | None:
    """Sign-free walks: a search line along the old normal through ``p``, a point past ``m``'s
    boundary far from the ridge (a long lever for the new piece's tilt)."""
    zp, Gp = pfx.forms(layers, p)
    R = min(0.9 * pfx.region_radius(zp, Gp, ch.g), 0.5 * spread)
    if not np.isfinite(R) or R <= 1e-9 * spread:
        return None
    return _Step(ch, m, p, zp, Gp, ch.g, -R, R, R)


def _across(
    layers: Sequence[pfx.Layer], ch: _Chain, q: FloatArray, m: int, z: FloatArray, G: FloatArray, d: FloatArray,
    spread: float,
) -> _Step | None:
    """Signed walks: a search line for the boundary's next piece past neuron ``m``'s boundary, crossed
    at ``q`` along ``d``. The next piece is a hyperplane through the ridge where the current piece meets
    ``m``'s boundary, at an unknown tilt; a line parallel to ``m``'s boundary, a little way ``s`` past
    it, meets it whatever the tilt, about ``s`` times the tilt's cotangent from its point nearest the
    ridge (a line along the old normal misses a piece tilted back). The line spans the region about
    that point, so that no known neuron's kink is on it."""
    g = ch.g
    nm = G[m] * (1.0 if float(G[m] @ d) > 0 else -1.0)
    nm = nm / float(np.linalg.norm(nm))  # into the next region
    u = g - float(g @ nm) * nm
    nu = float(np.linalg.norm(u))
    if nu <= 1e-6:
        return None  # the piece is parallel to m's boundary: it never crosses it
    u /= nu
    zq = z + G @ (q - ch.x)  # affine: the forms at x hold on the region's closure
    rate = G @ nm
    with np.errstate(divide="ignore", invalid="ignore"):
        tt = np.where(zq * rate < 0, -zq / rate, np.inf)
    tt[m] = np.inf
    s = 0.01 * min(float(np.min(tt)), spread)
    if not np.isfinite(s) or s <= 1e-9 * spread:
        return None
    p = q + s * nm
    zp, Gp = pfx.forms(layers, p)
    ahead, back = 0.98 * min(pfx.reach(zp, Gp, u), 0.5 * spread), 0.98 * min(pfx.reach(zp, Gp, -u), 0.5 * spread)
    if not (np.isfinite(ahead) and np.isfinite(back)) or min(ahead, back) <= 1e-9 * spread:
        return None
    return _Step(ch, m, p, zp, Gp, u, -back, ahead, 0.5 * (ahead + back))


def _second_point(
    layers: Sequence[pfx.Layer], st: _Step, y1: FloatArray, signed: bool, rng: np.random.Generator, spread: float,
) -> tuple[FloatArray, FloatArray, float, float] | None:
    """From a candidate kink ``y1`` of the next piece: that piece's normal (the old one plus a multiple
    of ``m``'s gradient fixed by ``y1``), a point ``p2`` on the piece away from ``y1``, the distance
    to it, and a half-width about ``p2`` along the normal that stays in its region."""
    ch, m1, zp, Gp = st.ch, st.m, st.zp, st.Gp
    # the new piece: z'(y) = g·(y - x) + μ z_m(y), with z_m affine near the crossing
    zm_y1 = float(zp[m1] + Gp[m1] @ (y1 - st.p))
    if abs(zm_y1) <= 1e-9 * float(np.linalg.norm(Gp[m1])) * spread:
        return None
    mu = -float(ch.g @ (y1 - ch.x)) / zm_y1
    g_new = ch.g + mu * Gp[m1]
    gn = g_new / float(np.linalg.norm(g_new))
    zy, Gy = pfx.forms(layers, y1)
    v = Gy[m1] - (Gy[m1] @ gn) * gn if signed and zm_y1 > 0 else rng.normal(size=y1.size)
    v -= (v @ gn) * gn
    nv = float(np.linalg.norm(v))
    if nv == 0.0:
        return None
    v /= nv
    if signed and zm_y1 > 0:
        # away from the new neuron's boundary, as far as the piece goes: a long lever for its weight (a
        # point near its boundary barely sees it, and the row's fit would not either)
        step = min(0.5 * pfx.reach(zy, Gy, v), 0.5 * spread)
    else:
        step = min(0.3 * pfx.region_radius(zy, Gy, v), 0.3 * st.R)
    p2 = y1 + step * v
    z2, G2 = pfx.forms(layers, p2)
    half = min(0.9 * pfx.region_radius(z2, G2, gn), 0.5 * step)
    if not np.isfinite(step) or step <= 1e-9 * spread or half <= 1e-9 * spread:
        return None
    return gn, p2, step, half


_Hit = tuple[FloatArray, FloatArray, FloatArray, StepFit]  # first point, new normal, second point, fit


def _candidates(
    layers: Sequence[pfx.Layer], steps: Sequence[_Step], lines: Sequence[LineKinks], count: int, signed: bool,
    rng: np.random.Generator, spread: float,
) -> tuple[list[list[tuple[int, FloatArray, FloatArray, float]]], list[FloatArray], list[FloatArray]]:
    """The ``count`` kinks nearest each search line's middle as candidates for the next piece: per
    step ``(index of its second-point search, first point, new normal, distance to the second
    point)``, and the second-point searches' middles and half-length vectors (along the new normal)."""
    cands: list[list[tuple[int, FloatArray, FloatArray, float]]] = []
    v_x0: list[FloatArray] = []
    v_u: list[FloatArray] = []
    for st, line in zip(steps, lines, strict=True):
        mine: list[tuple[int, FloatArray, FloatArray, float]] = []
        pts = line.points()
        for ti in np.argsort(np.abs(line.t))[:count]:
            y1 = pts[int(ti)]
            sp = _second_point(layers, st, y1, signed, rng, spread)
            if sp is None:
                continue
            gn, p2, step, half = sp
            v_x0.append(p2)
            v_u.append(gn * half)
            mine.append((len(v_x0) - 1, y1, gn, step))
        cands.append(mine)
    return cands, v_x0, v_u


def _signed_points(
    query: QueryFn, layers: Sequence[pfx.Layer], steps: Sequence[_Step], spread: float, rel_tol: float,
    rng: np.random.Generator,
) -> list[_Hit | None]:
    """Signed walks: each step's two points on the next piece, or None. The piece meets the search
    line near its point nearest the ridge (``s`` is small: on the CM24 100-200x3-10 network within a
    tenth of the region's span 99% of the time, and a search over the whole span found 8 more pieces
    in 325 steps): a short line about that point, and its two nearest kinks as candidates. The second
    point is looked for in a narrow bracket where the first predicts it, and the walk's system decides."""
    h = np.array([min(-st.lo, st.hi, 0.1 * (st.hi - st.lo)) for st in steps])
    x0 = np.stack([st.p for st in steps])
    U = np.stack([st.u for st in steps]) * h[:, None]
    lines, _ = find_kinks(query, x0, U, -1.0, 1.0, 8, rel_tol)
    cands, v_x0, v_u = _candidates(layers, steps, lines, 2, True, rng, spread)
    got = _predicted_kinks(query, np.asarray(v_x0), np.asarray(v_u)) if v_x0 else []
    out: list[_Hit | None] = []
    for st, mine in zip(steps, cands, strict=True):
        hit: _Hit | None = None
        for vi, y1, gn, _step in mine:
            y2 = got[vi]
            if y2 is None:
                continue
            # the first point's μ is imprecise near the ridge, and the second point's lever is long:
            # the walk's system (exact points and the start's normal) decides
            fit = st.ch.system.try_points(np.stack([y1, y2]), y1)
            if fit.residual <= 1e-8 and fit.prior <= _PRIOR_TOL:
                hit = (y1, gn, y2, fit)
                break
            log.debug("walk: candidate misfits (residual %.1e, start normal %.1e)", fit.residual, fit.prior)
        out.append(hit)
    return out


def _free_points(
    query: QueryFn, layers: Sequence[pfx.Layer], steps: Sequence[_Step], spread: float, rel_tol: float,
    rng: np.random.Generator,
) -> list[_Hit | None]:
    """Sign-free walks: each step's two points on the next piece, or None. Each kink on the search
    line, nearest first, is a candidate; a second kink on a short line through a point of the
    predicted piece, where predicted, decides (one batched call for every candidate)."""
    x0 = np.stack([st.p for st in steps])
    U = np.stack([st.u * st.R for st in steps])
    lines, _ = find_kinks(query, x0, U, -1.0, 1.0, 16, rel_tol)
    cands, v_x0, v_u = _candidates(layers, steps, lines, 4, False, rng, spread)
    vlines = find_kinks(query, np.asarray(v_x0), np.asarray(v_u), -1.0, 1.0, 8, rel_tol)[0] if v_x0 else []
    out: list[_Hit | None] = []
    for st, mine, line in zip(steps, cands, lines, strict=True):
        hit: _Hit | None = None
        for vi, y1, gn, step in mine:
            vl = vlines[vi]
            if vl.t.size == 0:
                continue
            j = int(np.argmin(np.abs(vl.t)))
            # the predicted piece must hold at the second point (up to the drift of the estimate)
            if abs(float(vl.t[j])) * float(np.linalg.norm(vl.u)) <= 1e-4 * step:
                y2 = vl.points()[j]
                hit = (y1, gn, y2, st.ch.system.try_points(np.stack([y1, y2]), y1))
                break
        if hit is None:
            log.debug("walk: no kink on the search line continues the boundary (%d tried, %d kinks on it)",
                      len(mine), line.t.size)
        out.append(hit)
    return out


def _signed_walk(ch: _Chain, layer_idx: FloatArray, d_h: int) -> Walk:
    """A signed walk's result: ``θ = (u, 0, c)`` from its exact points alone."""
    P = np.asarray(ch.points)
    sw = ch.switched[layer_idx]
    if ch.failed or not sw.all():
        return Walk(np.full(0, np.nan), P, sw, ch.steps, np.inf, 0.0, False, ch.reason or "incomplete")
    theta, resid, gap = ch.system.final()
    u, c = ch.system.row(theta)
    th = np.concatenate([u, np.zeros(d_h), [c]])
    th /= float(np.linalg.norm(th))
    ok = resid <= 1e-7 and gap >= 1e3
    reason = "" if ok else f"points do not fix one row (residual {resid:.1e}, gap {gap:.1e})"
    log.debug("signed walk: %d steps, %d predicted pieces, %d points for %d unknowns, residual %.1e, gap %.1e",
              ch.steps, len(ch.virtual), ch.system.F.shape[0], len(ch.system.cols), resid, gap)
    return Walk(th, P, sw, ch.steps, resid, gap, ok, reason)






def _sign_free(layers: Sequence[pfx.Layer]) -> list[pfx.Layer]:
    """The prefix with its last layer doubled (``ŵ`` and ``-ŵ``): the same boundaries, and a space of
    control that does not depend on that layer's unknown signs."""
    W, b = layers[-1]
    return [*layers[:-1], (np.concatenate([W, -W]), np.concatenate([b, -b]))]


def _as_doubled(layers: Sequence[pfx.Layer], thetas: Sequence[FloatArray]) -> tuple[FloatArray, FloatArray] | None:
    """Rows ``θ`` rewritten on the doubled layer's outputs ``[ReLU(ẑ), ReLU(-ẑ)]`` (exact when ``a`` lies
    in the row space of ``Ŵ``, as in an expansive layer), to skip kinks of neurons already walked."""
    if not thetas:
        return None
    W, b = layers[-1]
    n = W.shape[0]
    rows, bs = [], []
    for th in thetas:
        u, a, c = th[:n], th[n:-1], float(th[-1])
        beta = np.linalg.lstsq(W.T, a, rcond=None)[0]
        if np.linalg.norm(W.T @ beta - a) > 1e-9 * (np.linalg.norm(a) + 1e-300):
            continue
        rows.append(np.concatenate([u + beta, -beta]))
        bs.append(c - float(beta @ b))
    return (np.asarray(rows), np.asarray(bs)) if rows else None


def _seeds(
    query: QueryFn,
    layers: Sequence[pfx.Layer],
    d0: int,
    n_lines: int,
    n_grid: int,
    cfg: ExtractionConfig,
    rng: np.random.Generator,
    rel_tol: float,
    thetas: Sequence[FloatArray] = (),
) -> list[Candidate]:
    """Kinks the prefix (and the rows already walked) do not explain, not yet measured: a walk needs
    the local normal of its start only, so it is measured when the walk is about to start
    (:func:`_normals`)."""
    cands, _ = find_candidates(query, _sign_free(layers), d0, n_lines, n_grid, cfg, rng, rel_tol,
                               known=_as_doubled(layers, thetas))
    return cands


def _normals(
    query: QueryFn,
    layers: Sequence[pfx.Layer],
    d0: int,
    cands: Sequence[Candidate],
    cfg: ExtractionConfig,
    executor: Executor | None,
) -> list[tuple[FloatArray, FloatArray]]:
    """The local normals at candidate kinks (the jump of the gradient in the space of control), for
    those whose jump is rank one."""
    wts, _, _ = measure_candidates(query, _sign_free(layers), d0, cands, cfg, executor=executor)
    return [(wt.x, wt.normal) for wt in wts]


def _on_row(layers: Sequence[pfx.Layer], theta: FloatArray, X: FloatArray) -> np.ndarray:
    F = features(layers, X)
    return np.asarray(np.abs(F @ theta) <= 1e-6 * np.linalg.norm(F, axis=1) * float(np.linalg.norm(theta)))


def walk_layer(
    query: QueryFn,
    layers: Sequence[pfx.Layer],
    width: int,
    d0: int,
    cfg: ExtractionConfig,
    rng: np.random.Generator,
    rel_tol: float,
    rows_wanted: int,
    max_rounds: int = 48,
    missing: int = 0,
    executor: Executor | None = None,
    max_walks: int | None = None,
) -> WalkOutcome:
    """Signs of the last known layer and rows of the next one (``width`` neurons) from walks along
    next-layer boundaries; stops once ``rows_wanted`` distinct rows are known (or after
    ``max_rounds`` rounds of search lines, or ``max_walks`` walks; with ``max_walks``, a check, also once
    two batches in a row have decided every sign alike). ``missing``: neurons of layer
    ``i`` no kink has shown; the sign solve allows for them and returns their directions
    (:func:`relux.attack.walk_fit.solve_walk_signs`)."""
    W, b = layers[-1]
    n_i = W.shape[0]
    n_grid = int(cfg.grid_per_neuron * (n_i + width)) + 16
    thetas: list[FloatArray] = []
    pts: list[FloatArray] = []
    res: list[float] = []
    walks = complete = 0
    fits: list[PartialFit] = []
    fit_points: list[FloatArray] = []
    last_new = 0
    settled = False  # a check (max_walks): two batches in a row gave the same signs, every one decided
    last_flips: bytes | None = None
    solved_with = 0  # fits in the last early solve
    for rnd in range(max_rounds):
        if (settled or len(thetas) >= rows_wanted or rnd - last_new > 24
                or (max_walks is not None and walks >= max_walks)):
            break
        before = len(thetas)
        seeds = _seeds(query, layers, d0, 2, n_grid, cfg, rng, rel_tol, thetas)
        while seeds and not settled and len(thetas) < rows_wanted and (max_walks is None or walks < max_walks):
            if thetas:  # kinks of rows already walked (the known-row test above is stricter)
                seeds = [sd for sd in seeds if not any(_on_row(layers, t, sd.x[None, :])[0] for t in thetas)]
                if not seeds:
                    break
            nb = max(2, min(4, rows_wanted - len(thetas)))
            if max_walks is not None:
                nb = min(nb, max_walks - walks)
            batch: list[tuple[FloatArray, FloatArray]] = []
            while seeds and len(batch) < nb:  # measured only now: most kinks are never walked
                take, seeds = seeds[: nb - len(batch)], seeds[nb - len(batch) :]
                batch += _normals(query, layers, d0, take, cfg, executor)
            if not batch:
                break
            for wk in walk_boundaries(query, layers, batch, d0, cfg, rng, rel_tol):
                walks += 1
                if wk.partial is not None and wk.partial.ok:
                    fits.append(wk.partial)
                    fit_points.append(wk.points)
                if not wk.ok:
                    log.debug("walk failed: %s (%d steps, %d/%d switched)", wk.reason, wk.steps,
                              int(wk.switched.sum()), n_i)
                    continue
                complete += 1
                dup = any(abs(float(wk.theta @ t)) > 1 - 1e-6 for t in thetas)
                # a fit with no term on the layer's outputs is no row (and must not count as one)
                flat = float(np.linalg.norm(wk.theta[:n_i])) <= 1e-8 * float(np.linalg.norm(wk.theta))
                if not dup and not flat:
                    thetas.append(wk.theta)
                    pts.append(wk.points)
                    res.append(wk.residual)
            # (not while a neuron of layer i is missing: a walk along its own boundary may still come)
            if max_walks is not None and not missing and len(fits) >= _SETTLE_FITS and len(fits) > solved_with:
                solved_with = len(fits)
                early = solve_walk_signs(W, fits, missing, cfg.max_enum_bits)
                sol = early.solution if early is not None else None
                ok = sol is not None and sol.ok and sol.solutions == 1 and bool(sol.relevant.all())
                now = sol.flips.tobytes() if ok and sol is not None else None
                settled = now is not None and now == last_flips
                last_flips = now
        if len(thetas) > before:
            last_new = rnd
        log.debug("walks: %d rows after %d walks (%d complete)", len(thetas), walks, complete)
    flips = np.zeros(n_i, dtype=bool)
    conf = np.zeros(n_i)
    decided = np.zeros(n_i, dtype=bool)
    ws = solve_walk_signs(W, fits, missing, cfg.max_enum_bits)
    if ws is None:
        return WalkOutcome(flips, conf, decided, np.zeros((0, n_i)), np.zeros(0), (), np.zeros(0), walks,
                           complete, None, "no walk along a next-layer boundary gave a usable fit", tuple(fits))
    sol = ws.solution
    if sol.ok:
        flips = sol.flips
        decided = sol.relevant.copy()
        conf = np.where(decided, sol.confidence, 0.0)
    # A missing neuron seen as a linear leftover is on along most walks: all their points, for its side.
    on_pts = np.concatenate(fit_points) if fit_points else np.zeros((0, d0))
    own = [(f, P) for f, P in zip(fits, fit_points, strict=True) if f.own and f.observed.all()]
    T = np.stack(thetas) if thetas else np.zeros((0, n_i + W.shape[1] + 1))
    U, C = T[:, :n_i], T[:, -1]
    reason = "" if sol.ok else sol.reason
    # rows of layer i+1 behind the corrected layer i: ReLU(ẑ_j) = ReLU(-ẑ_j) + ẑ_j for a flipped row
    b_next = C + U[:, flips] @ b[flips]
    return WalkOutcome(flips, conf, decided, U, b_next, tuple(pts), np.asarray(res), walks, complete, sol, reason,
                       tuple(fits), ws.missing, on_pts,
                       tuple((np.append(f.a, f.c) / float(np.linalg.norm(np.append(f.a, f.c))), P) for f, P in own))


def walk_boundaries(
    query: QueryFn,
    layers: Sequence[pfx.Layer],
    starts: Sequence[tuple[FloatArray, FloatArray]],
    d0: int,
    cfg: ExtractionConfig,
    rng: np.random.Generator,
    rel_tol: float,
    max_steps: int | None = None,
    signed: bool = False,
) -> list[Walk]:
    """Walk from each start ``(x, normal)`` until every neuron of the last known layer is switched;
    every walk advances in the same oracle calls.

    ``signed``: the last known layer's signs are right, so the row has no term for them
    (:class:`WalkSystem` in signed mode) and is fixed, step by step, by the start's normal and the
    points; a neuron counts as switched once it has a column and was crossed at a measured step, or
    from the start when it is on there and the start's normal fixes the row. The walk crosses the
    boundaries of switched neurons by prediction (:func:`_teleport`), queries only where a neuron
    turns on for the first time, and is checked at the end (:func:`_check_virtual`). A signed walk that
    stalls (``_STALL`` steps without a new neuron, or 8 failures) moves to another part of its predicted
    boundary (:func:`_relocate`), at most ``_MOVES`` times."""
    n_i = layers[-1][0].shape[0]
    n_all = sum(W.shape[0] for W, _ in layers)
    layer_idx = np.arange(n_all - n_i, n_all)
    spread = cfg.input_scale * float(np.sqrt(d0))
    max_steps = 4 * n_i + 32 if max_steps is None else max_steps
    chains = [_Chain(x=x.copy(), g=n / float(np.linalg.norm(n)), points=[x.copy()],
                     switched=np.zeros(n_all, dtype=bool), system=WalkSystem(layers, x, n, signed=signed))
              for x, n in starts]
    for ch in chains:
        ch.switched[: n_all - n_i] = True  # earlier layers: known signs, nothing to learn
        if signed and ch.system.determined:
            # the start's normal fixes the weights of the neurons on there: the walk crosses their
            # boundaries by prediction too, and measures steps only where a neuron turns on
            ch.switched[layer_idx[pfx.forms(layers, ch.x)[0][layer_idx] > 0]] = True
    while True:
        active = [c for c in chains if not c.done]
        if not active:
            break
        steps: list[_Step] = []
        for ch in active:
            if ch.switched.all():
                ch.done, ch.reason = True, "complete"
                continue
            stalled = signed and (ch.failures > 7 or ch.steps - ch.last_new > _STALL)
            if stalled and ch.steps < max_steps and ch.moves < _MOVES and _relocate(ch, layers, layer_idx, spread, rng):
                ch.moves += 1
                ch.last_new = ch.steps
                stalled = False
            if ch.steps >= max_steps or ch.failures > (7 if signed else 12):
                ch.done, ch.reason = True, f"stopped after {ch.steps} steps ({ch.failures} failures)"
                continue
            if stalled:
                ch.done, ch.reason = True, f"no new neuron in {ch.steps - ch.last_new} steps"
                continue
            forms = plan = None
            if signed:
                ch.saved = (ch.x, ch.g, len(ch.virtual))
                if ch.no_teleport > 0:
                    ch.no_teleport -= 1
                else:
                    forms, plan = _teleport(ch, layers, layer_idx, spread, rng)
            z, G = forms if forms is not None else pfx.forms(layers, ch.x)
            if plan is None:
                plan = _plan(ch, z, G, layer_idx, rng, nearest=16 if signed else None)
            if plan is None:
                ch.done, ch.reason = True, "no unswitched neuron reachable along the boundary"
                continue
            d, m1, t1, t2 = plan
            ch.steps += 1
            step = (_across(layers, ch, ch.x + t1 * d, m1, z, G, d, spread) if signed
                    else _beside(layers, ch, m1, ch.x + (t1 + 0.5 * min(t2 - t1, max(t1, 0.5 * spread))) * d, spread))
            if step is None:
                _fail(ch, m1)
                continue
            steps.append(step)
        if not steps:
            continue
        if signed:
            found = _signed_points(query, layers, steps, spread, rel_tol, rng)
        else:
            found = _free_points(query, layers, steps, spread, rel_tol, rng)
        for st, hit in zip(steps, found, strict=True):
            ch, m1 = st.ch, st.m
            if hit is None:
                _fail(ch, m1)
                continue
            y1, gn, y2, fit = hit
            # (a NaN misfit is no fit; a sign-free walk's row is not held to its start's normal)
            if not (fit.residual <= 1e-8 and (not signed or fit.prior <= _PRIOR_TOL)):
                log.debug("walk: the new points contradict the walk's earlier ones (residual %.1e, start normal "
                          "%.1e)", fit.residual, fit.prior)
                _fail(ch, m1)
                continue
            ch.system.commit()
            ch.points += [y1, y2]
            ch.x = y1
            ch.g = gn if fit.normal is None else fit.normal
            # a signed walk's neuron counts once it has a column (on at a point of the walk) and was
            # crossed at a measured step (off at one too): the row then holds its weight
            if not ch.switched[m1] and (not signed or m1 < layer_idx[0] or ch.system.has_column(m1 - layer_idx[0])):
                ch.switched[m1] = True
                ch.skip = set()
                ch.failures = 0
                ch.last_new = ch.steps
    if signed:
        _check_virtual(query, layers, [c for c in chains if c.switched.all()], spread, rng)
        return [_signed_walk(ch, layer_idx, layers[-1][0].shape[1]) for ch in chains]
    out: list[Walk] = []
    for ch in chains:
        P = np.asarray(ch.points)
        sw = ch.switched[layer_idx]
        part = fit_partial(layers, P)
        if not sw.all():
            out.append(Walk(np.full(0, np.nan), P, sw, ch.steps, np.inf, 0.0, False, ch.reason, part))
            continue
        theta, resid, gap = fit_theta(layers, P)
        ok = resid <= 1e-7 and gap >= 1e3  # a wrong point misfits by far more
        reason = "" if ok else f"points do not fit one row (residual {resid:.1e}, gap {gap:.1e})"
        out.append(Walk(theta, P, sw, ch.steps, resid, gap, ok, reason, part))
    return out
