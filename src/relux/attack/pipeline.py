"""The extraction pipeline: from an oracle to a verified model.

Stages (attack-notes §2-5): noise floor, critical points and first-layer signatures, refinement,
signs and output layer (CM24 §5 for the last hidden layer), and the self-check on fresh queries.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import numpy as np

from relux.attack.checks import measure_noise_floor, self_check
from relux.attack.config import ExtractionConfig
from relux.attack.first_layer import RefinedRow, discover_first_layer, refine_first_layer
from relux.attack.frame import input_frame
from relux.attack.hyperplanes import stack_signatures
from relux.attack.linalg import lstsq
from relux.attack.refine_net import refine_network
from relux.attack.reread import reread_rare_rows
from relux.attack.result import ExtractionResult, LayerReport, PartialResult, StageStats
from relux.attack.resume import (
    RESUME_MAX_SHARE,
    Resume,
    recovered_rows,
    resume_point,
    resumed_layer,
)
from relux.attack.signs import fit_affine_plus_relu, solve_flips
from relux.errors import ExtractionFailed, InputError
from relux.model import MLP, parse_arch
from relux.oracle.base import FloatArray, Oracle

if TYPE_CHECKING:
    from relux.attack.deep import LayerOutcome
from relux.oracle.wrappers import CountingOracle
from relux.parallel import Executor, SerialExecutor, execution_report, make_executor

log = logging.getLogger(__name__)

#: The ``rows_from`` of rows read by chords (:mod:`relux.attack.all_on_layer`, :mod:`relux.attack.pattern_layer`).
CHORD_SOURCES = ("all-on lines", "pattern regions", "all-on lines and pattern regions")


class _Stages:
    """Records queries and seconds per stage from one counting oracle."""

    def __init__(self, counter: CountingOracle, executor: Executor | None = None) -> None:
        self.counter = counter
        self.stats: list[StageStats] = []
        # relux.parallel: runs the pure per-neuron work; its seconds are recorded per stage.
        self.executor: Executor = executor if executor is not None else SerialExecutor()
        self.parallel: list[tuple[str, int | None, float]] = []
        self.t_start = time.perf_counter()
        self.noise_floor = float("nan")  # set once measured, for reports of runs that fail later

    @contextmanager
    def stage(self, name: str, layer: int | None = None) -> Iterator[None]:
        q0, t0, p0 = self.counter.queries, time.perf_counter(), self.executor.parallel_seconds
        log.info("stage %s%s", name, "" if layer is None else f" (layer {layer})")
        try:
            yield
        finally:
            self.stats.append(StageStats(name, self.counter.queries - q0, time.perf_counter() - t0, layer))
            self.parallel.append((name, layer, self.executor.parallel_seconds - p0))

    def total(self, layer: int) -> tuple[int, float]:
        sel = [s for s in self.stats if s.layer == layer]
        return sum(s.queries for s in sel), sum(s.seconds for s in sel)


def _check_arch(oracle: Oracle, arch: Sequence[int] | str | None) -> tuple[int, ...]:
    if arch is None:
        raise InputError("the architecture is required (e.g. '784-128-10'): pass arch=...")
    a = parse_arch(arch) if isinstance(arch, str) else tuple(int(x) for x in arch)
    if len(a) < 3:
        raise InputError(f"expected at least one hidden layer in the architecture, found {a}")
    if a[0] != oracle.input_dim or a[-1] != oracle.output_dim:
        raise InputError(
            f"architecture {a} does not match the oracle: it takes {oracle.input_dim} inputs and returns "
            f"{oracle.output_dim} outputs; fix --arch"
        )
    return a


def extract(
    oracle: Oracle,
    arch: Sequence[int] | str | None,
    config: ExtractionConfig | None = None,
) -> ExtractionResult:
    """Recover a ReLU network from black-box queries to ``oracle``.

    ``arch`` gives the widths, e.g. ``(784, 128, 1)``. The oracle is the only access to the victim.
    Raises :class:`~relux.errors.ExtractionFailed` (with ``partial`` holding the result) when the
    self-check on fresh queries contradicts the extracted model.

    ``config.jobs``, ``config.backend`` and ``config.ray_address`` choose where the pure per-neuron
    work runs (:mod:`relux.parallel`); the oracle is queried from this process only.
    """
    cfg = config or ExtractionConfig()
    a = _check_arch(oracle, arch)
    counter = CountingOracle(oracle)
    t_start = time.perf_counter()
    # Deep extraction is a randomised search whose every result is checked on fresh queries: a failed
    # attempt is restarted from new random lines (a Las Vegas algorithm), or resumed from its first
    # incomplete layer when its model was wrong on a few inputs only. One hidden layer needs neither.
    deep = len(a) > 3
    fresh, resumes = (cfg.restarts + 1, cfg.resumes) if deep else (1, 0)
    bonus = resumes  # resumes after one that recovered rows, which do not count against ``resumes``
    failed: list[StageStats] = []
    notes: list[str] = []
    # inputs where a failed attempt's model disagreed with f: the next attempt aims search lines there
    # first (a rarely on neuron it lacked is likely on there); a resumed attempt aims at its own
    hints = np.zeros((0, a[0]))
    # every such input of every failed attempt: each later self-check queries them again, so that no
    # attempt passes where an earlier one was seen wrong (more attempts are not more chances to miss)
    wrong_before = np.zeros((0, a[0]))
    resume: Resume | None = None
    attempt = fresh_used = 0
    # queries of the last fresh attempt, and of the resumes since: a resume past the counted ones goes on
    # while the second stays below the first (a restart would cost about as much as that attempt again)
    fresh_cost = chain_cost = 0
    with make_executor(cfg.backend, cfg.jobs, cfg.ray_address) as executor:
        while True:
            q0, t0 = counter.queries, time.perf_counter()
            seed = cfg.seed + attempt
            attempt += 1
            fresh_used += resume is None
            nxt: Resume | None = None
            try:
                aim = resume.hints if resume is not None else hints
                result, nxt = _extract(counter, a, cfg, executor, seed, t_start, failed, notes, aim, resume,
                                       wrong_before)
                if result.selfcheck.passed:
                    return result
                exc = ExtractionFailed(
                    f"self-check failed: fresh queries differ from the extracted model by "
                    f"{result.selfcheck.max_rel_error:.2e} relative to max |f| (tolerance "
                    f"{result.selfcheck.tolerance:.1e})",
                    partial=result,
                )
            except ExtractionFailed as err:
                exc = err
            if isinstance(exc.partial, ExtractionResult) and exc.partial.selfcheck.disagreements:
                worst = np.array(exc.partial.selfcheck.disagreements)
                wrong_before = np.concatenate([wrong_before, worst])
                sc0 = exc.partial.selfcheck
                if sc0.disagreeing <= RESUME_MAX_SHARE * sc0.random_points:
                    # where a model right nearly everywhere is wrong, a rare neuron it lacks is on; a model
                    # wrong on more (a wrong sign) is wrong anywhere: its worst inputs point nowhere
                    hints = np.concatenate([worst, hints])[:32]
            failed.append(StageStats(f"failed_attempt_{attempt}", counter.queries - q0,
                                     time.perf_counter() - t0, None))
            if resume is None:
                fresh_cost, chain_cost = counter.queries - q0, 0
            else:
                chain_cost += counter.queries - q0
            how = f"seed {seed}" + (f", resumed at layer {resume.layer}" if resume is not None else "")
            notes.append(f"attempt {attempt} ({how}) failed: {exc}")
            if nxt is None and resume is not None and exc.restartable:
                # a resumed attempt that failed otherwise tells nothing new about the layers it kept,
                # which the attempt before it showed right nearly everywhere: the same point again
                nxt = resume
            sc = exc.partial.selfcheck if isinstance(exc.partial, ExtractionResult) else None
            worse = False
            if resume is not None and sc is not None and exc.restartable and resume.made_worse(sc):
                worse = True
                # it left the model worse: what it added is wrong and is not built on; the attempt before it is
                # resumed again, at the short layer before when this was the last hidden layer's resume
                back = resume.fallback if resume.fallback is not None else resume
                log.warning("attempt %d left the model worse (%.1e of random points wrong and at most %.1e, against "
                            "%.1e and %.1e): not built on; the next resume, if any, starts from the attempt before "
                            "it at layer %d", attempt,
                            sc.disagreeing / max(sc.random_points, 1), sc.max_rel_error, resume.disagreeing,
                            resume.max_rel_error, back.layer)
                nxt = back
            # a resumed attempt that recovered rows of the layer it resumed at made progress: the next
            # resume is free (up to another ``cfg.resumes``), a restart would give that progress away
            free = resume is not None and nxt is not None and bonus > 0 and recovered_rows(resume, nxt)
            # past the counted resumes: while they cost less than the fresh attempt, but not after one that left
            # the model worse (its point may lead nowhere: random 30-15-15-15-1 victim 5 went back four times to
            # one whose resumes each gave a wrong row)
            afford = cfg.resumes > 0 and chain_cost < fresh_cost and not worse
            if nxt is not None and (free or resumes > 0 or afford):
                if free:
                    bonus -= 1
                elif resumes > 0:
                    resumes -= 1
                resume = nxt
                log.warning("attempt %d failed (%s); resuming at layer %d, keeping the %d layer(s) before it "
                            "and its rows", attempt, exc, nxt.layer, len(nxt.layers))
                continue
            if fresh_used >= fresh or not exc.restartable:
                raise exc
            resume = None
            log.warning("attempt %d failed (%s); restarting from new random lines", attempt, exc)


def _extract(
    counter: CountingOracle,
    a: tuple[int, ...],
    cfg: ExtractionConfig,
    executor: Executor,
    seed: int,
    t_start: float,
    prior: Sequence[StageStats],
    notes: Sequence[str],
    hints: FloatArray | None = None,
    resume: Resume | None = None,
    wrong_before: FloatArray | None = None,
) -> tuple[ExtractionResult, Resume | None]:
    """One attempt: the result (its self-check passed or not) and, when it failed, where the next
    attempt may resume it (:func:`relux.attack.resume.resume_point`). ``wrong_before``: inputs where
    earlier attempts' models disagreed with ``f``, queried again by this attempt's self-check."""
    stages = _Stages(counter, executor)
    stages.stats.extend(prior)
    stages.t_start = t_start
    rng = np.random.default_rng(seed)
    d0 = a[0]
    scale = cfg.input_scale
    with stages.stage("noise_floor"):
        floor = measure_noise_floor(counter.query, d0, scale, rng)
    stages.noise_floor = floor
    rel_tol = cfg.kink_rel_tol if cfg.kink_rel_tol is not None else max(2.0**-36, 1e3 * floor)
    log.info("noise floor %.2e, kink tolerance %.2e", floor, rel_tol)
    if len(a) == 3:
        model, layer, witnesses, normals, radii, warnings = _extract_one_hidden(counter, a, cfg, rng, rel_tol, stages)
        layer_reports: tuple[LayerReport, ...] = (layer,)
        suspects: FloatArray | None = None
        layer_points: list[FloatArray] = []
    else:
        model, layer_reports, witnesses, warnings, suspects, layer_points = _extract_deep(
            counter, a, cfg, rng, rel_tol, stages, hints, resume)
        normals = rng.normal(size=witnesses.shape)
        normals /= np.linalg.norm(normals, axis=1, keepdims=True)
        radii = np.full(witnesses.shape[0], 0.05 * cfg.input_scale * np.sqrt(a[0]))
    with stages.stage("selfcheck"):
        # a longer run could have missed rarer neurons: it is checked on more points; so is every
        # attempt after failed ones (each is one more chance for a wrong model to miss a rare region)
        n_check = max(cfg.selfcheck_points,
                      min(int(np.ceil(cfg.selfcheck_fraction * counter.queries * (len(prior) + 1))),
                          cfg.selfcheck_max_points))
        if any(r.dead > 0 for r in layer_reports):
            # a neuron dropped as dead may be on where no search line went
            n_check = max(n_check, min(cfg.selfcheck_dead_points, cfg.selfcheck_max_points))
        if wrong_before is not None and wrong_before.size:
            suspects = wrong_before if suspects is None else np.concatenate([suspects, wrong_before])
        check = self_check(counter.query, model, witnesses, normals, radii, n_check,
                           scale, cfg.selfcheck_tol, floor, rng, suspects, cfg.selfcheck_lines,
                           stop_early=cfg.selfcheck_stop_early, probe_share=cfg.selfcheck_probe_share)
    # A complete model wrong at a few inputs may only be imprecise in weights that act there (a rarely active
    # neuron's, seen by few points): the network refinement again, at those inputs too, then a check again.
    for _ in range(REPAIR_ROUNDS):
        if (check.passed or len(a) <= 3 or cfg.refine_network_max_params <= 0 or not check.disagreements
                or check.disagreeing > RESUME_MAX_SHARE * check.random_points
                or any(r.recovered < r.width for r in layer_reports)):
            break
        wrong = np.asarray(check.disagreements)
        with stages.stage("repair"):
            full, ref = refine_network(counter.query, list(model.layers), d0, scale, rng, extra=wrong,
                                       max_params=cfg.refine_network_max_params,
                                       accept_misfit=max(cfg.selfcheck_tol, 100.0 * floor))
        log.info("self-check failed at %d input(s) of a complete model: refined again, output misfit %.1e -> %.1e, "
                 "in rare neurons' regions %.1e -> %.1e (%d Gauss-Newton steps%s)", wrong.shape[0], ref.misfit_before,
                 ref.misfit_after, ref.rare_before, ref.rare_after, ref.steps, f"; {ref.reason}" if ref.reason else "")
        if ref.steps == 0:
            break
        model = MLP(full)
        suspects = wrong if suspects is None else np.concatenate([suspects, wrong])
        with stages.stage("selfcheck"):
            # every input the model was wrong at is asked again
            check = self_check(counter.query, model, witnesses, normals, radii, n_check,
                               scale, cfg.selfcheck_tol, floor, rng, suspects, cfg.selfcheck_lines,
                               stop_early=cfg.selfcheck_stop_early, probe_share=cfg.selfcheck_probe_share)
    result = ExtractionResult(
        model=model,
        arch=a,
        queries=counter.queries,
        seconds=time.perf_counter() - t_start,
        stages=tuple(stages.stats),
        layers=layer_reports,
        selfcheck=check,
        noise_floor=floor,
        config={**cfg.to_json(), "seed_used": seed},
        warnings=(*notes, *warnings),
        execution=execution_report(executor, stages.parallel),
    )
    resumed_at = resume.layer if resume is not None else 0
    # rows the resumed layer gained over those kept (its aimed search found some)
    gained = resume is not None and layer_reports[resumed_at - 1].recovered > resume.rows[0].shape[0]
    # random inputs for resume_point to tell rarely active rows, when every layer is complete
    sample = (rng.normal(0.0, scale, size=(8192, d0)) if not check.passed and all(
        r.recovered >= r.width for r in layer_reports) else None)
    nxt = (resume_point(model, layer_reports, layer_points, check, resumed_at, gained, sample, resume)
           if len(a) > 3 else None)
    return result, nxt


def _extract_one_hidden(
    counter: CountingOracle,
    a: tuple[int, ...],
    cfg: ExtractionConfig,
    rng: np.random.Generator,
    rel_tol: float,
    stages: _Stages,
) -> tuple[MLP, LayerReport, FloatArray, FloatArray, FloatArray, list[str]]:
    d0, d1, k = a
    q = counter.query
    warnings: list[str] = []
    with stages.stage("critical_points+signatures", layer=1):
        sigs, dinfo = discover_first_layer(q, d0, d1, cfg, rng, rel_tol)
    if not sigs:
        raise ExtractionFailed(
            "no kink of f was confirmed on any search line: expected the kinks of a ReLU network, found none "
            "that behaves like one (f is affine, or not a ReLU network); check the oracle and --input-scale"
        )
    W, b, starts = stack_signatures(sigs)
    rows: list[RefinedRow] = []
    with stages.stage("refinement", layer=1):
        for _pass in range(max(cfg.refine_passes, 1)):
            rows, Xs, Fs = refine_first_layer(q, W, b, starts, cfg, rng, executor=stages.executor)
            bad = [j for j, r in enumerate(rows) if not r.ok]
            if bad:
                # One retry from a different base point for rows whose re-measurement failed.
                starts2 = starts.copy()
                for j in bad:
                    starts2[j] = starts[j] + rng.normal(0.0, 0.3 * cfg.input_scale, size=d0)
                retry, Xr, Fr = refine_first_layer(q, W, b, starts2, cfg, rng, only=bad, executor=stages.executor)
                for j, row in zip(bad, retry, strict=True):
                    if row.ok:
                        rows[j] = row
                Xs = np.concatenate([Xs, Xr])
                Fs = np.concatenate([Fs, Fr])
            W = np.stack([r.w for r in rows])
            b = np.array([r.b for r in rows])
            starts = np.stack([r.point for r in rows])
    for j, r in enumerate(rows):
        if not r.ok:
            warnings.append(f"layer 1 neuron {j}: refinement failed ({r.reason})")
    with stages.stage("signs+output", layer=1):
        n_fit = d0 + W.shape[0] + 64
        Xf = rng.normal(0.0, cfg.input_scale, size=(n_fit, d0))
        Yf = q(Xf)
        X = np.concatenate([Xs, Xf])
        Y = np.concatenate([Fs, Yf])
        Z = X @ W.T + b
        alpha, gamma, _c = fit_affine_plus_relu(Z, X, Y)
        sol = solve_flips(alpha, gamma, W, cfg.max_enum_bits)
        if not sol.ok:
            warnings.append(f"layer 1 signs: {sol.reason}")
        sgn = np.where(sol.flips, -1.0, 1.0)
        W = W * sgn[:, None]
        b = b * sgn
        H = np.maximum(X @ W.T + b, 0.0)
        D = np.concatenate([H, np.ones((H.shape[0], 1))], axis=1)
        coef = lstsq(D, Y)
        W_out, b_out = coef[:-1].T, coef[-1]
    model = MLP([(W, b), (W_out, b_out)])
    q1, s1 = stages.total(1)
    neurons = tuple(
        {
            "index": j,
            "clearance": rows[j].clearance,
            "refine_change": rows[j].change,
            "rank_ratio": rows[j].rank_ratio,
            "ok": rows[j].ok,
            "reason": rows[j].reason,
            "sign_flipped": bool(sol.flips[j]),
            "sign_confidence": float(sol.confidence[j]),
            "relevant": bool(sol.relevant[j]),
        }
        for j in range(len(rows))
    )
    dead = d1 - len(rows)
    if dead:
        warnings.append(f"layer 1: {dead} neuron(s) never seen on {dinfo.lines} lines: reported dead and dropped")
    layer = LayerReport(
        index=1,
        width=d1,
        recovered=len(rows),
        dead=dead,
        witnesses=dinfo.kinks,
        queries=q1,
        seconds=s1,
        sign_method=f"last-layer {sol.method} (free bits {sol.free_bits}, solutions {sol.solutions})",
        neurons=neurons,
    )
    witnesses = np.stack([r.point for r in rows])
    radii = np.array([max(r.clearance, 1e-12) * 0.5 for r in rows])
    log.info("layer 1: %d/%d neurons, %s", len(rows), d1, layer.sign_method)
    return model, layer, witnesses, W / np.linalg.norm(W, axis=1, keepdims=True), radii, warnings


def _with_flips(
    layers: list[tuple[FloatArray, FloatArray]],
    prev: LayerReport,
    flips: np.ndarray,
    confidence: FloatArray,
    decided: np.ndarray,
) -> tuple[list[tuple[FloatArray, FloatArray]], tuple[dict[str, Any], ...], list[int]]:
    """Layer ``i - 1`` with the rows ``flips`` negated, its report's neurons with their signs (and the
    confidence of each ``decided`` one) updated, and the flipped indices."""
    W, b = layers[-1]
    sgn = np.where(flips, -1.0, 1.0)
    neurons = tuple(
        {**nr, "sign": int(nr.get("sign", 1)) * int(sgn[j]),
         "sign_confidence": float(confidence[j]) if decided[j] else nr.get("sign_confidence", 0.0)}
        for j, nr in enumerate(prev.neurons)
    )
    return [*layers[:-1], (W * sgn[:, None], b * sgn)], neurons, [int(j) for j in np.flatnonzero(flips)]


def _from_chords(prev: LayerReport) -> bool:
    """Whether every row of the layer before came from all-on lines or pattern regions."""
    return all(nr.get("rows_from") in CHORD_SOURCES for nr in prev.neurons)


def _short_of_corners_at_most(prev: LayerReport, rows: int) -> bool:
    """Whether the layer before lacks at most :func:`relux.attack.all_on_layer.corner_allowance` rows."""
    from relux.attack.all_on_layer import corner_allowance

    return rows >= prev.width - corner_allowance(prev.width)


def _ready_for_chords(prev: LayerReport, rows: int) -> bool:
    """Whether the layer before (its report, and the ``rows`` it has) is ready for the chords of its
    all-on region (attack-notes §3). Either it is complete and every sign settled (a clean wiggle
    verdict, or a check by walks), or it came from all-on lines or pattern regions a few rows short
    (:func:`relux.attack.all_on_layer.corner_allowance`; the missing neurons are likely off in most of
    the region) and every sign is decided. ``deep._layer_signs`` caps a short layer's verdicts at
    confidence 0.5, even the clean ones, and the walks that would check them found no row behind
    256-wide CIFAR layers; the chords check the signs too (a neuron believed on where it is off has no
    weight in any row; :func:`_all_on_layer`). A complete layer keeps the walks' check of its
    unsettled signs, as the deep suite was measured with, unless its rows were read in pattern regions
    (its all-on region too thin or empty): every sign decided is then enough. Behind the CIFAR-scale
    unitary layers 1-3 the wiggle left 3 of 256 layer-4 signs at 0.5 (neurons off wherever it probed),
    and the walks found no row there in 38 minutes (session 34); the next layer's rows check them.
    Otherwise the walks check the signs first."""
    conf = [float(nr.get("sign_confidence", 0.0)) for nr in prev.neurons]
    if rows == prev.width:
        patterned = all("pattern regions" in str(nr.get("rows_from")) for nr in prev.neurons)
        return all(c >= 1.0 for c in conf) or (patterned and all(c >= 0.5 for c in conf))
    return _from_chords(prev) and _short_of_corners_at_most(prev, rows) and all(c >= 0.5 for c in conf)


def _all_on_layer(
    q: Callable[[FloatArray], FloatArray],
    layers: list[tuple[FloatArray, FloatArray]],
    reports: list[LayerReport],
    width: int,
    d0: int,
    is_last: bool,
    cfg: ExtractionConfig,
    rng: np.random.Generator,
    rel_tol: float,
    executor: Executor | None,
    warnings: list[str],
) -> tuple[list[tuple[FloatArray, FloatArray]], list[LayerReport], LayerOutcome | None]:
    """Layer ``i`` from chords of the region where every known neuron is on
    (:func:`relux.attack.all_on_layer.all_on_outcome`), or, when no input has them all on and the layer
    before is at least ``cfg.pattern_min_width`` wide, of regions where it follows fixed patterns
    (:func:`relux.attack.pattern_layer.pattern_outcome`). Either also checks layer ``i - 1``'s signs: a
    neuron of it that no row weights is off where it was believed on. Such neurons (half the layer at
    most) are flipped and the chords tried once more; the flips are kept only when every row then
    weights every neuron. (The wiggle can be wrong at full confidence when a few rows of the layer
    before stayed unrefined: behind CIFAR layer 1, 10 rows off by up to 9e-6 gave 34 wrong signs.)
    Returns the layers (layer ``i - 1`` possibly flipped), the reports and the outcome, or the given
    layers and reports with None (the walks and witness groups then take the layer). ``rng``: a
    stream of its own, so that after a failure what follows draws as before."""
    from relux.attack.all_on_layer import NO_REGION, all_on_outcome
    from relux.attack.pattern_layer import pattern_outcome

    i = len(layers) + 1
    prev = reports[-1]
    read = all_on_outcome
    out, why, zero = read(q, layers, width, d0, is_last, cfg, rng, rel_tol, executor=executor)
    if out is None and why == NO_REGION and prev.width >= cfg.pattern_min_width:
        # no input has every known neuron on: regions where the layer before follows a pattern
        log.info("layer %d: %s; regions of fixed pattern instead", i, why)
        read = pattern_outcome
        out, why, zero = read(q, layers, width, d0, is_last, cfg, rng, rel_tol, executor=executor)
    flipped: list[int] = []
    if out is None and 0 < zero.size <= max(1, prev.width // 2):
        flips = np.zeros(layers[-1][0].shape[0], dtype=bool)  # a layer short of corner neurons has fewer rows
        flips[zero] = True
        trial, neurons, flipped = _with_flips(layers, prev, flips, np.ones(flips.size), flips)
        log.info("layer %d: neuron(s) %s of layer %d weighted by no row: flipped, and the chords again", i, flipped,
                 i - 1)
        out, why, zero = read(q, trial, width, d0, is_last, cfg, rng, rel_tol, executor=executor)
        if out is not None:
            layers = trial
            prev = dataclasses.replace(prev, neurons=neurons)
    if out is None:
        log.info("layer %d: not from %s (%s)", i, "all-on lines" if read is all_on_outcome else "pattern regions", why)
        return layers, reports, None
    if flipped:
        warnings.append(f"layer {i - 1}: neuron(s) {flipped} flipped against the wiggle's verdict: no layer-{i} row "
                        "weighted them until they were")
    how = "pattern-region" if read is not all_on_outcome else \
        "all-on and pattern-region" if any("pattern" in str(nr.get("rows_from")) for nr in out.neurons) else "all-on"
    check = f"checked by layer-{i} {how} rows (every neuron weighted by some row; flipped {len(flipped)})"
    reports = [*reports[:-1], dataclasses.replace(prev, sign_method=f"{prev.sign_method}; {check}")]
    return layers, reports, out


def _walked_layer(
    q: Callable[[FloatArray], FloatArray],
    layers: list[tuple[FloatArray, FloatArray]],
    reports: list[LayerReport],
    width: int,
    d0: int,
    is_last: bool,
    cfg: ExtractionConfig,
    rng: np.random.Generator,
    rel_tol: float,
    warnings: list[str],
    full: bool,
    points: list[FloatArray] | None = None,
    executor: Executor | None = None,
    signed_only: bool = False,
    hints: FloatArray | None = None,
    spare: list[tuple[int, Callable[[], LayerOutcome]]] | None = None,
    again: bool = True,
    checked: bool = False,
    search_prev: bool = True,
) -> tuple[list[tuple[FloatArray, FloatArray]], list[LayerReport], LayerOutcome | None]:
    """Walks along layer-``i`` boundaries (:mod:`relux.attack.walk`): the signs of layer ``i - 1``,
    checked and repaired in place (with its report) by at most ``cfg.check_walks`` sign-free walks
    (three rows suffice for the check), and, with ``full``, layer ``i``'s outcome when every row was
    walked: by signed walks (:mod:`relux.attack.walk_rows`) once every sign is decided, else by
    sign-free walks. ``signed_only``: layer ``i``'s rows from signed walks once every sign is decided,
    and never from sign-free walks (a layer as wide as its space of control: witnesses still see most of
    a row, so when the signs are open the witnesses' unification is cheaper). ``executor`` runs the
    per-witness work of the walks' starts. ``hints``: inputs where an earlier attempt's model was wrong,
    where the search for rows the walks missed (:func:`relux.attack.more_rows.more_rows`) starts.
    ``spare``: when the last hidden layer is left a few rows short (its witnesses then extract it), the
    rows the walks did find are appended there (their number, and the call that makes their outcome: no
    query made yet), for the caller to use if the witnesses give fewer. When the walks recover a neuron of
    layer ``i - 1`` that no kink showed, layer ``i`` is walked again behind the completed layer if ``again``
    (else the caller takes it from there); that second time (``checked``) walks no sign-free walks first
    when the first walks decided every sign (the recovered neuron's comes with its boundary). With
    ``search_prev`` (not on that second time), several missing neurons of layer ``i - 1`` that the walks
    cannot separate are looked for on more lines (:func:`relux.attack.more_rows.more_rows`)."""
    from relux.attack.deep import outcome_from_rows
    from relux.attack.missing import recover_from_walks
    from relux.attack.walk import WalkOutcome, walk_layer

    prev = reports[-1]
    short = prev.width - layers[-1][0].shape[0]
    if checked and not short:
        # the walks that recovered layer i-1's missing neuron decided every sign: its rows, behind the
        # completed layer, from signed walks alone (the check walks cost as much again: digits 64-40x4-10's
        # layer 3, 21 walks and 94k queries, which flipped nothing)
        if not (full or signed_only):
            return layers, reports, None
        return _signed_rows(q, layers, reports, width, d0, is_last, cfg, rng, rel_tol, warnings, [], executor,
                            hints, spare)
    # A few sign-free walks first: they decide layer i-1's signs; then, for an expansive layer,
    # one signed walk per row (its row has no term for the signs, so the start's normal fixes it
    # early and crossings already made are predicted). When the few walks leave a sign undecided,
    # sign-free walks give every row instead.
    wo = walk_layer(q, layers, width, d0, cfg, rng, rel_tol, rows_wanted=min(3, width), max_rounds=3,
                    missing=short, executor=executor, max_walks=cfg.check_walks)
    if short and (wo.solution is None or not wo.solution.ok):
        # With a neuron of layer i-1 missing the solve fails now and then on walks that succeed
        # otherwise (digits 64-40x4-10's layer 3: 1 time in 6); walks anew before the layer is lost.
        log.info("layer %d: the walks' sign solve failed (%s); walking again", len(layers) + 1, wo.reason)
        wo = walk_layer(q, layers, width, d0, cfg, rng, rel_tol, rows_wanted=min(3, width), max_rounds=3,
                        missing=short, executor=executor, max_walks=cfg.check_walks)
    clean = np.array([float(nr.get("sign_confidence", 0.0)) >= 1.0 for nr in prev.neurons])

    def settles(walks: WalkOutcome) -> bool:
        """Every sign known: the walks decided it, or the wiggle's verdict was clean and no walk flipped it."""
        known = walks.decided | (clean & ~walks.flips) if clean.size == walks.decided.size else walks.decided
        return walks.solution is not None and walks.solution.ok and bool(known.all())

    settled = settles(wo)
    signed = (full or signed_only) and settled and not short
    if full and not signed:
        wo = walk_layer(q, layers, width, d0, cfg, rng, rel_tol, rows_wanted=width, missing=short,
                        executor=executor)
        # these walks' signs are the ones applied below: whether they settled every sign is theirs to say
        settled = settles(wo)
    i = len(layers) + 1
    log.info("layer %d: %d/%d rows from %d walks (%d complete, %d fitted)%s", i, wo.W_next.shape[0], width,
             wo.walks, wo.complete_walks, wo.partial_walks, f"; {wo.reason}" if wo.reason else "")
    if wo.solution is None or not wo.solution.ok:
        warnings.append(f"layer {i - 1}: signs not checked by layer-{i} walks ({wo.reason})")
        return layers, reports, None
    layers, neurons, flipped = _with_flips(layers, prev, wo.flips, wo.confidence, wo.decided)
    method = (f"{prev.sign_method}; checked by {wo.partial_walks} layer-{i} walks "
              f"({wo.solution.method}, {int(wo.decided.sum())} decided, flipped {len(flipped)})")
    if flipped:
        log.info("layer %d: walks flipped neuron(s) %s", i - 1, flipped)
    found = 0
    # A neuron of layer i-1 no kink showed: a walk along its own boundary, or the walks' shared leftover.
    mr = recover_from_walks(q, layers, wo, d0, cfg, rng, rel_tol) if short else None
    if mr is not None and mr.ok:
        # The leftover of a neuron whose sign the walks got wrong looks like a missing neuron (its
        # error ReLU(z) - ReLU(-z) = z is affine too); it is that neuron's own hyperplane again.
        from relux.attack.hyperplanes import hyperplane_distance

        Wp, bp = layers[-1]
        keys = np.concatenate([Wp, bp[:, None]], axis=1)
        keys /= np.linalg.norm(keys, axis=1, keepdims=True)
        key = np.append(mr.w, mr.b) / float(np.linalg.norm(np.append(mr.w, mr.b)))
        dist = hyperplane_distance(key, keys)
        if dist.size and float(dist.min()) < 1e-3:
            j = int(np.argmin(dist))
            mr = dataclasses.replace(mr, ok=False, reason=f"its hyperplane is neuron {j}'s (distance "
                                     f"{float(dist.min()):.1e}): a sign error, not a missing neuron")
            warnings.append(f"layer {len(layers)}: the layer-{len(layers) + 1} walks' leftover is neuron {j}'s own "
                            "hyperplane (its sign may be wrong); no neuron added, the output check judges it")
    if mr is not None:
        log.info("layer %d: missing neuron from the layer-%d walks: %s", i - 1, i,
                 "recovered" if mr.ok else mr.reason)
        if mr.ok:
            W, b = layers[-1]
            # its row came from a few kinks: polished like every other row, since the next layer's
            # rows are fitted over it
            from relux.attack.deep import refine_row

            w_new, b_new = mr.w, mr.b
            got = refine_row(q, layers[:-1], mr.w, float(mr.b), mr.points[:8], d0, cfg, rng, rel_tol=rel_tol)
            if got is not None:
                nrm = float(np.linalg.norm(np.append(mr.w, mr.b)))
                w_new, b_new = got.w * nrm, got.b * nrm
            layers = [*layers[:-1], (np.concatenate([W, w_new[None, :]]), np.append(b, b_new))]
            neurons = (*neurons, {"index": len(neurons), "witnesses": int(mr.points.shape[0]),
                                  "residual": mr.residual, "sign": 1, "sign_confidence": 1.0,
                                  "rows_from": f"layer-{i} walks"})
            found = 1
            method += "; 1 missing neuron recovered from the walks"
            if points is not None:
                points.append(mr.points)  # points on its boundary, for the refinement's samples
    elif wo.missing.shape[1] > 1:
        # Several missing neurons the walks cannot separate: layer i-1's own row search goes on, on more
        # lines, before layer i is extracted behind a layer that lacks them (digits 64-40x4-10, attack seed
        # 2: layer 2 two short, and layer 3's witnesses then confirmed no row in 1.3M queries). Their signs
        # are the next walks' to decide.
        from relux.attack.more_rows import more_rows

        Wp, bp = layers[-1]
        more = (more_rows(q, layers[:-1], Wp, bp, prev.width, d0, cfg, rng, rel_tol, executor=executor,
                          stall_lines=4 * cfg.max_search_lines) if search_prev else None)
        if more is not None and more.W.shape[0]:
            layers = [*layers[:-1], (np.concatenate([Wp, more.W]), np.append(bp, more.b))]
            neurons = (*neurons, *({"index": len(neurons) + k, "witnesses": int(P.shape[0]), "residual": float(r),
                                    "sign": 1, "sign_confidence": 0.0, "rows_from": "witnesses on more lines"}
                                   for k, (P, r) in enumerate(zip(more.points, more.residual, strict=True))))
            found = more.W.shape[0]
            settled = False  # the new rows' signs are open
            method += f"; {found} missing neuron(s) from witnesses on more lines"
            if points is not None:
                points.extend(more.points)
        log.info("layer %d: %d missing neurons seen by the layer-%d walks as one leftover space; %s", i - 1,
                 wo.missing.shape[1], i, f"{found} found on more lines" if found else "not separated")
        if found < wo.missing.shape[1]:
            warnings.append(f"layer {i - 1}: {wo.missing.shape[1]} missing neurons seen by the layer-{i} walks "
                            f"as one leftover space; {found} found on more lines")
    reports = [*reports[:-1], dataclasses.replace(prev, sign_method=method, neurons=neurons,
                                                  recovered=prev.recovered + found, dead=prev.dead - found)]
    if found:
        # layer i is then extracted behind the completed layer i-1
        if not again:
            return layers, reports, None
        return _walked_layer(q, layers, reports, width, d0, is_last, cfg, rng, rel_tol, warnings, full, points,
                             executor, signed_only, hints, spare, again=False, checked=settled, search_prev=False)
    if signed:
        known = list(zip(wo.W_next, wo.b_next, wo.points, wo.row_residual, strict=True))
        return _signed_rows(q, layers, reports, width, d0, is_last, cfg, rng, rel_tol, warnings, known, executor,
                            hints, spare)
    if not full or wo.W_next.shape[0] < width:
        return layers, reports, None
    out = outcome_from_rows(q, layers, wo.W_next, wo.b_next, wo.points, wo.row_residual, width, d0, is_last, cfg,
                            rng, "walks", executor=executor)
    return layers, reports, out


def _signed_rows(
    q: Callable[[FloatArray], FloatArray],
    layers: list[tuple[FloatArray, FloatArray]],
    reports: list[LayerReport],
    width: int,
    d0: int,
    is_last: bool,
    cfg: ExtractionConfig,
    rng: np.random.Generator,
    rel_tol: float,
    warnings: list[str],
    known: list[tuple[FloatArray, float, FloatArray, float]],
    executor: Executor | None,
    hints: FloatArray | None,
    spare: list[tuple[int, Callable[[], LayerOutcome]]] | None,
) -> tuple[list[tuple[FloatArray, FloatArray]], list[LayerReport], LayerOutcome | None]:
    """Layer ``i``'s rows from signed walks (every sign of layer ``i - 1`` decided), from the rows
    ``known`` of the check walks on (see :func:`_walked_layer`)."""
    from relux.attack.deep import outcome_from_rows
    from relux.attack.walk_rows import walk_rows

    i = len(layers) + 1
    wr = walk_rows(q, layers, width, d0, cfg, rng, rel_tol, known=known, executor=executor)
    log.info("layer %d: %d/%d rows from %d signed walks (%d complete)%s", i, wr.W.shape[0], width, wr.walks,
             wr.complete, f"; {wr.reason}" if wr.reason else "")
    # A layer a few rows short (rarely switched neurons whose kinks the lines did not show) looks for
    # them on more lines. An inner layer still short is kept: the next layer's walks look for a
    # missing neuron. The last hidden layer still short, or a layer far short, is extracted from
    # witnesses instead.
    cov = None
    few = width - wr.W.shape[0] <= max(2 if is_last else 1, width // 10)
    if few and wr.W.shape[0] < width:
        # rarely switched neurons: their walks seldom complete, their witnesses still see every weight
        from relux.attack.more_rows import more_rows

        # An inner layer stops searching half as soon without a new row: the next layer's walks
        # recover a neuron of the layer before, and one rarer still shows in the self-check, whose
        # disagreements a resumed attempt aims at (digits 64-40x4-10: 192 lines, 357k queries, for a
        # layer-3 neuron on at 2e-5 of inputs, which a resume then found after 32 lines)
        more = more_rows(q, layers, wr.W, wr.b, width, d0, cfg, rng, rel_tol, executor=executor,
                         partial_ok=is_last, hints=hints,
                         stall_lines=None if is_last else 4 * cfg.max_search_lines)
        log.info("layer %d: %d more row(s) from %d witnesses on %d lines%s", i, more.W.shape[0], more.witnesses,
                 more.lines, f"; {more.reason}" if more.reason else "")
        if more.W.shape[0]:
            cov = np.concatenate([np.ones(wr.W.shape, dtype=bool), more.coverage])
            wr = dataclasses.replace(wr, W=np.concatenate([wr.W, more.W]), b=np.append(wr.b, more.b),
                                     points=(*wr.points, *more.points),
                                     residual=np.append(wr.residual, more.residual))
    if wr.W.shape[0] < width and (is_last or not few):
        if is_last and few and spare is not None and wr.W.shape[0]:
            spare.append((wr.W.shape[0], functools.partial(
                outcome_from_rows, q, layers, wr.W, wr.b, wr.points, wr.residual, width, d0, True, cfg, rng,
                "signed walks", coverage=cov, rel_tol=rel_tol)))
        return layers, reports, None
    if wr.W.shape[0] < width:
        warnings.append(f"layer {i}: {width - wr.W.shape[0]} row(s) found neither by signed walks ({wr.reason}) "
                        "nor from witnesses on more search lines")
    out = outcome_from_rows(q, layers, wr.W, wr.b, wr.points, wr.residual, width, d0, is_last, cfg, rng,
                            "signed walks", coverage=cov, rel_tol=rel_tol)
    return layers, reports, out


def _free_last_layer(
    q: Callable[[FloatArray], FloatArray],
    layers: list[tuple[FloatArray, FloatArray]],
    reports: list[LayerReport],
    width: int,
    d0: int,
    cfg: ExtractionConfig,
    rng: np.random.Generator,
    rel_tol: float,
    warnings: list[str],
    total_hidden: int,
    points: list[FloatArray],
    executor: Executor | None = None,
    hints: FloatArray | None = None,
) -> tuple[list[tuple[FloatArray, FloatArray]], list[LayerReport], LayerOutcome | None, bool]:
    """The last hidden layer from witnesses grouped by output direction (:mod:`relux.attack.free_last`),
    which also settles the signs of the layer before it (those are applied, with its report). Returns
    the layers, the reports, layer ``i``'s outcome when every row was fitted, and whether the signs
    settled (if not, nothing changed and the walks take over)."""
    from relux.attack.deep import outcome_from_rows
    from relux.attack.free_last import free_last_layer

    i = len(layers) + 1
    prev = reports[-1]
    # A neuron missing from layer i-1 leaves kinks whose jump matches no column (set aside), and spoils
    # the witnesses where it is on (dropped by the groups' robust fits). One that is often on leaves no
    # sign vector that explains the groups: with layer i-1 far short, the walks (which look for missing
    # neurons) take over sooner. A few missing are usually rarely on neurons that no line showed (the
    # walks do not find them either: digits 64-40x4-10, layer 3 two short): the groups get their time,
    # 96 lines (that layer 3 one short, six replays: settled after 12 to 92 lines; a failure here costs the
    # walks and a witness extraction behind the short layer, 1.7M queries, and the attempt).
    n_rows = layers[-1][0].shape[0]
    few = prev.width - n_rows <= max(1, prev.width // 10)
    fl = free_last_layer(q, layers, width, d0, total_hidden, cfg, rng, rel_tol, executor=executor,
                         max_settle_lines=96 if few else 16, hints=hints)
    log.info("layer %d: %d/%d rows from %d witness groups (%d witnesses, %d lines); layer-%d signs %s%s", i,
             fl.W.shape[0], width, fl.groups, fl.witnesses, fl.lines, i - 1,
             "settled" if fl.ok else "open", f"; {fl.reason}" if fl.reason else "")
    if not fl.ok:
        return layers, reports, None, False
    assert fl.sign is not None
    layers, neurons, flipped = _with_flips(layers, prev, fl.flips, fl.confidence, fl.decided)
    if flipped:
        log.info("layer %d: layer-%d witness groups flipped neuron(s) %s", i - 1, i, flipped)
    undecided = [int(j) for j in np.flatnonzero(~fl.decided)]
    if undecided:
        warnings.append(f"layer {i - 1}: sign(s) of neuron(s) {undecided} left as they were: no layer-{i} witness "
                        "group decided them (the output check on fresh queries still judges them)")
    overruled = [j for j in flipped if float(prev.neurons[j].get("sign_confidence", 0.0)) >= 1.0]
    if overruled:
        warnings.append(f"layer {i - 1}: witness groups flipped neuron(s) {overruled} whose wiggle verdict was clean")
    if prev.width != n_rows:
        warnings.append(f"layer {i - 1}: {prev.width - n_rows} neuron(s) missing; the witness groups of layer "
                        f"{i} do not look for them")
    method = (f"{prev.sign_method}; checked by {fl.free_rows} layer-{i} witness groups ({fl.sign.method}, "
              f"{int(fl.decided.sum())} decided, flipped {len(flipped)})")
    reports = [*reports[:-1], dataclasses.replace(prev, sign_method=method, neurons=neurons)]
    if fl.W.shape[0] < 0.9 * width:
        warnings.append(f"layer {i}: witness groups gave {fl.W.shape[0]}/{width} rows ({fl.reason}); "
                        "extracted from witnesses instead")
        return layers, reports, None, True
    # A few neurons no line crossed, even where the rows found cannot explain f: reported dead (the
    # output check on fresh queries says whether they matter).
    if fl.W.shape[0] < width:
        warnings.append(f"layer {i}: witness groups gave {fl.W.shape[0]}/{width} rows ({fl.reason})")
    points += list(fl.points)
    out = outcome_from_rows(q, layers, fl.W, fl.b, fl.points, fl.residual, width, d0, True, cfg, rng,
                            "witness groups", coverage=fl.coverage, rel_tol=rel_tol)
    return layers, reports, out, True


def _extract_deep(
    counter: CountingOracle,
    a: tuple[int, ...],
    cfg: ExtractionConfig,
    rng: np.random.Generator,
    rel_tol: float,
    stages: _Stages,
    hints: FloatArray | None = None,
    resume: Resume | None = None,
) -> tuple[MLP, tuple[LayerReport, ...], FloatArray, list[str], FloatArray | None, list[FloatArray]]:
    """The hidden layers one after the other, then the output layer and the network refinement.
    ``resume``: a failed attempt's first layers, kept; its rows of the next layer are kept
    too and the missing ones looked for (:func:`relux.attack.resume.resumed_layer`), then the layers after it are
    extracted again, every search aimed through ``hints`` first (else only the last hidden layer's is).
    Returns the model, the layer reports, every exact point found, warnings, the refinement's misses
    and the exact points found per hidden layer."""
    from relux.attack.carry import carried_outcome
    from relux.attack.deep import (
        check_last_layer,
        complete_last_layer,
        complete_unseen,
        extract_layer,
        fit_output_layer,
        polish_filled,
        straddle_points,
    )
    from relux.attack.deep_first import first_layer_outcome
    from relux.attack.unseen_columns import read_unseen_columns

    q = counter.query
    d0, k = a[0], a[-1]
    hidden = a[1:-1]
    layers: list[tuple[FloatArray, FloatArray]] = []
    reports: list[LayerReport] = []
    warnings: list[str] = []
    points: list[FloatArray] = []
    layer_points: list[FloatArray] = []
    start = 1
    if resume is not None:
        layers, reports = [(W.copy(), b.copy()) for W, b in resume.layers], list(resume.reports)
        points, layer_points = list(resume.points), list(resume.points)
        start = resume.layer
        log.info("resuming at layer %d behind the %d layer(s) kept from the failed attempt", start, len(layers))
    last_conf = np.zeros(0)
    last_cov = np.ones((0, 0), dtype=bool)
    for i, width in enumerate(hidden, start=1):
        if i < start:
            continue
        n_points = len(points)
        with stages.stage("layer", layer=i):
            try:
                out: LayerOutcome | None = None
                if resume is not None and resume.carried is not None and i == start + 1 and i == len(hidden):
                    # the failed attempt's complete last hidden layer, its columns relabelled
                    kept = carried_outcome(resume.carried, resume.rows, layers, rng, cfg.input_scale)
                    if kept is not None:
                        layers, out = kept
                if out is None and i == 1:
                    # Three hidden layers or more: each layer's precision bounds the next one's, so
                    # every first-layer row is fitted to exact points of its hyperplane (while that
                    # takes at most deep_first.POLISH_ALL_POINTS points in all).
                    out = first_layer_outcome(q, d0, width, sum(hidden), cfg, rng, rel_tol,
                                              executor=stages.executor, polish_all=len(hidden) >= 3)
                elif out is None:
                    # Behind a complete first layer narrower than the input, everything runs in the
                    # coordinates of its row space (relux.attack.frame): the same network, fewer inputs.
                    frame = input_frame(layers, hidden[0])
                    # layer i-1's space of control: the input, or a narrower layer before it
                    control = min((d0, *hidden[: i - 2]))
                    expansive = hidden[i - 2] > control
                    qf, lf, df, cf = ((frame.query(q), frame.down(layers), frame.dim, frame.config(cfg, d0)) if frame
                                      else (q, layers, d0, cfg))
                    new_pts: list[FloatArray] = []
                    lf2 = lf
                    # the hints, in the frame's coordinates: for the last hidden layer, or for every
                    # layer extracted again when resuming
                    aimed = i == len(hidden) or resume is not None
                    hf = None if hints is None or not hints.size or not aimed else (
                        hints @ frame.V.T if frame is not None else hints)
                    free_last = i >= 3 and i == len(hidden) and k >= 2
                    if resume is not None and i == start:
                        # the failed attempt's rows of this layer, and the missing ones at its disagreements
                        out = resumed_layer(qf, lf, resume.rows, width, df, i == len(hidden), cf, rng, rel_tol, hf,
                                             stages.executor)
                        free_last = False
                    if free_last:
                        # The last hidden layer: its witnesses group by output direction and decide the
                        # signs of the layer before with its rows (relux.attack.free_last).
                        lf2, reports, out, settled = _free_last_layer(qf, lf, reports, width, df, cf, rng, rel_tol,
                                                                      warnings, sum(hidden), new_pts, stages.executor,
                                                                      hf)
                        free_last = not settled
                        if settled and out is None:
                            out = extract_layer(qf, lf2, width, df, sum(hidden), True, k, cf, rng, rel_tol,
                                                executor=stages.executor, hints=hf)
                    # Chords of the region where every known neuron is on: one witness there shows a
                    # whole row (relux.attack.all_on_layer). The region is where the layer before is on
                    # with the signs it has, so its signs must be settled (a clean wiggle verdict, or a
                    # check by walks), or decided for a layer short of a few corner neurons
                    # (_ready_for_chords); otherwise the walks below check them first, and when they neither
                    # settle them nor give rows, the chords are read anyway and check the signs themselves.
                    chords = False
                    if (out is None and reports[-1].width >= cf.all_on_min_width
                            and _ready_for_chords(reports[-1], lf2[-1][0].shape[0])):
                        chords = True
                        lf2, reports, out = _all_on_layer(qf, lf2, reports, width, df, i == len(hidden), cf,
                                                          rng.spawn(1)[0], rel_tol, stages.executor, warnings)
                    # Walks along this layer's boundaries check (and repair) the signs of the layer
                    # before. After a layer wider than its space of control (signs undecidable by the
                    # wiggle) they also give this layer's rows; otherwise a few walks are the check.
                    walked: list[tuple[int, Callable[[], LayerOutcome]]] = []
                    if out is None:
                        walk = functools.partial(_walked_layer, width=width, d0=df, is_last=i == len(hidden),
                                                 cfg=cf, rng=rng, rel_tol=rel_tol, warnings=warnings, full=expansive,
                                                 points=new_pts, executor=stages.executor,
                                                 signed_only=hidden[i - 2] == control, hints=hf, spare=walked,
                                                 again=not free_last)
                        # a neuron of layer i-1 no kink had shown, found by the walks: they walk this layer
                        # again behind the completed layer, or (free_last) the witness groups do
                        lf2, reports, out = walk(qf, lf, reports)
                        grew = lf2[-1][0].shape[0] > lf[-1][0].shape[0]
                        if out is None and free_last and grew:
                            # the walks found the neuron of layer i-1 that kept the witness groups from
                            # settling: they get another go behind the completed layer
                            lf2, reports, out, settled = _free_last_layer(
                                qf, lf2, reports, width, df, cf, rng, rel_tol, warnings, sum(hidden), new_pts,
                                stages.executor, hf)
                            if settled and out is None:
                                out = extract_layer(qf, lf2, width, df, sum(hidden), True, k, cf, rng, rel_tol,
                                                    executor=stages.executor, hints=hf)
                    if (out is None and not chords and not walked and reports[-1].width >= cf.all_on_min_width
                            and _from_chords(reports[-1]) and not _ready_for_chords(reports[-1], lf2[-1][0].shape[0])
                            and _short_of_corners_at_most(reports[-1], lf2[-1][0].shape[0])):
                        # the walks neither settled the signs nor gave rows (behind 256-wide CIFAR layers
                        # they find no row), and the layer before is short of corner neurons at most: the
                        # chords check the signs themselves (_all_on_layer). Walks that settle the signs
                        # without rows hand the layer to the witnesses, as before.
                        lf2, reports, out = _all_on_layer(qf, lf2, reports, width, df, i == len(hidden), cf,
                                                          rng.spawn(1)[0], rel_tol, stages.executor, warnings)
                    if out is None:
                        n_walked = walked[-1][0] if walked else 0
                        try:
                            out = extract_layer(qf, lf2, width, df, sum(hidden), i == len(hidden), k, cf, rng,
                                                rel_tol, executor=stages.executor, hints=hf)
                            n_witness = out.W.shape[0]
                        except ExtractionFailed:
                            if not n_walked:
                                raise
                            n_witness = 0
                        if n_walked > n_witness:
                            # the signed walks' rows, short by a few: more than the witnesses gave
                            warnings.append(f"layer {i}: {n_witness} rows from witnesses, fewer than the "
                                            f"{n_walked} of the signed walks: those kept")
                            out = walked[-1][1]()
                        assert out is not None  # from the witnesses, or (when they failed) the walks
                    if frame is not None:
                        layers = frame.up(layers, lf, lf2)
                        new_pts = [frame.lift(P) for P in new_pts]
                        out = dataclasses.replace(out, witness_points=frame.lift(out.witness_points))
                    else:
                        layers = lf2
                    points += new_pts
                assert out is not None
            except ExtractionFailed as exc:
                if exc.partial is None:
                    exc.partial = PartialResult(a, counter.queries, time.perf_counter() - stages.t_start,
                                                tuple(stages.stats), tuple(reports), stages.noise_floor, i,
                                                str(exc), cfg.to_json())
                raise
        layers.append((out.W, out.b))
        points.append(out.witness_points)
        layer_points.append(np.concatenate(points[n_points:]))
        last_conf = out.confidence
        last_cov = out.coverage
        qi, si = stages.total(i)
        reports.append(LayerReport(index=i, width=width, recovered=out.W.shape[0], dead=out.dead,
                                   witnesses=out.witnesses, queries=qi, seconds=si, sign_method=out.sign_method,
                                   neurons=out.neurons, residual=out.residual))
        log.info("layer %d: %d/%d neurons, %s", i, out.W.shape[0], width, out.sign_method)
    # from the final reports: a neuron missing when its layer was extracted may have been found since
    warnings += [f"layer {r.index}: {r.dead} neuron(s) not identified: reported dead and dropped"
                 for r in reports if r.dead]
    wpts = np.concatenate(points)
    if not last_cov.all():
        with stages.stage("unseen_weights"):
            # first from exact kinks where a row's boundary enters the region its unseen coordinate is on
            layers, cov = complete_unseen(q, layers, last_cov, wpts, d0, sum(hidden), cfg, rel_tol)
            from_kinks = int((cov & ~last_cov).sum())
            filled = polished = from_output = 0
            if not cov.all():
                # then from the output just inside each unseen coordinate's on-region
                layers, cov, read = read_unseen_columns(q, layers, cov, wpts, d0, cfg, rng)
                from_output = read.filled
                if read.reasons:
                    log.info("unseen weights from the output: %d read; left: %s", read.filled, read.reasons)
                if read.undetermined:
                    # nothing the output shows moves them: kept as read, not fitted where they do nothing
                    rows_u, cols_u = zip(*read.undetermined, strict=True)
                    cov[list(rows_u), list(cols_u)] = True
                    warnings.append(f"last hidden layer: {len(read.undetermined)} weight(s) on coordinate(s) "
                                    f"{sorted(set(cols_u))} that the output does not determine where those "
                                    "coordinates are on (their rows off there, or seen only in combinations): "
                                    "kept at least-squares values")
            if not cov.all():
                n_fit = 4 * (sum(W.shape[0] + W.shape[1] for W, _ in layers[-1:]) + 1) + 64
                Xc = np.concatenate([rng.normal(0.0, cfg.input_scale, size=(n_fit, d0)), wpts])
                layers, filled = complete_last_layer(layers, cov, Xc, q(Xc))
                # then refined on exact boundary points where those coordinates are on
                layers, polished = polish_filled(q, layers, ~cov, wpts, d0, cfg, rng)
        warnings.append(f"last hidden layer: {int((~last_cov).sum())} weight(s) no witness saw: "
                        f"{from_kinks} read from kinks where their coordinates are on, "
                        f"{from_output} from the output just inside that region, "
                        f"{filled} fitted from the output ({polished} of their rows then refined on exact "
                        "boundary points)")
    # Both sides of every last-layer boundary: a rarely active neuron may be on at no random point.
    fit_pts = np.concatenate([wpts, straddle_points(layers, wpts, cfg.input_scale * float(np.sqrt(d0)))])
    with stages.stage("sign_check"):
        # A wrong sign leaves a gross residual; 1e-6 stays far above what precision errors leave.
        layers, check = check_last_layer(q, layers, d0, cfg, rng, fit_pts, last_conf, 1e-6)
    if check.flipped:
        warnings.append(f"sign check: flipped last-layer neuron(s) {list(check.flipped)} "
                        f"(residual {check.residual_before:.1e} -> {check.residual_after:.1e})")
    if not check.passed:
        warnings.append(f"sign check failed: output-layer residual {check.residual_after:.1e} on fresh queries")
    with stages.stage("output_layer"):
        W_out, b_out = fit_output_layer(q, layers, d0, cfg, rng, fit_pts,
                                         max(1e-9, 1e3 * stages.noise_floor))
    full = [*layers, (W_out, b_out)]
    if cfg.reread_rare_rows:
        with stages.stage("rare_rows"):
            # rows of rarely active last-layer neurons, read again from the output over their whole on-region
            pool = np.concatenate([fit_pts, rng.normal(0.0, cfg.input_scale, size=(4096, d0))])
            full, reread = reread_rare_rows(q, full, pool, cfg.input_scale * float(np.sqrt(d0)), rng,
                                            max(1e-2 * cfg.selfcheck_tol, 1e3 * stages.noise_floor), hints)
    if cfg.reread_rare_rows and (reread.replaced or reread.reasons):
        log.info("rarely active last-layer rows read again from the output: %s replaced (%d queries)%s",
                 list(reread.replaced), reread.queries, f"; left: {reread.reasons}" if reread.reasons else "")
    suspects: FloatArray | None = None
    if cfg.refine_network_max_params > 0:
        with stages.stage("refine_network"):
            # both sides of every inner boundary too: a neuron rarely off is off at no random point
            inner = [straddle_points(layers[: j + 1], wpts, cfg.input_scale * float(np.sqrt(d0)))
                     for j in range(len(layers) - 1)]
            full, ref = refine_network(q, full, d0, cfg.input_scale, rng, extra=np.concatenate([fit_pts, *inner]),
                                       max_params=cfg.refine_network_max_params,
                                       accept_misfit=max(cfg.selfcheck_tol, 100.0 * stages.noise_floor))
        # held-out points where the refined model still misses f: the self-check queries them again
        suspects = ref.misses
        log.info("network refinement (layers %d-%d): output misfit %.1e -> %.1e, in rare neurons' regions %.1e -> "
                 "%.1e (%d Gauss-Newton steps%s)", ref.fixed_layers + 1, len(full), ref.misfit_before, ref.misfit_after,
                 ref.rare_before, ref.rare_after, ref.steps, f"; {ref.reason}" if ref.reason else "")
    full, reports, dropped = _drop_idle_rows(full, reports)
    if dropped:
        warnings.append(f"last hidden layer: row(s) {dropped} dropped: the output fit left them no effect (below "
                        f"{IDLE_ROW:.0e} of the largest), a row that is no neuron's (the layer is short by as many)")
    model = MLP(full)
    return model, tuple(reports), wpts, warnings, suspects, layer_points


#: a last-layer row whose output column times its own norm is below this share of the largest one's
IDLE_ROW = 1e-9

#: refinements of a complete deep model whose self-check failed at few inputs, each followed by a check
#: (random 30-15-15-15-1 victim 1, session 27: failed in 1,157,702 queries without them, passes in 1,200,002;
#: on digits 64-40x4-10 seed 2, whose layer-4 weight on layer-3 neuron 18 was off by 2^-2.2, the refinement
#: took no step)
REPAIR_ROUNDS = 2


def _drop_idle_rows(full: list[tuple[FloatArray, FloatArray]], reports: list[LayerReport]
                    ) -> tuple[list[tuple[FloatArray, FloatArray]], list[LayerReport], list[int]]:
    """The last hidden layer without the rows the output fit gave no effect, its report short by as many.
    Such a row is no neuron's: rows found behind an earlier layer that lacked a neuron can be (digits
    64-40x4-10: a row on at 3% of inputs standing for a last-layer neuron on at about 1e-6, its output
    column 2e-13 of the others), and it would fill the place of the neuron it stands for."""
    (W, b), (Wo, bo) = full[-2], full[-1]
    eff = np.linalg.norm(Wo, axis=0) * np.linalg.norm(np.concatenate([W, b[:, None]], axis=1), axis=1)
    idle = np.flatnonzero(eff <= IDLE_ROW * float(np.max(eff, initial=0.0)))
    if not idle.size or idle.size == W.shape[0]:
        return full, reports, []
    keep = np.setdiff1d(np.arange(W.shape[0]), idle)
    rep = reports[-1]
    neurons = tuple(rep.neurons[i] for i in keep) if len(rep.neurons) == W.shape[0] else rep.neurons
    reports = [*reports[:-1], dataclasses.replace(rep, recovered=rep.recovered - idle.size, dead=rep.dead + idle.size,
                                                  neurons=neurons)]
    return [*full[:-2], (W[keep], b[keep]), (Wo[:, keep], bo)], reports, idle.tolist()
