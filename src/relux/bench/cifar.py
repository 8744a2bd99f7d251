"""The CIFAR-scale benchmark of issue 7: one result file per victim, also when the run fails part-way.

``relux bench --suite cifar`` runs the two cases of :func:`relux.bench.suites.suite` ``("cifar")``
(3072-256x8-10, trained on ``mnist32`` and CM24 unitary, seed 0) with :func:`run_cifar_case` and writes
each record with :func:`write_result` as ``cifar3072-256x8-10-{trained,unitary}.json``.

- The victim comes from :func:`relux.bench.victims.cached_victim` (built, and for the trained one trained,
  once; then read from the cache). The parent process prepares it before the clock starts, so the time
  limit covers the attack and the verification only.
- The attack runs in a worker process (:func:`relux.bench.runner.run_isolated`) under a hard wall-clock
  limit. Before it, a soft deadline leaves :data:`VERIFY_RESERVE_SECONDS` for the verification: once it
  passes, the next oracle query raises :class:`DeadlineReached` (an :class:`~relux.errors.ExtractionFailed`),
  so the attack stops with a :class:`~relux.attack.result.PartialResult` that says how far it got. After
  the last hidden layer is done the deadline is lifted (the remaining stages are short).
- A record (:func:`new_record`, filled by :func:`add_result` / :func:`add_partial`) has the keys of a
  :mod:`relux.bench.runner` row plus :data:`RESULT_KEYS`: per hidden layer (:func:`layer_entries`)
  witnesses, queries, seconds, neurons recovered, signs checked and sign method; the per-stage split;
  the seconds spent inside the victim (``oracle_seconds``); a sampled profile (``profile``, see
  :mod:`relux.bench.sampler`); and, when a model was produced, its verification against the true weights
  with ``argmax_agreement`` on :data:`AGREEMENT_POINTS` fresh ``N(0, I)`` and as many ``U[0, 1]^d`` inputs.
- A worker killed at the hard limit (or dead) still gets a record, from its forwarded log lines: the
  layers it finished, and a per-stage split timed by the parent as the ``stage`` lines arrived
  (``approximate``: queries from heartbeats at most a second old).
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from relux.bench.runner import (
    KEEP_LOG_LINES,
    _f,
    _log2,
    _Meter,
    _one_line,
    base_row,
    layers_from_log,
    run_isolated,
    target_misses,
)
from relux.bench.runner import log as runner_log
from relux.bench.sampler import StackSampler
from relux.bench.suites import Case
from relux.errors import ExtractionFailed, InputError
from relux.model import MLP, format_arch
from relux.oracle.base import FloatArray, Oracle
from relux.oracle.local import MLPOracle

log = logging.getLogger(__name__)

#: Fresh inputs per source for the argmax agreement (issue 7: 10^5).
AGREEMENT_POINTS = 100_000
#: Lines through the kinks in the verification (relux.verify's default).
VERIFY_LINES = 64
#: Default wall-clock limit of a cifar case (the issue's goal: 60 minutes on 2 cores).
DEFAULT_CIFAR_TIMEOUT = 3600.0
#: Seconds kept for verifying and recording before the hard limit (the soft deadline is this much
#: earlier; at most half the limit).
VERIFY_RESERVE_SECONDS = 240.0
#: A sign counts as checked when its measured confidence reaches this (or a last-layer solve set it).
SIGN_CONFIDENCE = 0.5
#: Keys every cifar record has, beyond those of a runner row (``None`` when unknown).
RESULT_KEYS = (
    "queries",
    "seconds",
    "log2_weight_error",
    "max_rel_output_error",
    "argmax_agreement",
    "victim_sha256",
    "cpu",
    "date",
    "commit",
    "layers",
    "ok",
    "failed_layer",
    "reason",
    "stages",
    "time_limit_seconds",
    "wall_seconds",
)
_STAGE_LINE = re.compile(r"^stage (\S+)(?: \(layer (\d+)\))?$")
_BEAT_LINE = re.compile(r"^(\d+) queries so far$")
_LAST_LAYER_LINE = re.compile(r"^layer (\d+): \d+/\d+ neurons")
#: The attack's line for each try at a layer's rows (all-on lines, pattern regions, walks, witness
#: groups).
_ATTEMPT_LINE = re.compile(r"^layer (\d+): \d+/\d+ rows from ")


# --------------------------------------------------------------------------- names and environment
def result_file_name(case: Case) -> str:
    """``cifar3072-256x8-10-trained.json`` for the trained cifar case (arch and victim kind)."""
    return f"cifar{format_arch(case.victim.arch)}-{case.victim.kind}.json"


def cpu_info() -> dict[str, Any]:
    """CPU model name (``/proc/cpuinfo``, else :func:`platform.processor`), logical cores, the cores this
    process may run on, and the load average when called (the machine may be shared)."""
    import platform

    model = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        usable: int | None = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = None
    try:
        load: list[float] | None = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    return {"model": model or platform.processor() or None, "cores": os.cpu_count(), "usable_cores": usable,
            "load_average": load}


def git_commit(repo: str | Path | None = None, *, ignore: Sequence[str] = ("benchmarks/results",)) -> str | None:
    """``git rev-parse HEAD`` of ``repo`` (default: the current directory), with ``-dirty`` appended when
    the tree has changes (tracked or untracked files, outside the ``ignore`` paths); ``None`` outside a
    checkout or without git."""
    cwd = str(repo) if repo is not None else None
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                              check=False, timeout=10).stdout.strip()
        if not head:
            return None
        spec = ["--", ".", *(f":(exclude){p}" for p in ignore)]
        status = subprocess.run(["git", "status", "--porcelain", *spec], cwd=cwd, capture_output=True,
                                text=True, check=False, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("-dirty" if status.strip() else "")


# --------------------------------------------------------------------------- per-layer figures
def signs_checked(report: Any) -> int:
    """Neurons of a :class:`~relux.attack.result.LayerReport` whose sign was set by a last-layer solve
    that succeeded, or measured with confidence >= :data:`SIGN_CONFIDENCE`."""
    method = str(report.sign_method)
    if method.startswith("last-layer") and "FAILED" not in method:
        return int(report.recovered)
    return sum(1 for n in report.neurons if float(n.get("sign_confidence", 0.0)) >= SIGN_CONFIDENCE)


def layer_entries(
    arch: Sequence[int],
    reports: Sequence[Any],
    *,
    failed_layer: int | None = None,
    failed_queries: int | None = None,
    failed_seconds: float | None = None,
) -> list[dict[str, Any]]:
    """One entry per hidden layer of ``arch``: ``status`` ``done`` (from its LayerReport), ``failed``
    (``failed_layer``, with the queries and seconds spent in it when known) or ``not reached``."""
    done = {int(r.index): r for r in reports}
    out: list[dict[str, Any]] = []
    for i, width in enumerate(arch[1:-1], start=1):
        entry: dict[str, Any] = {"index": i, "width": width}
        rep = done.get(i)
        if rep is not None:
            entry.update(
                status="done",
                recovered=int(rep.recovered),
                dead=int(rep.dead),
                witnesses=int(rep.witnesses),
                queries=int(rep.queries),
                seconds=round(float(rep.seconds), 3),
                signs_checked=signs_checked(rep),
                sign_method=str(rep.sign_method),
            )
        elif i == failed_layer:
            entry.update(status="failed", recovered=None, witnesses=None, queries=failed_queries,
                         seconds=None if failed_seconds is None else round(failed_seconds, 3),
                         signs_checked=None, sign_method=None)
        else:
            entry.update(status="not reached", recovered=None, witnesses=None, queries=None, seconds=None,
                         signs_checked=None, sign_method=None)
        out.append(entry)
    return out


# --------------------------------------------------------------------------- records
def new_record(case: Case, seed: int) -> dict[str, Any]:
    """A record with every key of a runner row and of :data:`RESULT_KEYS`, before the run."""
    record = base_row(case, seed)
    for key in RESULT_KEYS:
        record.setdefault(key, None)
    arch = case.victim.arch
    record.update(
        suite="cifar",
        result_file=result_file_name(case),
        arch=format_arch(arch),
        params=sum((a + 1) * b for a, b in zip(arch[:-1], arch[1:], strict=True)),
        layers=layer_entries(arch, []),
        stages=[],
        agreement_points=None,
    )
    if case.victim.kind == "trained":
        record["victim_test_accuracy"] = None
    return record


def add_victim(record: dict[str, Any], info: dict[str, Any]) -> None:
    """Copy the victim's SHA-256, cache entry and (trained) test accuracy from its build summary."""
    record["victim_sha256"] = info.get("sha256")
    record["victim_cache"] = {"path": info.get("path"), "key": info.get("cache_key"), "cached": info.get("cached")}
    training = info.get("training")
    if training is not None:
        record["victim_test_accuracy"] = _f(training.get("test_accuracy"))
        record["victim_training"] = {k: v for k, v in training.items() if k != "loss_history"}
        record["victim_dataset"] = info.get("dataset")


