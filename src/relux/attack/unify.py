"""Group partial signatures by neuron and unify them into full rows (attack-notes §3).

Witnesses of one neuron see different active sets of the layer input and carry different unknown
scales. Grouping compares them on shared coordinates (with the bias); unification then solves one
homogeneous least-squares system per neuron, ``A_x w = λ_x v_x`` for every witness ``x`` plus
``h(x)·w + b = 0``, for ``(w, b, λ)``: the row is its null vector. Rank-deficient witnesses enter
the system too, once the zero test places them on the neuron.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from relux.attack.witnesses import Witness
from relux.oracle.base import FloatArray


@dataclass(frozen=True)
class NeuronRow:
    """A unified row: unit-norm ``(w, b)``, its witnesses, and how well they agree."""

    w: FloatArray
    b: float
    members: tuple[int, ...]
    coverage: np.ndarray  # layer-input coordinates seen active by some witness
    residual: float  # smallest singular value of the unification system (relative)
    gap: float  # second-smallest over smallest singular value (uniqueness margin)

    @property
    def complete(self) -> bool:
        return bool(self.coverage.all())


def _unit(w: FloatArray, b: float) -> tuple[FloatArray, float]:
    n = float(np.linalg.norm(np.append(w, b)))
    if n == 0:
        return w, b
    w, b = w / n, b / n
    if w[np.argmax(np.abs(w))] < 0:
        w, b = -w, -b
    return w, b


def group_witnesses(witnesses: Sequence[Witness], tol: float = 1e-5, min_overlap: int = 2) -> list[list[int]]:
    """Greedy grouping of full-rank partial signatures that agree (up to scale) on shared coordinates.

    Each witness joins the group whose running mean it matches best (cosine on the coordinates both
    have seen, bias included), all groups compared at once."""
    return Grouping(tol, min_overlap).update(witnesses)


class Grouping:
    """:func:`group_witnesses` kept between calls on a list that only grows (the unification of
    attack-notes §3, run after every round of search lines).

    The grouping is sequential: each witness joins a group given the state the earlier ones left. So
    when witnesses are only appended, continuing from the saved state gives exactly the groups a fresh
    call over the whole list gives, for the cost of the new witnesses only (a layer re-groups after
    every round of search lines). A list that did not just grow is grouped afresh. ``rows`` keeps each
    group's unified row by its members (indices into the list), for the caller; it is cleared with
    the grouping.
    """

    def __init__(self, tol: float = 1e-5, min_overlap: int = 2) -> None:
        self.tol = tol
        self.min_overlap = min_overlap
        self._reset()

    def _reset(self) -> None:
        self.rows: dict[tuple[int, ...], NeuronRow] = {}
        self._seen: list[Witness] = []  # the witnesses processed, in order (identity checked)
        self._groups: list[list[int]] = []
        self._sums = np.zeros((0, 0))
        self._counts = np.zeros((0, 0))
        self._bsum = np.zeros(0)
        self._sizes = np.zeros(0)

    def update(self, witnesses: Sequence[Witness]) -> list[list[int]]:
        """The groups of ``witnesses`` (indices into it)."""
        n0 = len(self._seen)
        if len(witnesses) < n0 or any(witnesses[i] is not self._seen[i] for i in range(n0)):
            self._reset()
            n0 = 0
        for i in range(n0, len(witnesses)):
            self._add(i, witnesses[i])
            self._seen.append(witnesses[i])
        return [list(g) for g in self._groups]

    def _add(self, i: int, wt: Witness) -> None:
        if not wt.full_rank:
            return
        g = len(self._groups)
        if g == self._sums.shape[0]:  # grow the running sums (capacity doubles)
            cap = max(16, 2 * g)
            d = wt.w.size
            for name, shape in (("_sums", (cap, d)), ("_counts", (cap, d)), ("_bsum", (cap,)), ("_sizes", (cap,))):
                old = getattr(self, name)
                new = np.zeros(shape)
                if old.shape[0]:
                    new[: old.shape[0]] = old
                setattr(self, name, new)
        sums, counts, bsum, sizes = self._sums, self._counts, self._bsum, self._sizes
        a_full = np.append(wt.w, wt.b)
        act = np.append(wt.active, True)
        if g:
            cov = np.concatenate([counts[:g] > 0, np.ones((g, 1), dtype=bool)], axis=1)
            C = cov & act[None, :]
            est = np.concatenate([np.where(counts[:g] > 0, sums[:g] / np.maximum(counts[:g], 1), 0.0),
                                  (bsum[:g] / sizes[:g])[:, None]], axis=1)
            A = np.where(C, a_full[None, :], 0.0)
            E = np.where(C, est, 0.0)
            na = np.linalg.norm(A, axis=1)
            ne = np.linalg.norm(E, axis=1)
            dot = np.sum(A * E, axis=1)
            valid = (C.sum(axis=1) >= self.min_overlap + 1) & (na > 0) & (ne > 0)
            with np.errstate(divide="ignore", invalid="ignore"):
                cos = np.where(valid, np.abs(dot) / (na * ne), 0.0)
            j = int(np.argmax(cos))
            if valid[j] and 1.0 - cos[j] <= self.tol:
                lam = float(dot[j]) / float(na[j] ** 2)
                scaled = a_full * lam
                sums[j] += np.where(wt.active, scaled[:-1], 0.0)
                counts[j] += wt.active
                bsum[j] += scaled[-1]
                sizes[j] += 1
                self._groups[j].append(i)
                return
        sums[g] = np.where(wt.active, wt.w, 0.0)
        counts[g] = wt.active
        bsum[g] = wt.b
        sizes[g] = 1
        self._groups.append([i])


def unify(witnesses: Sequence[Witness], members: Sequence[int]) -> NeuronRow:
    """Solve the homogeneous system of the witnesses ``members`` for one row ``(w, b)``.

    Each witness contributes its constraint rows (the jump direction projected out of its control
    image, and the zero of the pre-activation at its point); the row is the eigenvector of the
    accumulated normal matrix with the smallest eigenvalue.
    """
    d_full = witnesses[members[0]].A_ctrl.shape[1]
    coverage = np.zeros(d_full, dtype=bool)
    for i in members:
        coverage |= witnesses[i].active
    # Coordinates no witness saw active are unobservable here: they are left at zero.
    sel = np.append(coverage, True)
    N = np.zeros((int(sel.sum()), int(sel.sum())))
    for i in members:
        R = witnesses[i].constraint_rows[:, sel]
        N += R.T @ R
    evals, evecs = np.linalg.eigh(N)
    sol = evecs[:, 0]
    top = max(float(evals[-1]), np.finfo(float).tiny)
    res2 = sum(float(np.sum((witnesses[i].constraint_rows[:, sel] @ sol) ** 2)) for i in members)
    smallest = float(np.sqrt(res2 / top))
    low = max(float(evals[0]), top * 1e-32)
    gap = float(np.sqrt(max(float(evals[1]), 0.0) / low)) if evals.size > 1 else float("inf")
    w_full = np.zeros(d_full)
    w_full[coverage] = sol[:-1]
    w, b = _unit(w_full, float(sol[-1]))
    return NeuronRow(w=w, b=b, members=tuple(members), coverage=coverage, residual=smallest, gap=gap)


def on_neuron(wt: Witness, row: NeuronRow, tol: float = 1e-6) -> bool:
    """Zero test: does witness ``wt`` lie on ``row``'s boundary with a jump along ``row``'s direction?"""
    zh = float(row.w @ wt.h + row.b)
    scale = float(np.linalg.norm(row.w) * np.linalg.norm(wt.h) + abs(row.b)) or 1.0
    if abs(zh) > tol * scale:
        return False
    pred = wt.A_ctrl @ row.w
    npred = float(np.linalg.norm(pred))
    if npred == 0:
        return False
    return bool(1.0 - abs(float(pred @ wt.v_ctrl)) / npred <= tol)


def shadowed_rows(rows: Sequence[NeuronRow], witnesses: Sequence[Witness], tol: float = 1e-6) -> set[int]:
    """Rows every witness of which lies on another kept row (:func:`on_neuron`), fewest witnesses
    first, so that of two rows sharing witnesses the better supported one stays; a row dropped for a
    row dropped later is kept again unless the final rows explain its witnesses too.

    A kink lies on one neuron's boundary (two boundaries meet on a set of measure zero), so such a
    row was fitted to other neurons' witnesses: ones that see too few layer-input coordinates to
    tell the rows apart, leaving some weight fixed by a single stray witness."""

    def covered(j: int, dropped: set[int]) -> bool:
        others = [r for i, r in enumerate(rows) if i != j and i not in dropped]
        return bool(rows[j].members) and bool(others) and all(
            any(on_neuron(witnesses[m], r, tol) for r in others) for m in rows[j].members)

    dropped: set[int] = set()
    for j in sorted(range(len(rows)), key=lambda j: len(rows[j].members)):
        if covered(j, dropped):
            dropped.add(j)
    return {j for j in dropped if covered(j, dropped)}


def agrees_on_overlap(wt: Witness, row: NeuronRow, tol: float = 1e-5, min_overlap: int = 2) -> bool:
    """Does a full-rank partial signature match ``row`` (up to scale) on the coordinates both know?

    This places witnesses that see layer-input coordinates the row has not seen yet (where the zero
    test cannot hold, since the row lacks those weights).
    """
    if not wt.full_rank:
        return False
    return parallel_on(wt.active & row.coverage, wt.w, wt.b, row.w, row.b, tol, min_overlap)


def rows_agree(r1: NeuronRow, r2: NeuronRow, tol: float = 1e-6, min_overlap: int = 2) -> bool:
    """Do two rows agree up to scale on the layer-input coordinates both have seen (and the bias)?"""
    return parallel_on(r1.coverage & r2.coverage, r1.w, r1.b, r2.w, r2.b, tol, min_overlap)


def parallel_on(
    C: np.ndarray, w1: FloatArray, b1: float, w2: FloatArray, b2: float, tol: float, min_overlap: int
) -> bool:
    """Are ``(w1[C], b1)`` and ``(w2[C], b2)`` parallel (either sign) within ``tol`` in cosine?"""
    if int(C.sum()) < min_overlap:
        return False
    a = np.append(w1[C], b1)
    e = np.append(w2[C], b2)
    na, ne = float(np.linalg.norm(a)), float(np.linalg.norm(e))
    if na == 0 or ne == 0:
        return False
    return bool(1.0 - abs(float(a @ e)) / (na * ne) <= tol)


def merge_rows(
    rows: Sequence[NeuronRow], witnesses: Sequence[Witness], tol: float = 1e-6, max_residual: float = 1e-8
) -> list[NeuronRow]:
    """Merge fragments of one neuron (groups that saw different parts of its row) and re-unify them."""
    order = sorted(range(len(rows)), key=lambda i: (-int(rows[i].coverage.sum()), -len(rows[i].members)))
    kept: list[NeuronRow] = []
    members: list[list[int]] = []
    for i in order:
        r = rows[i]
        for j, k in enumerate(kept):
            if rows_agree(r, k, tol):
                union = sorted(set(members[j]) | set(r.members))
                merged = unify(witnesses, union)
                if merged.residual > max_residual:
                    continue  # agreement on a few shared coordinates was a coincidence
                members[j] = union
                kept[j] = merged
                break
        else:
            kept.append(r)
            members.append(list(r.members))
    return kept


def zero_test_mask(witnesses: Sequence[Witness], idx: Sequence[int], w: FloatArray, b: float,
                   tol: float = 1e-6) -> np.ndarray:
    """Vectorised first half of :func:`on_neuron` (``w·h + b ≈ 0``) over the witnesses ``idx``."""
    if not idx:
        return np.zeros(0, dtype=bool)
    Hm = np.stack([witnesses[i].h for i in idx])
    z = Hm @ w + b
    scale = np.linalg.norm(Hm, axis=1) * float(np.linalg.norm(w)) + abs(b)
    return np.asarray(np.abs(z) <= tol * np.maximum(scale, np.finfo(float).tiny))


def ransac_rows(
    witnesses: Sequence[Witness],
    pool: Sequence[int],
    rng: np.random.Generator,
    trials: int,
    min_members: int = 4,
) -> list[NeuronRow]:
    """Rows from witnesses that single measurements cannot pin down (rank deficiency, LSELBP26).

    Each witness gives a point ``h(x)`` of the neuron's hyperplane in the layer-input space and the
    direction of the jump in its space of control; three witnesses of one neuron usually determine the
    row, three of different neurons usually have no common solution. Random triples are unified;
    a consistent, unique solution is kept when enough other witnesses lie on it.
    """
    pool = list(pool)
    rows: list[NeuronRow] = []
    if len(pool) < 3:
        return rows
    for _ in range(trials):
        if len(pool) < max(3, min_members):
            break
        trip = [pool[i] for i in rng.choice(len(pool), size=3, replace=False)]
        r = unify(witnesses, trip)
        if r.residual > 1e-9 or r.gap < 1e3:
            continue
        near = [pool[i] for i in np.flatnonzero(zero_test_mask(witnesses, pool, r.w, r.b))]
        members = [i for i in near if on_neuron(witnesses[i], r)]
        if len(members) < min_members:
            continue
        r2 = unify(witnesses, members)
        if r2.residual > 1e-8:
            continue
        rows.append(r2)
        taken = set(members)
        pool = [i for i in pool if i not in taken]
    return rows


@dataclass
class ConstraintStack:
    """Every witness's constraint rows, zero-padded into one array (``R``: witnesses x rows x
    (d_in + 1)), with each one's row count, active coordinates and jump row (``J``: witnesses x
    (d_in + 1), see :func:`jump_row`); :meth:`extend` appends witnesses."""

    R: FloatArray
    n_rows: np.ndarray
    active: np.ndarray
    J: FloatArray

    @classmethod
    def of(cls, witnesses: Sequence[Witness]) -> ConstraintStack:
        d = witnesses[0].A_ctrl.shape[1] if witnesses else 0
        out = cls(np.zeros((0, 1, d + 1)), np.zeros(0, dtype=int), np.zeros((0, d), dtype=bool), np.zeros((0, d + 1)))
        out.extend(witnesses)
        return out

    def extend(self, witnesses: Sequence[Witness]) -> None:
        if not witnesses:
            return
        Rs = [wt.constraint_rows for wt in witnesses]
        rmax = max(self.R.shape[1], max(R.shape[0] for R in Rs))
        new = np.zeros((len(Rs), rmax, Rs[0].shape[1]))
        for j, R in enumerate(Rs):
            new[j, : R.shape[0]] = R
        old = self.R
        if old.shape[1] < rmax:
            old = np.concatenate([old, np.zeros((old.shape[0], rmax - old.shape[1], old.shape[2]))], axis=1)
        self.R = np.concatenate([old, new])
        self.n_rows = np.append(self.n_rows, [R.shape[0] for R in Rs])
        self.active = np.concatenate([self.active, np.stack([wt.active for wt in witnesses])])
        self.J = np.concatenate([self.J, np.stack([jump_row(wt) for wt in witnesses])])


#: A member's jump (:func:`jump_row`) below this share of the row, in units of the witnesses'
#: normalised measurement, is none: the row's pre-activation does not move there, so the witness
#: satisfies its constraints whatever it measured.
JUMP_FLOOR = 1e-4


def jump_row(wt: Witness) -> FloatArray:
    """The row ``(v^T A, 0)`` (``A`` and ``v`` the witness's control map and jump, normalised as in its
    constraint rows): its product with a row ``(w, b)`` is the jump that row predicts at the witness.
    The constraint rows hold ``w`` to ``A w ∥ v``, which ``A w = 0`` satisfies as well: a row whose
    weights all sit on coordinates off at the witness (the boundary of a neuron of the layer before,
    ``w = e_k``, ``b = 0``, wherever neuron ``k`` is off) fits every such witness, and only its zero
    jump tells it apart."""
    A = wt.A_ctrl / (float(np.linalg.norm(wt.A_ctrl)) or 1.0)
    v = wt.v_ctrl / (float(np.linalg.norm(wt.v_ctrl)) or 1.0)
    out: FloatArray = np.append(v @ A, 0.0)
    return out


def jumping_members(witnesses: Sequence[Witness], row: NeuronRow) -> int:
    """How many of ``row``'s witnesses see it jump (:data:`JUMP_FLOOR`)."""
    theta = np.append(row.w, row.b) / (float(np.linalg.norm(np.append(row.w, row.b))) or 1.0)
    return sum(abs(float(jump_row(witnesses[i]) @ theta)) > JUMP_FLOOR for i in row.members)


