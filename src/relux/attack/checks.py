"""Ground-truth-free checks: the oracle's noise floor and the self-check on fresh queries."""

from __future__ import annotations

import numpy as np

from relux.attack.probes import probe_points
from relux.attack.result import SelfCheck
from relux.lines import kink_parameters, line_parameters
from relux.model import MLP
from relux.oracle.base import FloatArray, QueryFn


def measure_noise_floor(query: QueryFn, d: int, scale: float, rng: np.random.Generator, n: int = 8) -> float:
    """How far the oracle is from an exact float64 piecewise-linear function, relative to ``max |f|``.

    Two measurements (attack-notes §7; issue: numerical honesty):

    - repeatability: the same points asked alone, in a shuffled batch and padded with other points
      (real BLAS answers differ slightly across batch sizes);
    - local linearity: three collinear points ``x - h u, x, x + h u`` on a tiny segment lie on one
      affine piece (a kink that close is unlikely), so the middle value must be the mean of the
      outer ones up to float64 rounding; float32 inference, rounding of the outputs or additive noise
      break this. The median over ``n`` segments is used, so a rare kink does not count.

    Returns the larger of the two (0 for an exact deterministic oracle). Costs ``7 n + 4`` queries.
    """
    X = rng.normal(0.0, scale, size=(n, d))
    pad = rng.normal(0.0, scale, size=(2 * n, d))
    U = rng.normal(size=(n, d))
    U *= (1e-4 * scale * np.sqrt(d)) / np.linalg.norm(U, axis=1, keepdims=True)
    Y1 = query(X)
    perm = rng.permutation(3 * n)
    B = np.concatenate([X, pad])[perm]
    Y2 = query(B)[np.argsort(perm)][:n]
    Y3 = np.concatenate([query(X[i : i + 1]) for i in range(min(n, 4))])
    Yl = query(np.concatenate([X - U, X + U]))
    ref = float(np.max(np.abs(np.concatenate([Y1, Yl]))))
    if ref == 0:
        return 0.0
    repeat = max(float(np.max(np.abs(Y1 - Y2))), float(np.max(np.abs(Y1[: Y3.shape[0]] - Y3))))
    bend = np.max(np.abs(Y1 - 0.5 * (Yl[:n] + Yl[n:])), axis=1)
    # float64 rounding of an exact oracle bends a segment by a few ulps of |f|: not noise
    linear = max(float(np.median(bend)) - 64.0 * float(np.finfo(float).eps) * ref, 0.0)
    return max(repeat, linear) / ref


#: a failed self-check (``stop_early``) stops after this share of its random points at least, and at least
#: :data:`STOP_MIN_POINTS`: enough to tell a model wrong at many inputs (a wrong row, a resume that made it
#: worse: :data:`relux.attack.resume.WORSE_MIN` disagreements) from one wrong at a few (a missing rare
#: neuron), which the rest would not change; a failed attempt of digits 64-40x4-10 costs 12.5k points, not 25k
STOP_SHARE = 0.125
STOP_MIN_POINTS = 4000