def _stage_list(stages: Sequence[Any]) -> list[dict[str, Any]]:
    return [{"name": s.name, "layer": s.layer, "queries": int(s.queries), "seconds": round(float(s.seconds), 3)}
            for s in stages]


def add_result(record: dict[str, Any], result: Any, arch: Sequence[int]) -> None:
    """Fill ``record`` from an :class:`~relux.attack.result.ExtractionResult` (self-check passed or not)."""
    record["seconds"] = round(float(result.seconds), 3)
    record["stages"] = _stage_list(result.stages)
    record["layers"] = layer_entries(arch, result.layers)
    record["selfcheck"] = "passed" if result.selfcheck.passed else "failed"
    record["selfcheck_rel_error"] = _f(result.selfcheck.max_rel_error)
    record["noise_floor"] = _f(result.noise_floor)
    record["recovered_arch"] = format_arch(result.model.arch)
    record["warnings"] = list(result.warnings)[:20]
    record["execution"] = dict(result.execution)


def add_partial(record: dict[str, Any], partial: Any, arch: Sequence[int]) -> None:
    """Fill ``record`` from a :class:`~relux.attack.result.PartialResult`: the layers finished, the layer
    that failed (its queries and seconds: the run's totals minus its finished stages) and the reason."""
    done_q = sum(int(s.queries) for s in partial.stages)
    done_s = sum(float(s.seconds) for s in partial.stages)
    failed_q = max(int(partial.queries) - done_q, 0)
    failed_s = max(float(partial.seconds) - done_s, 0.0)
    record["seconds"] = round(float(partial.seconds), 3)
    record["stages"] = [*_stage_list(partial.stages),
                        {"name": "layer", "layer": int(partial.failed_layer), "queries": failed_q,
                         "seconds": round(failed_s, 3), "incomplete": True}]
    record["layers"] = layer_entries(arch, partial.layers, failed_layer=int(partial.failed_layer),
                                     failed_queries=failed_q, failed_seconds=failed_s)
    record["failed_layer"] = int(partial.failed_layer)
    record["reason"] = str(partial.reason)
    record["noise_floor"] = _f(partial.noise_floor)


