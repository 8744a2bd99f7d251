"""``relux extract``: recover a ReLU network's weights from black-box queries and save them.

The victim is reached through exactly one oracle: a model file (``--model``, read only to build the
oracle and learn its architecture), an HTTP endpoint (``--url``, KServe v2 or TF-Serving) or a Python
callable (``--oracle FILE.py:NAME``). The attack itself only ever sees the oracle.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from relux.cli.common import add_parallel_options, nonneg_int, parallel_options
from relux.errors import BudgetExhausted, ExtractionFailed, InputError, OracleError
from relux.model import format_arch, parse_arch

if TYPE_CHECKING:
    from relux.attack.result import ExtractionResult
    from relux.checkpoint import Checkpoint
    from relux.oracle.base import Oracle
    from relux.oracle.retry import RetryPolicy

DESCRIPTION = """\
Recover the weights of a fully connected ReLU network from black-box queries.

Victim (exactly one):
  --model FILE          a model file (.npz, .safetensors, .onnx, .keras, .h5, .pt); the file is read
                        only to build the oracle and to learn the architecture
  --url URL             an HTTP endpoint: http://HOST:PORT/v2/models/NAME (KServe v2) or
                        http://HOST:PORT/v1/models/NAME (TF-Serving); needs --arch
  --oracle FILE.py:NAME a Python callable NAME(X) -> Y with X of shape (n, d); needs --arch

The extracted network is written to --out only when the self-check on fresh queries passes
(|f - f'| <= T * max|f|, T = max(--selfcheck-tol, 100 x the oracle's measured noise floor));
otherwise the report (if asked for) is written, marked failed, and the exit status is 1.

