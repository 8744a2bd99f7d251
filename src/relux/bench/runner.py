"""Run one benchmark case: build the victim, attack it through its oracle, verify, return a row dict.

:func:`execute_case` runs a case in this process. :func:`run_case` runs it in a fresh process (the
``spawn`` start method) under a wall-clock limit, so that a runaway case is killed and reported as a
timeout while the suite goes on; :func:`run_isolated` is that mechanism for any picklable function
returning a dict. The worker forwards its log records (``relux`` at INFO and above, plus the
query-count heartbeats of this module) to the parent, so a timed-out row still says how many queries
were spent and the last stage reached.

A row is a JSON-ready dict (non-finite numbers are ``None``) with at least the keys in
:data:`ROW_KEYS`; ``status`` is ``ok``, ``failed: REASON``, ``skipped: REASON`` or ``timeout``.
"""

from __future__ import annotations

import functools
import logging
import math
import multiprocessing
import multiprocessing.connection
import os
import re
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

from relux.bench.suites import Case, Targets, Victim, shared_models_dir
from relux.errors import ExtractionFailed, InputError
from relux.model import MLP, format_arch
from relux.oracle.base import FloatArray, Oracle, as_query_batch
from relux.oracle.local import MLPOracle
from relux.oracle.wrappers import OracleWrapper

log = logging.getLogger(__name__)

#: Keys every row has (values may be ``None`` when a case did not get that far).
ROW_KEYS = (
    "model",
    "victim",
    "arch",
    "params",
    "seed",
    "status",
    "error",
    "queries",
    "log2_queries",
    "seconds",
    "log2_weight_error",
    "max_rel_output_error",
    "argmax_agreement",
    "sign_errors",
    "selfcheck",
    "layers",
)

#: Default wall-clock limit per case, in seconds.
DEFAULT_TIMEOUT = 600.0
#: Seconds between two query-count heartbeats of a running attack.
HEARTBEAT_SECONDS = 1.0
#: A self-check that passes a model whose output error exceeds this is reported as a failure.
WRONG_MODEL_OUTPUT_ERROR = 1e-6
#: Log lines of a worker kept in a row (the last ones), and kept in memory while it runs.
KEEP_LOG_LINES = 12
MAX_LOG_LINES = 500
#: The attack's per-layer log line, read to tell how far a killed case got.
_LAYER_LINE = re.compile(r"^layer (\d+): (\d+)/(\d+) neurons(?:, (.*))?$")


# --------------------------------------------------------------------------- helpers
def _f(x: float | None) -> float | None:
    """A JSON-ready float: ``None`` for None, NaN and infinities."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _log2(n: float | None) -> float | None:
    if n is None or not n > 0:
        return None
    return round(math.log2(n), 3)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


class _Meter(OracleWrapper):
    """Counts rows and logs the count at DEBUG every :data:`HEARTBEAT_SECONDS` (with ``bench_queries``)."""

    def __init__(self, inner: Oracle, interval: float = HEARTBEAT_SECONDS) -> None:
        super().__init__(inner)
        self.queries = 0
        self.interval = interval
        self._last = time.monotonic()

    def query(self, X: FloatArray) -> FloatArray:
        A = as_query_batch(X, self.input_dim)
        Y = self.inner.query(A)
        self.queries += A.shape[0]
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            log.debug("%d queries so far", self.queries, extra={"bench_queries": self.queries})
        return Y


class _Collect(logging.Handler):
    """Keeps the messages of the attack's log records (those its loggers let through)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())
        if len(self.lines) > MAX_LOG_LINES:
            del self.lines[0]


def base_row(case: Case, seed: int) -> dict[str, Any]:
    """A row with every key of :data:`ROW_KEYS`, filled with what is known before running ``case``."""
    v = case.victim
    row: dict[str, Any] = {k: None for k in ROW_KEYS}
    row.update(
        model=case.name,
        victim=v.describe(seed),
        arch=format_arch(v.arch) if v.arch else None,
        seed=seed,
        status="",
        layers=[],
        published=None if case.published is None else case.published.to_json(),
        targets=None if case.targets is None else case.targets.to_json(),
        note=case.note or None,
    )
    return row