def add_verification(record: dict[str, Any], reference: MLP, extracted: MLP, *, points: int, lines: int,
                     seed: int) -> None:
    """Verify ``extracted`` against ``reference`` on ``points`` fresh inputs from each of ``N(0, I)`` and
    ``U[0, 1]^d`` (a generator independent of the attack's) and ``lines`` lines through the kinks.

    ``argmax_agreement`` is the smaller of the two per-source agreements (``points`` inputs each);
    ``argmax_agreement_by_source`` gives all three, the lines included.
    """
    from relux.verify import verify

    rng = np.random.default_rng([seed, 0x7E51F1ED])  # a stream the attack (default_rng(seed)) never draws
    t0 = time.perf_counter()
    try:
        report = verify(reference, extracted, rng=rng, n_random=points, n_lines=lines)
    except Exception as exc:  # e.g. a model of another depth: say so, keep the attack's figures
        record["verify_error"] = f"{type(exc).__name__}: {_one_line(exc)}"
        return
    by_source = {s.name: _f(s.agreement) for s in report.functional}
    fresh = [float(s.agreement) for s in report.functional if s.name in ("gaussian", "uniform")]
    record.update(
        log2_weight_error=_f(report.log2_max_norm_weight_error),
        max_norm_weight_error=_f(report.max_norm_weight_error),
        max_rel_output_error=_f(report.max_rel_output_error),
        log2_max_rel_output_error=_f(report.log2_max_rel_output_error),
        argmax_agreement=_f(min(fresh)) if fresh else None,
        argmax_agreement_by_source=by_source,
        max_rel_output_error_by_source={s.name: _f(s.max_rel_error) for s in report.functional},
        agreement_points=points,
        sign_errors=report.sign_errors,
        unmatched=report.unmatched,
        undetermined_weights=sum(la.undetermined for la in report.layers),
        verify_seconds=round(time.perf_counter() - t0, 3),
    )
    for la in report.layers:
        if la.kind == "hidden" and 0 <= la.index < len(record["layers"]):
            record["layers"][la.index].update(matched=la.matched, sign_errors=la.sign_errors,
                                              log2_weight_error=_f(la.log2_max_norm_weight_error))
        elif la.kind != "hidden":
            record["output_log2_weight_error"] = _f(la.log2_max_norm_weight_error)