def consistent_witnesses(
    witnesses: Sequence[Witness] | ConstraintStack, pool: Sequence[int], row: NeuronRow, tol: float = 1e-7,
    margin: int = 4,
) -> list[int]:
    """The witnesses of ``pool`` whose measurements ``row`` satisfies, its unseen weights left free
    (``witnesses`` may be given as their :class:`ConstraintStack`).

    A row seen so far only where some layer-input coordinates were off has no weight for them, so a
    witness where they are on fails the zero test (:func:`on_neuron`) even on the row's own neuron.
    Here each witness's constraint rows are solved for the weights of those coordinates (least
    squares, all witnesses at once), and the witness is consistent when the rest is satisfied to
    ``tol``. Only witnesses with at least ``margin`` more constraint rows than free weights are tested
    (fewer fit anything; the rows hold one constraint fewer than their count, the jump's own
    direction being projected out)."""
    ids = np.asarray([int(i) for i in pool], dtype=int)
    if ids.size == 0:
        return []
    st = witnesses if isinstance(witnesses, ConstraintStack) else ConstraintStack.of(
        [witnesses[i] for i in ids])
    sel = ids if isinstance(witnesses, ConstraintStack) else np.arange(ids.size)
    theta = np.append(row.w, row.b)
    unseen = np.flatnonzero(~row.coverage)
    free = st.active[sel][:, unseen]
    ok = st.n_rows[sel] - free.sum(axis=1) >= margin
    if not ok.any():
        return []
    idx = np.flatnonzero(ok)
    R = st.R[sel[idx]]
    rhs = R @ theta  # (n, rows): the constraints with the unseen weights at zero
    jump = st.J[sel[idx]] @ theta  # (n,): the jump the row predicts there
    if unseen.size:
        F = free[idx]
        A = R[:, :, unseen] * F[:, None, :]  # only the unseen coordinates on at the witness move
        G = np.einsum("nri,nrj->nij", A, A)
        # a coordinate off at the witness has a zero column: its unknown is pinned at 0
        G += np.eye(unseen.size)[None] * np.where(F, 1e-14 * np.maximum(np.trace(G, axis1=1, axis2=2), 1e-300)
                                                  [:, None], 1.0)[:, :, None]
        x = np.linalg.solve(G, -np.einsum("nri,nr->ni", A, rhs)[..., None])[..., 0]
        rhs = rhs + np.einsum("nri,ni->nr", A, x)
        jump = jump + np.einsum("ni,ni->n", st.J[sel[idx]][:, unseen] * F, x)
    res = np.linalg.norm(rhs, axis=1)
    # a witness where the row does not jump satisfies its constraints whatever it measured (jump_row)
    moved = np.abs(jump) > JUMP_FLOOR * float(np.linalg.norm(theta))
    return [int(ids[i]) for i in idx[(res <= tol) & moved]]