A remote oracle that keeps failing (HTTP 5xx or 429, timeouts, dropped connections) is retried with
exponential backoff for --oracle-timeout seconds, then the run fails with exit status 1. A URL that
refuses the connection or answers 404 is bad input. Exit status 2 means bad input.
"""


#: Default of ``--oracle-timeout``: seconds a failing remote oracle is retried before giving up.
DEFAULT_ORACLE_TIMEOUT = 120.0



# --------------------------------------------------------------------------- argument types
def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, found {text!r}") from None
    if not (math.isfinite(value) and value > 0.0):
        raise argparse.ArgumentTypeError(f"expected a positive number, found {text!r}")
    return value




def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "extract",
        help="recover a ReLU network from black-box queries (model file, HTTP endpoint or Python callable)",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", metavar="FILE", help="model file to attack as a black box")
    source.add_argument("--url", metavar="URL", help="KServe v2 (/v2/models/NAME) or TF-Serving (/v1/models/NAME)")
    source.add_argument("--oracle", metavar="FILE.py:NAME", help="Python callable answering queries")
    parser.add_argument(
        "--arch",
        metavar="ARCH",
        help="layer widths, e.g. 64-48-10 (required with --url and --oracle; checked against --model)",
    )
    parser.add_argument("--out", required=True, metavar="FILE", help="where to write the extracted model")
    parser.add_argument("--report", metavar="JSON", help="write the extraction report (JSON) here")
    parser.add_argument("--seed", type=nonneg_int, default=0, help="seed of the attack's random draws (default 0)")
    parser.add_argument("--budget", type=nonneg_int, default=None, metavar="N", help="stop after N queries")
    parser.add_argument(
        "--input-scale",
        type=_positive_float,
        default=1.0,
        metavar="X",
        help="standard deviation of the random base points; match the victim's input range (default 1)",
    )
    parser.add_argument(
        "--oracle-timeout",
        type=_positive_float,
        default=DEFAULT_ORACLE_TIMEOUT,
        metavar="SECONDS",
        help="with --url: give up (exit 1) once a request has been failing for this long; transient "
        "failures (5xx, 429, timeouts, dropped connections) are retried until then (default %(default)g)",
    )
    parser.add_argument(
        "--selfcheck-tol",
        type=_positive_float,
        default=1e-8,
        metavar="T",
        help="self-check tolerance, relative to max|f| on fresh queries (default 1e-8: a wrong sign or a missing "
        "neuron leaves errors of 1e-4 and more, float64 precision losses through deep layers stay below)",
    )
    add_parallel_options(parser)
    parser.add_argument(
        "--checkpoint",
        metavar="DIR",
        help="save every oracle answer to DIR as it arrives; rerunning the same command with the same DIR "
        "replays them without querying the victim and continues where the last run stopped (after a "
        "crash, kill or Ctrl-C). DIR is kept after the run; delete it when done",
    )
    parser.set_defaults(func=run)


# --------------------------------------------------------------------------- checks and oracle
def retry_policy(oracle_timeout: float) -> RetryPolicy:
    """The retry policy of ``--oracle-timeout SECONDS``: the default backoff, bounded by the time.

    Attempts are capped at one per ``base_delay`` of the timeout: the backoff (doubling up to
    ``max_delay``) reaches the time limit long before that cap, which only bounds a server that asks
    for immediate retries (``Retry-After: 0``) forever.
    """
    from relux.oracle.retry import RetryPolicy

    default = RetryPolicy()
    attempts = max(default.max_attempts, math.ceil(oracle_timeout / default.base_delay))
    return RetryPolicy(total_timeout=oracle_timeout, max_attempts=attempts)



def _check_output_path(flag: str, path: str, *, model: bool) -> None:
    p = Path(path)
    if p.is_dir():
        raise InputError(f"{flag} {path} is a directory; expected a file name")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise InputError(f"{flag} {path}: directory {parent} does not exist; create it first")
    if model:
        from relux.formats import check_writable

        check_writable(path)


def _build_oracle(args: argparse.Namespace, stack: contextlib.ExitStack) -> tuple[Oracle, tuple[int, ...], str]:
    """The victim's oracle, the architecture to extract, and a one-line description of the source."""
    arch = parse_arch(args.arch) if args.arch is not None else None
    if args.model is not None:
        from relux.formats import load_model, oracle_from_file

        # The file is read here only to learn the architecture; the attack gets the oracle alone.
        file_arch = load_model(args.model).arch
        if arch is not None and arch != file_arch:
            raise InputError(
                f"--arch {format_arch(arch)} does not match {args.model}, which holds a "
                f"{format_arch(file_arch)} network; drop --arch or fix it"
            )
        return oracle_from_file(args.model), file_arch, f"model file {args.model}"
    flag = "--url" if args.url is not None else "--oracle"
    if arch is None:
        what = "endpoint" if args.url is not None else "callable"
        raise InputError(f"{flag} needs --arch (the layer widths, e.g. 64-48-10): the {what} does not tell them")
    if args.url is not None:
        from relux.oracle.http import oracle_from_url

        retry = retry_policy(float(getattr(args, "oracle_timeout", DEFAULT_ORACLE_TIMEOUT)))
        remote = oracle_from_url(args.url, input_dim=arch[0], output_dim=arch[-1], retry=retry)
        close = getattr(remote, "close", None)
        if callable(close):
            stack.callback(close)
        return remote, arch, f"endpoint {args.url}"
    from relux.cli.common import GuardedCallable
    from relux.oracle.local import CallableOracle, load_callable

    # Guarded: a callable that does not fit --arch is bad input (exit 2), one that breaks later an
    # oracle failure (exit 1); neither ends in a traceback.
    fn = GuardedCallable(load_callable(args.oracle), args.oracle, arch[0], arch[-1])
    return CallableOracle(fn, arch[0], arch[-1], name=args.oracle), arch, f"callable {args.oracle}"