def finish_record(record: dict[str, Any], case: Case) -> dict[str, Any]:
    """Set ``ok``, ``log2_queries``, the targets verdict and the stage summary; return ``record``."""
    record["ok"] = record.get("status") == "ok"
    if record["ok"]:
        record["failed_layer"] = None
        record["reason"] = None
    record["log2_queries"] = _log2(record.get("queries"))
    record["where_the_time_goes"] = stage_summary(record.get("stages") or [], record.get("seconds"))
    if case.targets is not None:
        record["misses"] = target_misses(case.targets, record)
        record["met"] = not record["misses"]
    return record


def stage_summary(stages: Sequence[dict[str, Any]], total_seconds: float | None) -> list[dict[str, Any]]:
    """Queries and seconds per stage name (layers grouped as ``layer``, ``layer 1``, ...), with each
    one's share of the attack's seconds, largest first."""
    acc: dict[str, list[float]] = {}
    for s in stages:
        key = str(s["name"]) if s.get("layer") is None else f"{s['name']} {s['layer']}"
        q, sec = acc.setdefault(key, [0.0, 0.0])
        acc[key] = [q + float(s.get("queries") or 0), sec + float(s.get("seconds") or 0.0)]
    total = total_seconds if total_seconds else sum(v[1] for v in acc.values())
    rows = [{"stage": k, "queries": int(v[0]), "seconds": round(v[1], 3),
             "share": round(v[1] / total, 4) if total else None} for k, v in acc.items()]
    return sorted(rows, key=lambda r: -float(r["seconds"]))


def write_result(record: dict[str, Any], directory: str | os.PathLike[str]) -> Path:
    """Write ``record`` as strict JSON to ``directory/record['result_file']`` (the directory is created)."""
    from relux.bench.report import _json_default

    out_dir = Path(directory)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create the results directory {out_dir}: {exc}") from exc
    path = out_dir / str(record["result_file"])
    text = json.dumps(record, indent=2, allow_nan=False, default=_json_default) + "\n"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path


# --------------------------------------------------------------------------- the worker
class DeadlineReached(ExtractionFailed):
    """Raised by the benchmark's oracle wrapper when the soft deadline has passed (ends the run: no
    new attempt, so the partial result of the attempt it stopped is the one recorded)."""

    restartable = False