def self_check(
    query: QueryFn,
    model: MLP,
    witnesses: FloatArray,
    normals: FloatArray,
    radii: FloatArray,
    n_random: int,
    scale: float,
    tol: float,
    noise_floor: float,
    rng: np.random.Generator,
    suspects: FloatArray | None = None,
    n_lines: int = 0,
    line_points: int = 128,
    stop_early: bool = False,
    probe_share: float = 0.0,
) -> SelfCheck:
    """Compare ``model`` with the oracle on fresh points: random ones, points along lines through
    every witness (random points miss neurons whose active region is small), and ``suspects``, inputs
    where an earlier stage saw the model miss (queried again here, so that the verdict rests on this
    check's own answers).

    ``n_lines`` random lines too, through ``N(0, scale^2 I)`` and ``U[0, scale]^d`` points in turn, each over
    the central 90% of its crossings with the model's first-layer hyperplanes, at those crossings and
    ``line_points`` grid points (:mod:`relux.lines`, as :func:`relux.verify.verify` does), each judged
    against the largest ``|f|`` on its own line: a row wrong only in weights that inputs far from the
    random points' region show passes every random point. Their worst inputs (two a line) come after the
    others' in ``disagreements``.

    Passes when ``max |f - f_hat| <= max(tol, 100 * noise_floor) * max |f|``. The inputs that fail it
    are kept in ``disagreements`` (the 16 worst), and those among the random points counted in
    ``disagreeing``.

    ``stop_early``: the random points go in chunks of :data:`STOP_SHARE` (or smaller when the input is
    wide), and a check that has failed by twice its tolerance once that share of them (probes included), and
    at least :data:`STOP_MIN_POINTS`, were asked (on them or on the points before them) stops there, without the
    rest or the lines: a failed attempt's verdict needs no more queries (``random_points`` and
    ``probe_points`` then count the Gaussian points and the probes asked).

    ``probe_share``: this share of each chunk of random points are probes instead
    (:func:`relux.attack.probes.probe_points`: inputs where a random functional of one of the model's hidden
    layers is largest, or where a row and one of its input coordinates are on together), which turn rarely
    active neurons on, and show weights that act rarely, far more often than Gaussian points do (fewer
    for a wide model).
    They count in ``probe_points``, not in ``random_points`` nor ``disagreeing`` (whose ratio estimates
    the share of inputs where the model is wrong), and their worst inputs are among ``disagreements``.
    """
    d = model.input_dim
    pts: list[FloatArray] = [suspects] if suspects is not None and suspects.size else []
    if witnesses.size:
        m = witnesses.shape[0]
        for f in (-1.5, -0.5, 0.5, 1.5):
            pts.append(witnesses + (f * radii)[:, None] * normals)
        V = rng.normal(size=(m, d))
        V *= (radii / np.linalg.norm(V, axis=1))[:, None]
        pts.append(witnesses + V)
        pts.append(witnesses - V)
    # the random points a chunk at a time (a check of 10^5 points at 3,072 inputs is 2.4 GB at once)
    memory_chunk = max(1, min(n_random, 2**22 // max(d, 1)))
    share = int(np.ceil(STOP_SHARE * n_random))
    first = min(n_random, max(share, STOP_MIN_POINTS))
    chunk = max(1, min(memory_chunk, share)) if stop_early else memory_chunk
    sizes = [min(chunk, n_random - i) for i in range(0, n_random, chunk)]
    n_total = n_random + sum(P.shape[0] for P in pts)
    err = ref = 0.0
    worst_x = np.zeros((0, d))
    worst_e = np.zeros(0)
    errors: list[FloatArray] = []
    fixed = [np.concatenate(pts)] if pts else []
    thr = max(tol, 100.0 * noise_floor)
    stopped = False
    # the probes, made at once (the pairs least often on together are chosen over all of them) and asked a
    # share of each chunk
    probes = probe_points(model.layers, int(round(probe_share * n_random)), scale, rng).points
    n_probes = 0
    for i in range(len(fixed) + len(sizes)):
        asked = sum(sizes[: max(i - len(fixed), 0)])
        # failed already, by twice the tolerance (the largest |f| of the points not asked could only loosen
        # the verdict), after STOP_SHARE of the random points at least
        if stop_early and asked >= first and err > 2.0 * thr * max(ref, np.finfo(float).tiny):
            stopped = True
            n_total -= n_random - asked
            n_random = asked
            break
        n_probe = 0
        if i < len(fixed):
            X = fixed[i]
        else:
            size = sizes[i - len(fixed)]
            n_probe = min(int(round(probe_share * size)), probes.shape[0] - n_probes)
            X = np.concatenate([probes[n_probes:n_probes + n_probe], rng.normal(0.0, scale, size=(size - n_probe, d))])
            n_probes += n_probe
        Y = query(X)
        e = np.max(np.abs(Y - model.forward(X)), axis=1)
        e = np.where(np.isfinite(e), e, np.inf)  # a NaN answer is a disagreement, never a pass
        if i >= len(fixed):
            errors.append(e[n_probe:])  # the Gaussian points' (the probes are not a sample of inputs)
        err = max(err, float(e.max(initial=0.0)))
        ref = max(ref, float(np.max(np.abs(Y), initial=0.0)))
        top = np.argsort(e)[::-1][:16]
        worst_x = np.concatenate([worst_x, X[top]])
        worst_e = np.concatenate([worst_e, e[top]])
        keep = np.argsort(worst_e)[::-1][:16]
        worst_x, worst_e = worst_x[keep], worst_e[keep]
    ref = max(ref, np.finfo(float).tiny)
    rel = err / ref
    bad = worst_e > thr * ref
    n_bad = sum(int(np.count_nonzero(e > thr * ref)) for e in errors)
    # The lines are judged on their own scale (|f| grows along them: sharing max |f| would loosen the
    # verdict on the other points), and their inputs come after the others' among the disagreements (a
    # resumed attempt aims at those first: near where the model was built, where its rows were found).
    worst = [x for x in worst_x[bad]]
    W1, b1 = model.layers[0]
    lines: list[FloatArray] = []
    for line in range(0 if stopped else n_lines):
        x0 = rng.normal(0.0, scale, size=d) if line % 2 == 0 else scale * rng.random(d)
        u = rng.normal(size=d)
        u /= np.linalg.norm(u)
        t = line_parameters(kink_parameters(W1, b1, x0, u), np.zeros(0), line_points, 0.9)
        lines.append(x0[None, :] + t[:, None] * u[None, :])
    # the lines together, in as few oracle calls as the memory chunk of the random points allows
    P_lines = np.concatenate(lines) if lines else np.zeros((0, d))
    Y_lines = (np.concatenate([query(P_lines[i:i + memory_chunk])
                               for i in range(0, P_lines.shape[0], memory_chunk)])
               if P_lines.shape[0] else np.zeros((0, model.output_dim)))
    ends = np.cumsum([X.shape[0] for X in lines])
    for X, Y in zip(lines, np.split(Y_lines, ends[:-1]) if lines else [], strict=True):
        e = np.max(np.abs(Y - model.forward(X)), axis=1)
        e = np.where(np.isfinite(e), e, np.inf)
        # the line's scale from its finite answers; a NaN or infinite answer is a disagreement, never a pass
        finite = np.abs(Y[np.isfinite(Y)])
        r = e / max(float(np.max(finite, initial=0.0)), np.finfo(float).tiny)
        r = np.where(np.isfinite(r), r, np.inf)
        n_total += X.shape[0]
        err = max(err, float(e.max(initial=0.0)))
        rel = max(rel, float(r.max(initial=0.0)))
        worst += [X[k] for k in np.argsort(r)[::-1][:2] if r[k] > thr]
    return SelfCheck(points=n_total, max_abs_error=err, max_rel_error=rel, tolerance=thr,
                     noise_floor=noise_floor, passed=bool(rel <= thr), random_points=n_random - n_probes,
                     disagreeing=n_bad, probe_points=n_probes,
                     disagreements=tuple(tuple(float(v) for v in x) for x in worst[:16]))