def build_victim(victim: Victim, seed: int, shared_dir: Path | None) -> tuple[MLP, dict[str, Any]] | str:
    """The victim's reference model and a JSON-ready summary, or the reason to skip it (a string)."""
    info: dict[str, Any] = {}
    rng = np.random.default_rng(seed)
    if victim.kind == "file":
        assert victim.path is not None
        if shared_dir is None:
            return f"shared models directory not found (needed for {victim.describe(seed)})"
        path = shared_dir / victim.path
        if not path.is_file():
            return f"{victim.describe(seed)} not found"
        from relux.formats import load_model

        info["path"] = str(path)
        return load_model(path), info
    from relux.zoo import random_mlp, trained_mlp, unitary_mlp

    if victim.kind == "random":
        return random_mlp(victim.arch, rng), info
    if victim.kind == "unitary":
        return unitary_mlp(victim.arch, rng), info
    assert victim.dataset is not None
    model, report = trained_mlp(victim.arch, victim.dataset, rng)
    info["training"] = report.to_dict()
    return model, info


# --------------------------------------------------------------------------- one case, in this process
def execute_case(
    case: Case,
    seed: int = 0,
    shared_dir: str | Path | None = None,
    *,
    verify_points: int = 10000,
    verify_lines: int = 64,
    parallel: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run ``case`` here: build the victim (victim seed and attack seed are both ``seed``), attack it
    through its oracle, verify the result (or the partial result of a failed run) against the truth.

    ``parallel``: the ``jobs``, ``backend`` and ``ray_address`` fields of the attack's
    :class:`~relux.attack.ExtractionConfig` (default: serial); the row's ``execution`` records them.

    Never raises for a failing case: failures, including unexpected exceptions, become the row's status.
    """
    from relux.attack import ExtractionConfig, ExtractionResult, extract

    t_case = time.perf_counter()
    row = base_row(case, seed)
    shared = shared_models_dir(shared_dir)
    t0 = time.perf_counter()
    try:
        built = build_victim(case.victim, seed, shared)
    except Exception as exc:  # a broken file or dataset: report it, go on with the suite
        row["status"] = f"failed: could not build the victim ({type(exc).__name__}: {_one_line(exc)})"
        row["error"] = _one_line(exc)
        row["wall_seconds"] = round(time.perf_counter() - t_case, 3)
        return row
    if isinstance(built, str):
        row["status"] = f"skipped: {built}"
        row["wall_seconds"] = round(time.perf_counter() - t_case, 3)
        return row
    reference, info = built
    row["build_seconds"] = round(time.perf_counter() - t0, 3)
    row["victim_info"] = info
    row["arch"] = format_arch(reference.arch)
    row["params"] = reference.n_params
    hidden = reference.arch[1:-1]
    log.info("%s: %s, %d parameters", case.name, row["arch"], reference.n_params)

    meter = _Meter(MLPOracle(reference))
    result: ExtractionResult | None = None
    collector = _Collect()
    attack_log = logging.getLogger("relux.attack")
    attack_log.addHandler(collector)
    t0 = time.perf_counter()
    try:
        result = extract(meter, reference.arch, ExtractionConfig(seed=seed, **(parallel or {})))
        row["status"] = "ok"
    except ExtractionFailed as exc:
        result = exc.partial if isinstance(exc.partial, ExtractionResult) else None
        row["status"] = f"failed: {_one_line(exc)}"
        row["error"] = _one_line(exc)
        row["partial"] = result is not None
    except Exception as exc:  # a bug or an oracle error inside the attack: the row says which
        row["status"] = f"failed: {type(exc).__name__}: {_one_line(exc)}"
        row["error"] = row["status"][len("failed: "):]
        row["traceback"] = traceback.format_exc(limit=8)
    finally:
        attack_log.removeHandler(collector)
    attack_seconds = time.perf_counter() - t0
    row["queries"] = meter.queries
    row["log2_queries"] = _log2(meter.queries)
    row["seconds"] = round(result.seconds if result is not None else attack_seconds, 3)

    layers: list[dict[str, Any]] = [{"index": i + 1, "width": w} for i, w in enumerate(hidden)]
    if result is not None:
        _add_result(row, layers, result)
        t0 = time.perf_counter()
        _add_verification(row, layers, reference, result.model, verify_points, verify_lines)
        row["verify_seconds"] = round(time.perf_counter() - t0, 3)
    elif row["status"] != "ok":
        # No (partial) result: the attack's per-layer log lines still say how far it got.
        layers = layers_from_log(collector.lines, reference.arch)
        row["progress"] = collector.lines[-KEEP_LOG_LINES:]
    row["layers"] = layers
    if (
        row["status"] == "ok"
        and row["max_rel_output_error"] is not None
        and row["max_rel_output_error"] > WRONG_MODEL_OUTPUT_ERROR
    ):
        row["status"] = (
            f"failed: the self-check passed a wrong model (max relative output error "
            f"{row['max_rel_output_error']:.2g} against the true weights)"
        )
    if case.targets is not None:
        row["misses"] = target_misses(case.targets, row)
        row["met"] = not row["misses"]
    row["wall_seconds"] = round(time.perf_counter() - t_case, 3)
    return row


def _add_result(row: dict[str, Any], layers: list[dict[str, Any]], result: Any) -> None:
    """Copy what the (possibly partial) extraction result says into the row and its per-layer list."""
    row["recovered_arch"] = format_arch(result.model.arch)
    row["selfcheck"] = "passed" if result.selfcheck.passed else "failed"
    row["selfcheck_rel_error"] = _f(result.selfcheck.max_rel_error)
    row["stages"] = [s.to_json() for s in result.stages]
    row["sign_queries"] = sign_stage_queries(row["stages"])
    row["warnings"] = list(result.warnings)[:20]
    row["execution"] = dict(result.execution)
    for rep in result.layers:
        if 1 <= rep.index <= len(layers):
            layers[rep.index - 1].update(
                recovered=rep.recovered,
                dead=rep.dead,
                witnesses=rep.witnesses,
                queries=rep.queries,
                seconds=round(rep.seconds, 3),
                sign_method=rep.sign_method,
            )


def sign_stage_queries(stages: Sequence[dict[str, Any]]) -> int | None:
    """Queries of the stages that recover signs (a name with a word ``sign``/``signs``, e.g.
    ``signs+output`` or ``sign_check``; not ``signatures``); ``None`` when there is no such stage."""
    sel = [s for s in stages if {"sign", "signs"} & set(re.split(r"[^a-z]+", str(s["name"]).lower()))]
    return sum(int(s["queries"]) for s in sel) if sel else None


def _add_verification(
    row: dict[str, Any], layers: list[dict[str, Any]], reference: MLP, extracted: MLP, n_random: int, n_lines: int
) -> None:
    """Verify ``extracted`` against ``reference`` and copy the figures into the row and per-layer list."""
    from relux.verify import VerifyConfig, verify

    try:
        report = verify(reference, extracted, rng=np.random.default_rng(0), n_random=n_random, n_lines=n_lines,
                        config=VerifyConfig(activity_points=100_000))
    except Exception as exc:  # e.g. a partial model of another depth: keep the attack's own numbers
        row["verify_error"] = f"{type(exc).__name__}: {_one_line(exc)}"
        return
    row.update(
        log2_weight_error=_f(report.log2_max_norm_weight_error),
        max_norm_weight_error=_f(report.max_norm_weight_error),
        max_rel_output_error=_f(report.max_rel_output_error),
        log2_max_rel_output_error=_f(report.log2_max_rel_output_error),
        argmax_agreement=_f(report.argmax_agreement),
        agreement_kind=report.agreement_kind,
        sign_errors=report.sign_errors,
        unmatched=report.unmatched,
        # reference weights its function does not determine, left out of the weight error (relux.identifiability)
        undetermined_weights=sum(la.undetermined for la in report.layers),
        # how often each unmatched reference neuron is on (hidden layers from 1, as in "layers"): a
        # neuron on at 1e-5 of inputs is out of reach of random search lines
        unmatched_activity=[{"layer": li + 1, "neuron": j, "on_fraction": f, "inputs": n}
                            for li, j, f, n in report.unmatched_activity],
    )
    for la in report.layers:  # alignment layers count from 0, the attack's LayerReport from 1
        if la.kind == "hidden" and 0 <= la.index < len(layers):
            layers[la.index].update(
                matched=la.matched,
                extracted_width=la.candidate_width,
                sign_errors=la.sign_errors,
                log2_weight_error=_f(la.log2_max_norm_weight_error),
            )
        elif la.kind != "hidden":
            row["output_log2_weight_error"] = _f(la.log2_max_norm_weight_error)


def target_misses(targets: Targets, row: dict[str, Any]) -> list[str]:
    """The targets a row missed, as sentences (empty when all are met)."""
    if row["max_rel_output_error"] is None:
        return [f"no verified model ({row['status']})"]
    misses = []
    w = row.get("max_norm_weight_error")
    if w is None or not w <= targets.max_weight_error:
        misses.append(f"weight error 2^{row['log2_weight_error']} > 2^{math.log2(targets.max_weight_error):g}")
    if targets.max_rel_output_error is not None and not row["max_rel_output_error"] <= targets.max_rel_output_error:
        misses.append(f"output error {row['max_rel_output_error']:.2g} > {targets.max_rel_output_error:g}")
    agreement = row.get("argmax_agreement")
    if targets.min_argmax_agreement is not None and (agreement is None or agreement < targets.min_argmax_agreement):
        misses.append(f"argmax agreement {agreement} < {targets.min_argmax_agreement:g}")
    if row["sign_errors"] or row.get("unmatched"):
        misses.append(f"{row['sign_errors']} sign errors, {row.get('unmatched')} unmatched neurons")
    if row["log2_queries"] is None or row["log2_queries"] > targets.max_log2_queries:
        misses.append(f"queries 2^{row['log2_queries']} > 2^{targets.max_log2_queries:g}")
    if targets.max_seconds is not None and row["seconds"] > targets.max_seconds:
        misses.append(f"{row['seconds']:.1f} s > {targets.max_seconds:g} s")
    if row["selfcheck"] != "passed":
        misses.append("self-check failed")
    return misses


def layers_from_log(lines: Sequence[str], arch: Sequence[int]) -> list[dict[str, Any]]:
    """Per-layer entries from the attack's ``layer i: r/w neurons, METHOD`` log lines (the last line of
    each layer wins), for a case killed before it returned a result. ``arch`` may be empty (a file)."""
    layers: dict[int, dict[str, Any]] = {i + 1: {"index": i + 1, "width": w} for i, w in enumerate(arch[1:-1])}
    for line in lines:
        m = _LAYER_LINE.match(line)
        if m:
            i = int(m.group(1))
            entry = layers.setdefault(i, {"index": i, "width": int(m.group(3))})
            entry.update(recovered=int(m.group(2)), from_log=True)
            if m.group(4):
                entry["sign_method"] = m.group(4)
    return [layers[i] for i in sorted(layers)]


# --------------------------------------------------------------------------- isolation and time limit
@dataclass(frozen=True)
class IsolatedOutcome:
    """How a function run in a worker process ended.

    ``state``: ``done`` (``value`` holds its return value), ``error`` (it raised: ``error`` and
    ``traceback``), ``timeout`` (killed at the limit) or ``crashed`` (the process died: ``exitcode``).
    ``log`` holds the last forwarded log lines; ``queries`` the last heartbeat's query count.
    """

    state: str
    seconds: float
    value: dict[str, Any] | None = None
    error: str = ""
    traceback: str = ""
    exitcode: int | None = None
    log: tuple[str, ...] = ()
    queries: int | None = None


class _Forward(logging.Handler):
    """Worker-side handler: sends each record's level, message and heartbeat count through the pipe."""

    def __init__(self, conn: Connection) -> None:
        super().__init__(logging.DEBUG)
        self.conn = conn

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.conn.send(("log", record.levelno, record.name, record.getMessage(),
                            getattr(record, "bench_queries", None)))
        except Exception:  # the parent is gone: nothing to report to
            pass