class _DeadlineMeter(_Meter):
    """Counts queries (with heartbeats), times the victim, and stops the attack at ``deadline``
    (``time.time()`` seconds; ``None``: never).

    Unlike the runner's meter it does not validate the batch itself: the victim's oracle does, and at
    3072 inputs a validation costs about a tenth of a forward pass."""

    def __init__(self, inner: Oracle, deadline: float | None) -> None:
        super().__init__(inner)
        self.deadline = deadline
        self.oracle_seconds = 0.0
        self.limit_text = ""

    def query(self, X: FloatArray) -> FloatArray:
        if self.deadline is not None and time.time() >= self.deadline:
            raise DeadlineReached(f"stopped at the soft deadline {self.limit_text}after {self.queries} queries")
        t0 = time.perf_counter()
        try:
            Y = self.inner.query(X)
        finally:
            self.oracle_seconds += time.perf_counter() - t0
        self.queries += int(Y.shape[0])
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            runner_log.debug("%d queries so far", self.queries, extra={"bench_queries": self.queries})
        return Y


class _LayerWatch(logging.Handler):
    """Keeps the attack's last log lines (DEBUG included: they say how far a failing layer got); lifts
    the meter's deadline once the last hidden layer is reported."""

    def __init__(self, meter: _DeadlineMeter, n_hidden: int) -> None:
        super().__init__(logging.DEBUG)
        self.meter = meter
        self.n_hidden = n_hidden
        self.lines: list[str] = []
        self.layer_lines: list[str] = []  # every "layer i: r/w neurons" line, whatever came after
        self.attempt_lines: list[str] = []  # every "layer i: r/w rows from ..." line

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        self.lines = [*self.lines[-(KEEP_LOG_LINES * 4):], text]
        m = _LAST_LAYER_LINE.match(text)
        if m:
            self.layer_lines.append(text)
        if _ATTEMPT_LINE.match(text):
            self.attempt_lines.append(text)
        if m and int(m.group(1)) >= self.n_hidden:
            self.meter.deadline = None


@dataclass(frozen=True)
class CifarOptions:
    """How a cifar case runs: the victim cache, the soft deadline (``time.time()``), the verification."""

    cache_dir: str | None = None
    deadline: float | None = None
    agreement_points: int = AGREEMENT_POINTS
    verify_lines: int = VERIFY_LINES
    profile_interval: float = 0.25
    jobs: int = 1
    backend: str = "loky"
    ray_address: str | None = None
    limit_text: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def build_victim(case: Case, seed: int, cache_dir: str | None) -> tuple[MLP, dict[str, Any]]:
    """The case's victim from the cache (built and stored on first use)."""
    from relux.bench.victims import cached_victim

    v = case.victim
    if v.kind == "file":
        raise InputError("the cifar suite builds its victims with relux.zoo; 'file' victims are not supported")
    return cached_victim(v.arch, v.kind, seed, v.dataset if v.kind == "trained" else None, cache_dir=cache_dir)


