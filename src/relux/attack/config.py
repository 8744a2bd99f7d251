"""Configuration of an extraction run: a frozen, validated dataclass with documented defaults."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from relux.errors import InputError


@dataclass(frozen=True)
class ExtractionConfig:
    """Knobs of :func:`relux.extract`. Every tolerance is relative to the scale of the data.

    Attributes:
        seed: seed of the ``numpy.random.Generator`` that draws every random line and point.
        input_scale: standard deviation of the random base points of search lines. The domain is
            unbounded; this only sets where the attack looks first (1.0 suits standardised inputs).
        line_range: half-length of a search line, in units of ``input_scale * sqrt(d0)``.
        grid_per_neuron: initial grid points per expected kink on a search line.
        max_search_lines: lines tried before neurons never seen are declared dead.
        kink_rel_tol: collinearity tolerance of the kink search, relative to ``max |f|`` on a line.
            ``None`` derives it from the measured noise floor of the oracle.
        fd_rel_step: first-pass finite-difference step, as a fraction of the distance along the
            search line to the nearest kink, divided by the number of directions (each direction may
            cross an unseen boundary; attack-notes §3: take steps as large as the region allows).
        refine_passes: refinement passes (fresh witnesses with safe steps from the current estimate).
        refine_safety: fraction of the distance to the nearest estimated hyperplane that a
            refinement step may use.
        selfcheck_tol: the self-check passes when ``max |f - f_hat| <= selfcheck_tol * max |f|`` on
            fresh queries (also never below 100x the measured noise floor). 1e-8 is issue 4's bound on
            the relative output error: a wrong sign or a missing neuron leaves 1e-4 or more, while the
            precision lost through several float64 layers stays below it.
        selfcheck_points: fresh random points of the self-check, at least (plus points on lines
            through every witness).
        selfcheck_lines: random lines of the self-check across the model's first-layer hyperplanes,
            at every crossing and 128 grid points each (:mod:`relux.lines`, the lines of
            :func:`relux.verify.verify`): a row wrong only in weights that inputs beyond the random
            points' region show passes them all (random 20-10-10-10-2 victim 2, session 24: right on
            2 million random inputs, wrong by 3e-5 on lines). 0 leaves them out.
        selfcheck_fraction: the self-check's random points are at least this fraction of the queries
            the extraction spent (at most ``selfcheck_max_points``): with ``N`` Gaussian points among
            them (all but ``selfcheck_probe_share``) and no disagreement, the inputs where the model is
            wrong have probability below ``3 / N`` (95% confidence), so a longer run, which could have
            missed rarer neurons, is checked harder. At 0.05 the check costs a twentieth of the run.
            The fraction is multiplied by the attempt's number (an attempt after one failed checks twice
            as many): each attempt is one more chance for a wrong model to pass.
        selfcheck_max_points: cap on the random points that ``selfcheck_fraction`` asks for (never
            fewer than ``selfcheck_points``).
        selfcheck_stop_early: a self-check already failed (by twice its tolerance) after an eighth of its
            random points (and at least 4,000) stops there (nor are its lines asked): a failed attempt's
            verdict needs no more queries, and the points that failed are enough for the next attempt to
            aim at (digits 64-40x4-10: four failed checks of 100,000 points each). False asks every point
            of every check.
        selfcheck_probe_share: this share of the self-check's random points are probes instead
            (:mod:`relux.attack.probes`; fewer for a wide model, whose probes' arithmetic
            :data:`relux.attack.probes.WORK` caps): inputs where a random linear functional of one of the model's
            hidden layers is largest on the sphere of a random point's radius, computed without queries.
            A neuron rarely on is on at the far edge of the previous layer's image, which the probes
            reach 3 to 15 times as often as Gaussian points (digits 64-40x4-10's three rarest neurons,
            on at 2.5e-6 to 7e-5 of Gaussian inputs), and inputs where a row and one of its input
            coordinates seldom on together are on together (where that weight acts: a weight no Gaussian
            input showed, left wrong, is seen there). The bound on the probability of a wrong input
            (``3 / N``) counts the ``N`` Gaussian points only: at 0.5, half of those asked. Below 1 (some
            Gaussian points are needed for that bound and for the share of inputs that disagree, which the
            resumes read); 0 asks Gaussian points only.
        selfcheck_dead_points: random points of the self-check, at least (at most
            ``selfcheck_max_points``), when some layer reports neurons not identified (dropped as
            dead): such a neuron may be on in a region the search lines missed, and at 50,000 points
            (half of them Gaussian with the default ``selfcheck_probe_share``) one on at 1e-4 of inputs
            shows with probability 1 - e^-2.5 at least (random 30-20-20-12-4 victim 8
            passed a check of 5,437 points without its layer-3 neuron on at 1e-4).
        max_enum_bits: largest number of free sign bits enumerated exhaustively when a layer is wider
            than its input (attack-notes §4).
        restarts: extra attempts of a deep extraction that failed (each from new random lines, seed
            ``seed + attempt``; every attempt's queries are counted). A failure is always one that
            the checks detected, so a restart can only replace a rejected result.
        resumes: attempts of a deep extraction that go on from a failed attempt instead of starting
            afresh, on top of ``restarts``. When the self-check disagreed on at most 1% of its random
            points
            (the model is right nearly everywhere: it lacks a rarely active neuron, a wrong sign or a
            wrong row would disagree almost everywhere), the next attempt keeps the hidden layers
            before the first incomplete one and the rows found in that one, looks for the missing
            rows on search lines through the inputs where the model was wrong (where the missing
            neuron is on), and extracts the layers after it again (:mod:`relux.attack.resume`). A
            resumed attempt that fails without such a point of its own is resumed from the same point.
            A later resume starts after the layer the one before resumed at, or at that layer again
            when its search there found rows and it is still short, or back at an earlier incomplete
            layer once the later ones are complete. A resume after one that recovered rows in the
            layer it resumed at (or completed it) does not count, up to ``resumes`` such resumes more.
            Beyond these (with ``resumes`` > 0), resumes go on while the queries that the resumes of a
            fresh attempt spent stay below what that attempt spent itself, and the last did not leave the
            model worse: a restart would cost about as much again (digits
            64-40x4-10: four rarely active neurons, each found by the resume aimed where the check saw it,
            while a restart cost 1.1M queries and lacked them too).
        refine_network_max_params: a deep extraction ends with a Gauss-Newton refinement of the
            weights on fresh outputs (:mod:`relux.attack.refine_net`): of the longest tail of layers
            with at most this many parameters (the output layer always; the Jacobian holds about
            ``3 P^2`` numbers); 0 turns it off.
        reread_rare_rows: read the rows of last-layer neurons on at under 5% of inputs again from the
            output, over their whole on-region (:mod:`relux.attack.reread`), before the refinement.
        batch_rows: rows per oracle call.
        witness_memory_mb: memory for one layer's stored witness measurements (each holds its
            ``r x d_in`` control image twice). A layer whose witnesses outgrow it stops searching new
            lines and goes on with what it has, instead of exhausting the machine's memory (at CIFAR
            scale a search line crosses thousands of kinks, each about half a megabyte).
        all_on_min_width: a hidden layer behind a layer at least this wide is looked for first on
            chords of the region where every known neuron is on, when that region exists and the
            layer before controls every direction there (:mod:`relux.attack.all_on_layer`): there one
            witness shows a whole row. Behind narrower layers the walks and witness groups are
            measured better (random victims of the issue-4 shapes, layers 10 to 40 wide: with the
            chords at every width, 30-20-20-12-4 seed 9 came out wrong within its self-check's bound
            and random 40-20-10-10-1 failed; behind 256-wide CIFAR layers the witnesses leave 100 of
            256 weights unseen and no row is completed, while the chords give every layer-2 row).
            0 uses the chords at every width.
        pattern_min_width: when that region is empty (no input has every known neuron on), a hidden
            layer behind a layer at least this wide is looked for next on chords of regions where the
            layer before follows a fixed pattern, its rows pieced together across regions
            (:mod:`relux.attack.pattern_layer`). Behind the trained CIFAR-scale victim's 256-wide
            layer 2, the walks that would take the layer instead found no row in 286 s; behind
            layers of up to 64 (every deep-suite victim) the walks were measured and kept. 0 uses
            the pattern regions at every width where the all-on chords would be tried
            (``all_on_min_width``, and the signs of the layer before settled).
        pattern_max_regions: at most this many pattern regions for one layer; the search stops
            sooner once every neuron has a row and filling the weights they lack in cells would
            cost fewer queries than the last region took, or after three regions in a row that add
            no row and no weight. Behind the CIFAR-scale unitary victim's layers 1-3, eight regions left 1,025
            weights of 60 layer-4 rows unseen, fourteen 23 weights of 8 rows (session 34).
        check_walks: walks along a layer's boundaries spent checking the signs of the layer before
            it when that layer's rows come from witnesses (:mod:`relux.attack.walk`); a walk that
            cannot switch every neuron still adds a partial fit, and on trained networks few complete.
        progress: show progress bars (tqdm on stderr).
        jobs: workers for the per-neuron work (``relux.parallel``); 1 runs it in this process. The
            oracle is always queried from this process, and the result does not depend on ``jobs``.
        backend: ``"loky"`` (joblib worker processes on this machine) or ``"ray"`` (a local Ray
            instance, or the cluster at ``ray_address``; needs ``pip install 'relux[ray]'``).
        ray_address: with ``backend="ray"``: the address of a running Ray cluster; ``None`` starts a
            local instance on 127.0.0.1 (no dashboard, no usage statistics) and stops it afterwards.
    """

    seed: int = 0
    input_scale: float = 1.0
    line_range: float = 4.0
    grid_per_neuron: float = 4.0
    max_search_lines: int = 24
    kink_rel_tol: float | None = None
    fd_rel_step: float = 1e-2
    refine_passes: int = 1
    refine_safety: float = 0.25
    selfcheck_tol: float = 1e-8
    selfcheck_points: int = 2000
    selfcheck_lines: int = 32
    selfcheck_fraction: float = 0.05
    selfcheck_max_points: int = 100_000
    selfcheck_dead_points: int = 50_000
    selfcheck_stop_early: bool = True
    selfcheck_probe_share: float = 0.5
    max_enum_bits: int = 22
    restarts: int = 2
    resumes: int = 3
    refine_network_max_params: int = 5000
    reread_rare_rows: bool = True
    batch_rows: int = 65536
    witness_memory_mb: int = 4096
    check_walks: int = 64
    all_on_min_width: int = 64
    pattern_min_width: int = 128
    pattern_max_regions: int = 24
    progress: bool = False
    jobs: int = 1
    backend: str = "loky"
    ray_address: str | None = None

    def __post_init__(self) -> None:
        def need(cond: bool, name: str, expected: str) -> None:
            if not cond:
                raise InputError(
                    f"ExtractionConfig.{name}: expected {expected}, found {getattr(self, name)!r}"
                )

        need(isinstance(self.seed, int) and self.seed >= 0, "seed", "an integer >= 0")
        need(self.input_scale > 0, "input_scale", "a positive number")
        need(self.line_range > 0, "line_range", "a positive number")
        need(self.grid_per_neuron >= 1, "grid_per_neuron", "a number >= 1")
        need(self.max_search_lines >= 1, "max_search_lines", "an integer >= 1")
        need(self.witness_memory_mb >= 1, "witness_memory_mb", "an integer >= 1 (megabytes)")
        need(self.check_walks >= 1, "check_walks", "an integer >= 1")
        need(self.selfcheck_dead_points >= 0, "selfcheck_dead_points", "an integer >= 0")
        need(isinstance(self.selfcheck_stop_early, bool), "selfcheck_stop_early", "True or False")
        need(0 <= self.selfcheck_probe_share < 1, "selfcheck_probe_share", "a number in [0, 1)")
        need(self.kink_rel_tol is None or 0 < self.kink_rel_tol < 1, "kink_rel_tol", "None or in (0, 1)")
        need(0 < self.fd_rel_step < 0.5, "fd_rel_step", "a number in (0, 0.5)")
        need(self.refine_passes >= 0, "refine_passes", "an integer >= 0")
        need(0 < self.refine_safety < 1, "refine_safety", "a number in (0, 1)")
        need(0 < self.selfcheck_tol < 1, "selfcheck_tol", "a number in (0, 1)")
        need(self.selfcheck_points >= 10, "selfcheck_points", "an integer >= 10")
        need(isinstance(self.selfcheck_lines, int) and not isinstance(self.selfcheck_lines, bool)
             and self.selfcheck_lines >= 0, "selfcheck_lines", "an integer >= 0")
        need(0 <= self.selfcheck_fraction <= 1, "selfcheck_fraction", "a number in [0, 1]")
        need(isinstance(self.selfcheck_max_points, int) and self.selfcheck_max_points >= 1, "selfcheck_max_points",
             "an integer >= 1")
        need(0 <= self.max_enum_bits <= 30, "max_enum_bits", "an integer in [0, 30]")
        need(self.batch_rows >= 1, "batch_rows", "an integer >= 1")
        need(isinstance(self.reread_rare_rows, bool), "reread_rare_rows", "True or False")
        need(isinstance(self.refine_network_max_params, int) and self.refine_network_max_params >= 0,
             "refine_network_max_params", "an integer >= 0")
        need(isinstance(self.restarts, int) and 0 <= self.restarts <= 10, "restarts", "an integer in [0, 10]")
        need(isinstance(self.resumes, int) and not isinstance(self.resumes, bool) and 0 <= self.resumes <= 10,
             "resumes", "an integer in [0, 10]")
        need(isinstance(self.all_on_min_width, int) and not isinstance(self.all_on_min_width, bool)
             and self.all_on_min_width >= 0, "all_on_min_width", "an integer >= 0")
        need(isinstance(self.pattern_min_width, int) and not isinstance(self.pattern_min_width, bool)
             and self.pattern_min_width >= 0, "pattern_min_width", "an integer >= 0")
        need(isinstance(self.pattern_max_regions, int) and not isinstance(self.pattern_max_regions, bool)
             and self.pattern_max_regions >= 1, "pattern_max_regions", "an integer >= 1")
        need(isinstance(self.jobs, int) and not isinstance(self.jobs, bool) and self.jobs >= 1, "jobs",
             "an integer >= 1")
        need(self.backend in ("loky", "ray"), "backend", "'loky' or 'ray'")
        need(self.ray_address is None or (isinstance(self.ray_address, str) and self.ray_address.strip() != ""),
             "ray_address", "None or a non-empty address")
        need(self.ray_address is None or self.backend == "ray", "ray_address", "None unless backend is 'ray'")

    def replace(self, **changes: Any) -> ExtractionConfig:
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