# --------------------------------------------------------------------------- checkpoint
def _with_checkpoint(
    args: argparse.Namespace,
    victim: Oracle,
    arch: tuple[int, ...],
    config: dict[str, Any],
    stack: contextlib.ExitStack,
) -> tuple[Oracle, Checkpoint | None]:
    """With ``--checkpoint DIR``: open or resume the checkpoint and journal the victim's answers.

    When the run ends by an exception, the checkpoint's state records it (``interrupted`` or
    ``failed``); the journal is durable after every batch whatever happens.
    """
    directory = getattr(args, "checkpoint", None)
    if directory is None:
        return victim, None
    from relux.checkpoint import Checkpoint, RunIdentity, victim_identity

    identity = RunIdentity(arch, config, victim_identity(model=args.model, url=args.url, oracle=args.oracle))
    ckpt = Checkpoint.open(directory, identity)

    def finish(exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        try:
            if exc is not None and ckpt.state.get("status") == "running":
                if isinstance(exc, KeyboardInterrupt):
                    ckpt.save("interrupted")
                else:
                    ckpt.save("failed", error=" ".join(str(exc).split()) or type(exc).__name__)
                    if isinstance(exc, (BudgetExhausted, OracleError)) and ckpt.journal is not None:
                        more = " with a larger --budget" if isinstance(exc, BudgetExhausted) else ""
                        print(f"progress saved to {directory}; rerun the same command{more} to continue")
        finally:
            ckpt.close()

    stack.push(finish)
    journal = ckpt.wrap(victim)
    if journal.journal_batches:
        print(
            f"relux extract: resuming from checkpoint {directory}: {journal.journal_queries} recorded queries "
            "will be replayed without querying the victim",
            flush=True,
        )
    return journal, ckpt


def _query_counts(ckpt: Checkpoint | None, queries: int) -> dict[str, Any]:
    """Report fields: of the ``queries`` the run made, how many the checkpoint replayed and how many were live."""
    if ckpt is None:
        return {"checkpoint": None, "queries_replayed": 0, "queries_live": queries}
    return {"checkpoint": str(ckpt.directory), "queries_replayed": ckpt.queries_replayed,
            "queries_live": ckpt.queries_live}


def _interrupted(ckpt: Checkpoint | None) -> int:
    """Ctrl-C during the extraction: one line on stderr, exit status 130."""
    if ckpt is None:
        print("relux: interrupted: nothing was saved; add --checkpoint DIR to make a run resumable", file=sys.stderr)
    else:
        ckpt.save("interrupted")
        print(f"relux: interrupted: progress saved to {ckpt.directory}; rerun the same command to resume",
              file=sys.stderr)
    return 130


# --------------------------------------------------------------------------- output
def _log2(n: int) -> float:
    return math.log2(n) if n > 0 else 0.0


def _rows(table: list[list[str]]) -> list[str]:
    widths = [max(len(r[c]) for r in table) for c in range(len(table[0]))]
    return ["  " + "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in table]


def format_summary(result: ExtractionResult) -> str:
    """A short human-readable summary of an extraction: cost per stage, layers, self-check verdict."""
    check = result.selfcheck
    verdict = "passed" if check.passed else "FAILED"
    lines = [
        f"architecture   {format_arch(result.arch)} (recovered {format_arch(result.model.arch)})",
        f"queries        {result.queries} (2^{_log2(result.queries):.2f})",
        f"seconds        {result.seconds:.2f}",
        f"noise floor    {result.noise_floor:.3g} (relative to max|f|; the self-check tolerance is never below "
        f"100x it)",
        f"self-check     {verdict}: max|f - f'| / max|f| = {check.max_rel_error:.3g} (random lines: per line) "
        f"(tolerance {check.tolerance:.3g}) on {check.points} fresh points; noise floor {result.noise_floor:.2g}",
        "",
    ]
    if check.passed and check.random_points:
        probes = f" ({check.probe_points} more are probes)" if check.probe_points else ""
        lines.insert(-1, f"               {check.random_points} of them random{probes}: inputs "
                         f"where the model is wrong have probability < {check.disagreement_bound:.1e} "
                         "(95% confidence)")
    ex = result.execution
    if ex:
        startup = f", after {ex['startup_seconds']:.2f} s starting workers" if ex.get("startup_seconds") else ""
        lines.insert(-1, f"execution      {ex['backend']}, {ex['jobs']} job(s); {ex['parallel_seconds']:.2f} s in "
                         f"parallel work{startup}")
    table = [["stage", "layer", "queries", "log2", "seconds"]]
    for s in result.stages:
        layer_no = "-" if s.layer is None else str(s.layer)
        table.append([s.name, layer_no, str(s.queries), f"{_log2(s.queries):.2f}", f"{s.seconds:.2f}"])
    lines += _rows(table)
    if result.layers:
        lines.append("")
        table = [["layer", "width", "recovered", "dead", "witnesses", "queries", "seconds", "residual",
                  "min sign conf.", "signs"]]
        for layer in result.layers:
            confs = [float(n["sign_confidence"]) for n in layer.neurons if "sign_confidence" in n]
            table.append(
                [str(layer.index), str(layer.width), str(layer.recovered), str(layer.dead), str(layer.witnesses),
                 str(layer.queries), f"{layer.seconds:.2f}",
                 "-" if layer.residual != layer.residual else f"{layer.residual:.1e}",
                 f"{min(confs):.2f}" if confs else "-", layer.sign_method]
            )
        lines += _rows(table)
    if result.warnings:
        lines.append("")
        lines += [f"warning: {w}" for w in result.warnings]
    return "\n".join(lines)


def _jsonable(obj: Any) -> Any:
    """Plain JSON values: numpy scalars/arrays to Python, non-finite floats to ``None``."""
    import numpy as np

    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return _jsonable(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _write_report(path: str, report: dict[str, Any]) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(_jsonable(report), fh, indent=2, allow_nan=False)
        fh.write("\n")
    os.replace(tmp, path)


# --------------------------------------------------------------------------- run
def run(args: argparse.Namespace) -> int:
    import time

    from relux.attack import ExtractionConfig, extract
    from relux.attack.result import ExtractionResult
    from relux.oracle.wrappers import BudgetOracle, CountingOracle
    from relux.progress import QueryProgress, progress_logging

    _check_output_path("--out", args.out, model=True)
    if args.report is not None:
        _check_output_path("--report", args.report, model=False)
    config = ExtractionConfig(seed=args.seed, input_scale=args.input_scale, selfcheck_tol=args.selfcheck_tol,
                              **parallel_options(args))
    quiet = bool(getattr(args, "quiet", False))

    with contextlib.ExitStack() as stack:
        t_build = time.perf_counter()
        try:
            victim, arch, described = _build_oracle(args, stack)
        except OracleError as exc:  # e.g. the endpoint's metadata request kept failing
            base_arch = parse_arch(args.arch) if args.arch is not None else ()
            source = args.url or args.model or args.oracle
            early = {"source": str(source), "out": None, "budget": args.budget}
            _fail(args, early, exc, base_arch, 0, time.perf_counter() - t_build, None)
            raise
        victim, ckpt = _with_checkpoint(args, victim, arch, config.to_json(), stack)
        counter = CountingOracle(victim)  # rows the victim actually answered, whatever happens
        oracle: Oracle = counter if args.budget is None else BudgetOracle(counter, args.budget)
        print(f"relux extract: {format_arch(arch)} from {described}", flush=True)
        # disable=None: a bar only when stderr is a terminal.
        bar = stack.enter_context(
            QueryProgress(
                oracle, desc=f"extract {format_arch(arch)}", total=args.budget, disable=True if quiet else None
            )
        )
        base: dict[str, Any] = {
            "source": described,
            "out": None,
            "budget": args.budget,
        }
        t0 = time.perf_counter()
        try:
            with progress_logging(not quiet):
                result = extract(bar, arch, config)
        except ExtractionFailed as exc:
            bar.close()  # before printing: keep the terminal tidy
            partial = exc.partial if isinstance(exc.partial, ExtractionResult) else None
            if partial is not None:
                print(format_summary(partial))
            base.update(_query_counts(ckpt, counter.queries))
            _fail(args, base, exc, arch, counter.queries, time.perf_counter() - t0, partial)
            raise
        except (BudgetExhausted, OracleError) as exc:
            bar.close()
            base.update(_query_counts(ckpt, counter.queries))
            _fail(args, base, exc, arch, counter.queries, time.perf_counter() - t0, None)
            raise
        except KeyboardInterrupt:
            bar.close()
            return _interrupted(ckpt)
        if ckpt is not None:
            ckpt.save("complete")
        base.update(_query_counts(ckpt, counter.queries))

    from relux.formats import save_model

    save_model(result.model, args.out)
    print(format_summary(result))
    if ckpt is not None:
        print(f"checkpoint     {ckpt.directory}: {ckpt.queries_replayed} queries replayed, {ckpt.queries_live} live")
    print(f"\nwrote {args.out}")
    if args.report is not None:
        _write_report(args.report, {**result.to_json(), **base, "out": str(args.out), "failed": False, "error": None})
        print(f"wrote {args.report}")
    return 0


def _fail(
    args: argparse.Namespace,
    base: dict[str, Any],
    exc: Exception,
    arch: tuple[int, ...],
    queries: int,
    seconds: float,
    partial: ExtractionResult | None,
) -> None:
    """Report a failed run: the report file (marked failed) if asked for, and a note on stdout."""
    from relux.attack.result import PartialResult

    stopped = getattr(exc, "partial", None)
    if partial is not None:
        report = partial.to_json()
    elif isinstance(stopped, PartialResult):
        report = stopped.to_json()  # the layers finished before the failure, and the noise floor
        print(f"stopped at layer {stopped.failed_layer} after {len(stopped.layers)} finished layer(s)")
    else:
        report = {
            "arch": list(arch),
            "queries": queries,
            "log2_queries": round(_log2(queries), 3),
            "seconds": round(seconds, 3),
        }
    report.update(base)
    report.update({"ok": False, "failed": True, "error": " ".join(str(exc).split()), "error_type": type(exc).__name__})
    if args.report is not None:
        _write_report(args.report, report)
        print(f"wrote {args.report} (marked failed)")
    print(f"nothing written to {args.out}: {type(exc).__name__} after {queries} queries", file=sys.stdout)