def execute_cifar_case(case: Case, seed: int, options: CifarOptions) -> dict[str, Any]:
    """Run a cifar case in this process and return its record (never raises for a failing case)."""
    from relux.attack import ExtractionConfig, extract
    from relux.attack.result import ExtractionResult

    t_case = time.perf_counter()
    record = new_record(case, seed)
    arch = case.victim.arch
    try:
        reference, info = build_victim(case, seed, options.cache_dir)
    except Exception as exc:
        record["status"] = f"failed: could not build the victim ({type(exc).__name__}: {_one_line(exc)})"
        record["reason"] = record["status"][len("failed: "):]
        record["wall_seconds"] = round(time.perf_counter() - t_case, 3)
        return finish_record(record, case)
    add_victim(record, info)
    record["build_seconds"] = round(time.perf_counter() - t_case, 3)
    log.info("%s: %s, %d parameters, victim sha256 %s", case.name, record["arch"], reference.n_params,
             str(record["victim_sha256"])[:16])

    meter = _DeadlineMeter(MLPOracle(reference), options.deadline)
    meter.limit_text = options.limit_text
    watch = _LayerWatch(meter, len(arch) - 2)
    attack_log = logging.getLogger("relux.attack")
    attack_level = attack_log.level
    attack_log.setLevel(logging.DEBUG)  # restored below; the attack's DEBUG lines show in-layer progress
    attack_log.addHandler(watch)
    model: MLP | None = None
    sampler = StackSampler(options.profile_interval)
    t0 = time.perf_counter()
    try:
        with sampler:
            result = extract(meter, arch, ExtractionConfig(seed=seed, jobs=options.jobs, backend=options.backend,
                                                           ray_address=options.ray_address))
        record["status"] = "ok"
        add_result(record, result, arch)
        model = result.model
    except ExtractionFailed as exc:
        partial = exc.partial
        record["status"] = f"failed: {_one_line(exc)}"
        record["reason"] = _one_line(exc)
        if isinstance(partial, ExtractionResult):
            add_result(record, partial, arch)
            record["partial"] = True
            model = partial.model
        elif partial is not None and hasattr(partial, "failed_layer"):
            add_partial(record, partial, arch)
            record["partial"] = True
        else:
            record["partial"] = False
            record["layers"] = _merge_log_layers(arch, [*watch.layer_lines, *watch.lines])
        record["deadline_reached"] = isinstance(exc, DeadlineReached)
        record["progress"] = watch.lines[-2 * KEEP_LOG_LINES:]
        add_attempts(record, watch.attempt_lines)
    except Exception as exc:  # a bug or an oracle error inside the attack
        record["status"] = f"failed: {type(exc).__name__}: {_one_line(exc)}"
        record["reason"] = record["status"][len("failed: "):]
        record["traceback"] = traceback.format_exc(limit=8)
        record["layers"] = _merge_log_layers(arch, [*watch.layer_lines, *watch.lines])
        record["progress"] = watch.lines[-2 * KEEP_LOG_LINES:]
        add_attempts(record, watch.attempt_lines)
    finally:
        attack_log.removeHandler(watch)
        attack_log.setLevel(attack_level)
    if record["seconds"] is None:
        record["seconds"] = round(time.perf_counter() - t0, 3)
    record["queries"] = meter.queries
    record["oracle_seconds"] = round(meter.oracle_seconds, 3)
    record["profile"] = sampler.summary(top=25)
    if model is not None:
        add_verification(record, reference, model, points=options.agreement_points, lines=options.verify_lines,
                         seed=seed)
    record["wall_seconds"] = round(time.perf_counter() - t_case, 3)
    record.update(options.extra)
    return finish_record(record, case)


def add_attempts(record: dict[str, Any], lines: Sequence[str]) -> None:
    """Put the attack's tries at the failed layer (its ``layer i: r/w rows from ...`` lines: how many
    rows the all-on lines or pattern regions gave) in that layer's entry as ``attempts``."""
    failed = next((e for e in record.get("layers") or [] if e.get("status") == "failed"), None)
    if failed is None:
        return
    tries = [ln for ln in lines if (m := _ATTEMPT_LINE.match(ln)) and int(m.group(1)) == failed["index"]]
    if tries:
        failed["attempts"] = tries


def _merge_log_layers(arch: Sequence[int], lines: Sequence[str]) -> list[dict[str, Any]]:
    """Per-layer entries from the attack's ``layer i: r/w neurons, METHOD`` lines: finished layers are
    ``done (from log)``, the next one ``failed``, the rest ``not reached``."""
    entries = layer_entries(arch, [])
    logged = {e["index"]: e for e in layers_from_log(lines, arch) if "recovered" in e}
    for e in entries:
        got = logged.get(e["index"])
        if got is not None:
            e.update(status="done", recovered=got["recovered"], sign_method=got.get("sign_method"), from_log=True)
    first_missing = next((e for e in entries if e["status"] != "done"), None)
    if first_missing is not None:
        first_missing["status"] = "failed"
    return entries