def _exit_with_parent() -> None:
    """End this worker process as soon as the process that started it is gone: a parent killed by a
    signal runs no clean-up, and its worker would otherwise go on using a core until its own end. The
    worker waits on the parent's sentinel, a pipe that closes when the parent dies, held from the
    worker's start (a parent that forks without exec would hold it open too; the bench does not)."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return
    multiprocessing.connection.wait([parent.sentinel])
    os._exit(1)


def _worker(conn: Connection, func: Callable[..., dict[str, Any]], args: tuple[Any, ...]) -> None:
    """Body of the worker process: forward logs, run ``func(*args)``, send its result or its error. The
    worker ends with the process that started it (:func:`_exit_with_parent`)."""
    threading.Thread(target=_exit_with_parent, daemon=True).start()
    handler = _Forward(conn)
    relux_log = logging.getLogger("relux")
    relux_log.addHandler(handler)
    relux_log.setLevel(logging.INFO)
    relux_log.propagate = False
    logging.getLogger(__name__).setLevel(logging.DEBUG)  # heartbeats
    try:
        value = func(*args)
        conn.send(("done", value))
    except BaseException as exc:
        conn.send(("error", f"{type(exc).__name__}: {_one_line(exc)}", traceback.format_exc(limit=8)))
    finally:
        conn.close()


def run_isolated(
    func: Callable[..., dict[str, Any]],
    args: tuple[Any, ...],
    timeout: float,
    *,
    on_log: Callable[[int, str], None] | None = None,
) -> IsolatedOutcome:
    """Run ``func(*args)`` in a new ``spawn`` process; kill it after ``timeout`` wall-clock seconds.

    ``func`` and ``args`` must be picklable (``func`` defined at module level). ``on_log(level, message)``
    sees every log record the worker forwards, as it arrives.
    """
    if not timeout > 0:
        raise InputError(f"timeout: expected a positive number of seconds, found {timeout!r}")
    ctx = multiprocessing.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_worker, args=(send, func, args))
    t0 = time.monotonic()
    deadline = t0 + timeout
    proc.start()
    send.close()  # the worker holds the only writing end now: EOF tells us it died
    lines: list[str] = []
    queries: int | None = None
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not recv.poll(min(left, 1.0)):
                if left <= 0:
                    _stop(proc)
                    return IsolatedOutcome("timeout", time.monotonic() - t0, log=tuple(lines), queries=queries)
                continue
            try:
                msg = recv.recv()
            except (EOFError, OSError):
                proc.join(5.0)
                return IsolatedOutcome("crashed", time.monotonic() - t0, exitcode=proc.exitcode,
                                       log=tuple(lines), queries=queries)
            if msg[0] == "log":
                _, level, name, text, beat = msg
                if beat is not None:
                    queries = int(beat)
                else:
                    lines = [*lines[-(MAX_LOG_LINES - 1):], text]
                if on_log is not None:
                    on_log(int(level), text)
                continue
            proc.join(10.0)
            if proc.is_alive():
                _stop(proc)
            seconds = time.monotonic() - t0
            if msg[0] == "done":
                return IsolatedOutcome("done", seconds, value=msg[1], log=tuple(lines), queries=queries)
            return IsolatedOutcome("error", seconds, error=msg[1], traceback=msg[2], log=tuple(lines),
                                   queries=queries)
    finally:
        recv.close()
        if proc.is_alive():
            _stop(proc)


def _stop(proc: Any) -> None:
    """Terminate the worker, then kill it if it does not exit promptly."""
    proc.terminate()
    proc.join(3.0)
    if proc.is_alive():
        proc.kill()
        proc.join(3.0)


def _victim_arch(victim: Victim, shared_dir: str | None) -> tuple[int, ...]:
    """The victim's architecture without building it (a file is read; ``()`` when that fails)."""
    if victim.arch:
        return victim.arch
    shared = shared_models_dir(shared_dir)
    if shared is None or victim.path is None:
        return ()
    try:
        from relux.formats import load_model

        return load_model(shared / victim.path).arch
    except Exception:  # absent or unreadable: the row says so elsewhere
        return ()