def grow_row(
    witnesses: Sequence[Witness], row: NeuronRow, pool: Sequence[int], tol: float = 1e-7, rounds: int = 3,
    stack: ConstraintStack | None = None,
) -> NeuronRow:
    """``row`` re-unified with every witness of ``pool`` consistent with it
    (:func:`consistent_witnesses`), repeated while witnesses join: each new one may show weights the
    row lacked. Gathers the few, mostly rank-deficient, witnesses of a rarely switched neuron that no
    grouping of full-rank signatures joins. ``stack``: the witnesses' :class:`ConstraintStack`, when
    held."""
    members = list(row.members)
    for _ in range(rounds):
        taken = set(members)
        new = consistent_witnesses(witnesses if stack is None else stack, [i for i in pool if i not in taken], row,
                                   tol)
        if not new:
            break
        members += new
        row = unify(witnesses, members)
    return row


def robust_unify(witnesses: Sequence[Witness], members: Sequence[int], rounds: int = 3) -> NeuronRow:
    """:func:`unify`, dropping up to ``rounds`` witnesses whose constraints the row violates far more
    than the others' (one bad finite difference should not spoil a neuron)."""
    members = list(members)
    row = unify(witnesses, members)
    for _ in range(rounds):
        if len(members) <= 3:
            break
        x = np.append(row.w, row.b)
        viol = np.array([float(np.linalg.norm(witnesses[i].constraint_rows @ x)) for i in members])
        worst = int(np.argmax(viol))
        if viol[worst] <= 10.0 * float(np.median(viol)):
            break
        members.pop(worst)
        row = unify(witnesses, members)
    return row


def trimmed_unify(witnesses: Sequence[Witness], members: Sequence[int], max_frac: float = 0.25,
                  tol: float = 1e-8) -> NeuronRow:
    """:func:`unify` after dropping, one at a time, the witness whose constraints the row violates
    most, until the witnesses agree to ``tol`` (at most ``max_frac`` of them dropped, three kept).

    For a group that holds a few witnesses of another boundary (a neuron missing from the layer
    before, whose kinks no known row explains): their constraints pull the solution of the whole
    group into a mixture, so no single one stands ten times above the median, as
    :func:`robust_unify` asks; the most violated one is still foreign. Returns the last fit, which
    the caller judges (residual and uniqueness gap)."""
    members = list(members)
    row = unify(witnesses, members)
    budget = int(max_frac * len(members))
    while row.residual > tol and budget > 0 and len(members) > 3:
        x = np.append(row.w, row.b)
        viol = [float(np.linalg.norm(witnesses[i].constraint_rows @ x)) for i in members]
        members.pop(int(np.argmax(viol)))
        budget -= 1
        row = unify(witnesses, members)
    return row