# --------------------------------------------------------------------------- the parent
class StageTimeline:
    """Parent-side clock of a worker's ``stage NAME (layer L)`` lines and query heartbeats.

    ``feed(level, text)`` is an ``on_log`` callback for :func:`relux.bench.runner.run_isolated`;
    ``stages(end)`` the per-stage split (seconds between stage starts, queries between the heartbeats
    last seen at those moments).
    """

    def __init__(self, forward: Callable[[int, str], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.forward = forward
        self.clock = clock
        self.t0 = clock()
        self.queries = 0
        self.starts: list[tuple[float, str, int | None, int]] = []

    def feed(self, level: int, text: str) -> None:
        beat = _BEAT_LINE.match(text)
        if beat:
            self.queries = int(beat.group(1))
        else:
            m = _STAGE_LINE.match(text)
            if m:
                layer = int(m.group(2)) if m.group(2) else None
                self.starts.append((self.clock(), m.group(1), layer, self.queries))
        if self.forward is not None:
            self.forward(level, text)

    def current(self) -> tuple[str, int | None] | None:
        """The last stage started (name, layer), or ``None``."""
        return (self.starts[-1][1], self.starts[-1][2]) if self.starts else None

    def stages(self, queries_at_end: int | None = None) -> list[dict[str, Any]]:
        end_t = self.clock()
        end_q = self.queries if queries_at_end is None else queries_at_end
        out = []
        for i, (t, name, layer, q) in enumerate(self.starts):
            t_next, q_next = (self.starts[i + 1][0], self.starts[i + 1][3]) if i + 1 < len(self.starts) \
                else (end_t, end_q)
            out.append({"name": name, "layer": layer, "queries": max(q_next - q, 0),
                        "seconds": round(t_next - t, 3), "approximate": True})
        if out:
            out[-1]["incomplete"] = True
        return out


def prepare_victim(case: Case, seed: int, cache_dir: str | None) -> dict[str, Any]:
    """Build the case's victim into the cache now (outside any time limit); return its build summary."""
    _, info = build_victim(case, seed, cache_dir)
    return info


def run_cifar_case(
    case: Case,
    seed: int = 0,
    *,
    timeout: float | None = DEFAULT_CIFAR_TIMEOUT,
    options: CifarOptions | None = None,
    on_log: Callable[[int, str], None] | None = None,
    execute: Callable[[Case, int, CifarOptions], dict[str, Any]] = execute_cifar_case,
) -> dict[str, Any]:
    """Run a cifar case in a worker process under a hard limit of ``timeout`` seconds (``None``: here,
    without limit or deadline) and return its record, also for a worker killed at the limit.

    The victim is prepared first (in this process, untimed); the worker stops the attack at a soft
    deadline :data:`VERIFY_RESERVE_SECONDS` (at most half the limit) before the hard limit.
    """
    opts = options if options is not None else CifarOptions()
    if timeout is None:
        return execute(case, seed, opts)
    if not timeout > 0:
        raise InputError(f"timeout: expected a positive number of seconds, found {timeout!r}")
    try:
        prepare_victim(case, seed, opts.cache_dir)
    except Exception as exc:  # the worker will report it in its record
        log.warning("could not prepare the victim of %s: %s", case.name, exc)
    reserve = min(VERIFY_RESERVE_SECONDS, 0.5 * timeout)
    opts = CifarOptions(
        cache_dir=opts.cache_dir,
        deadline=time.time() + timeout - reserve,
        agreement_points=opts.agreement_points,
        verify_lines=opts.verify_lines,
        profile_interval=opts.profile_interval,
        jobs=opts.jobs,
        backend=opts.backend,
        ray_address=opts.ray_address,
        limit_text=f"({timeout - reserve:g} s into the {timeout:g} s limit, {reserve:g} s kept for verification) ",
        extra={**opts.extra, "time_limit_seconds": timeout, "soft_deadline_seconds": round(timeout - reserve, 3)},
    )
    timeline = StageTimeline(on_log)
    out = run_isolated(execute, (case, seed, opts), timeout, on_log=timeline.feed)
    if out.state == "done" and out.value is not None:
        return out.value
    record = new_record(case, seed)
    record.update(opts.extra)
    record["wall_seconds"] = round(out.seconds, 3)
    record["progress"] = list(out.log[-KEEP_LOG_LINES:])
    record["queries"] = out.queries
    record["stages"] = timeline.stages(out.queries)
    record["layers"] = _merge_log_layers(case.victim.arch, out.log)
    current = timeline.current()
    where = "" if current is None else f" during stage {current[0]}" + (
        "" if current[1] is None else f" (layer {current[1]})")
    if out.state == "timeout":
        record["status"] = "timeout"
        record["reason"] = f"killed at the {timeout:g} s wall-clock limit{where}"
    elif out.state == "error":
        record["status"] = f"failed: {out.error}"
        record["reason"] = out.error + where
        record["traceback"] = out.traceback
    else:
        record["status"] = f"failed: the worker process died (exit code {out.exitcode})"
        record["reason"] = f"the worker process died (exit code {out.exitcode}){where}"
    add_attempts(record, out.log)
    failed = next((e for e in record["layers"] if e["status"] == "failed"), None)
    if failed is not None:  # the first layer not reported done: where the run was when it stopped
        record["failed_layer"] = failed["index"]
        sel = [s for s in record["stages"] if s["layer"] == failed["index"]]
        failed["queries"] = sum(s["queries"] for s in sel) if sel else None
        failed["seconds"] = round(sum(s["seconds"] for s in sel), 3) if sel else None
    for e in record["layers"]:  # per-layer cost of the finished layers, from the parent's clock
        if e["status"] == "done":
            sel = [s for s in record["stages"] if s["layer"] == e["index"]]
            if sel:
                e["queries"] = sum(s["queries"] for s in sel)
                e["seconds"] = round(sum(s["seconds"] for s in sel), 3)
                e["approximate"] = True
    if record["stages"]:
        record["seconds"] = round(sum(s["seconds"] for s in record["stages"]), 3)
    try:  # the victim's identity, from the cache (cheap: the parent prepared it)
        add_victim(record, prepare_victim(case, seed, opts.cache_dir))
    except Exception:  # nothing more to say than the status already does
        pass
    return finish_record(record, case)


def stamp(record: dict[str, Any], env: dict[str, Any]) -> dict[str, Any]:
    """Add ``cpu``, ``date`` and ``commit`` (from :func:`run_environment`) to ``record``; return it."""
    record.update(cpu=env["cpu"], date=env["date"], commit=env["commit"])
    record["environment"] = {k: v for k, v in env.items() if k not in ("cpu", "date", "commit")}
    return record


def working_tree_changes(repo: str | Path | None = None, *, ignore: Sequence[str] = ("benchmarks/results",),
                         limit: int = 40) -> dict[str, Any] | None:
    """What a ``-dirty`` commit means: the changed paths (``git status --porcelain``, at most ``limit``)
    and the SHA-256 of ``git diff HEAD`` (tracked changes); ``None`` outside a checkout."""
    import hashlib

    cwd = str(repo) if repo is not None else None
    spec = ["--", ".", *(f":(exclude){p}" for p in ignore)]
    try:
        status = subprocess.run(["git", "status", "--porcelain", *spec], cwd=cwd, capture_output=True, text=True,
                                check=False, timeout=10)
        diff = subprocess.run(["git", "diff", "HEAD", *spec], cwd=cwd, capture_output=True, check=False,
                              timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    if status.returncode != 0:
        return None
    paths = [line for line in status.stdout.splitlines() if line.strip()]
    return {"paths": paths[:limit], "n_paths": len(paths), "diff_sha256": hashlib.sha256(diff.stdout).hexdigest()}


def run_environment(repo: str | Path | None = None) -> dict[str, Any]:
    """``cpu`` (:func:`cpu_info`), ``date`` (ISO 8601, local time with offset), ``commit``
    (:func:`git_commit`), the working-tree changes behind a ``-dirty`` commit, and the Python and numpy
    versions; taken when a run starts."""
    import platform

    commit = git_commit(repo)
    return {
        "cpu": cpu_info(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "commit": commit,
        "changes": working_tree_changes(repo) if commit is not None and commit.endswith("-dirty") else None,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "platform": platform.platform(),
    }