def run_case(
    case: Case,
    seed: int = 0,
    *,
    timeout: float | None = DEFAULT_TIMEOUT,
    shared_dir: str | Path | None = None,
    on_log: Callable[[int, str], None] | None = None,
    execute: Callable[[Case, int, str | None], dict[str, Any]] = execute_case,
    parallel: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run ``case`` in a worker process under a wall-clock limit of ``timeout`` seconds (``None``: in
    this process, no limit) and return its row. A case killed at the limit has status ``timeout`` and
    keeps the queries spent so far and its last log lines (``progress``).

    ``execute(case, seed, shared_dir)`` produces the row in the worker (default :func:`execute_case`;
    it must be picklable, i.e. defined at module level). ``parallel`` is passed on to
    :func:`execute_case` (the attack's ``jobs``, ``backend`` and ``ray_address``).
    """
    shared = None if shared_dir is None else str(shared_dir)
    if parallel:
        execute = functools.partial(execute_case, parallel=dict(parallel)) if execute is execute_case else execute
    if timeout is None:
        return execute(case, seed, shared)
    out = run_isolated(execute, (case, seed, shared), timeout, on_log=on_log)
    if out.state == "done" and out.value is not None:
        return out.value
    row = base_row(case, seed)
    row["wall_seconds"] = round(out.seconds, 3)
    row["progress"] = list(out.log[-KEEP_LOG_LINES:])
    arch = _victim_arch(case.victim, shared)
    if arch:
        row["arch"] = format_arch(arch)
        row["params"] = sum((a + 1) * b for a, b in zip(arch[:-1], arch[1:], strict=True))
    row["layers"] = layers_from_log(out.log, arch)
    if out.queries is not None:
        row["queries"] = out.queries
        row["log2_queries"] = _log2(out.queries)
    if out.state == "timeout":
        row["status"] = "timeout"
        row["error"] = f"killed after the {timeout:g} s limit"
    elif out.state == "error":
        row["status"] = f"failed: {out.error}"
        row["error"] = out.error
        row["traceback"] = out.traceback
    else:
        row["status"] = f"failed: the worker process died (exit code {out.exitcode})"
        row["error"] = row["status"][len("failed: "):]
    if case.targets is not None:
        row["misses"] = [f"no verified model ({row['status']})"]
        row["met"] = False
    return row
