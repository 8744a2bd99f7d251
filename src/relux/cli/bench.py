"""``relux bench``: run a benchmark suite of victims, one worker process per case under a time limit."""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from relux.bench.cifar import DEFAULT_CIFAR_TIMEOUT, VERIFY_RESERVE_SECONDS
from relux.bench.runner import DEFAULT_TIMEOUT
from relux.bench.suites import HIDDEN_SUITES, SUITE_NAMES
from relux.cli.common import add_parallel_options, parallel_options
from relux.errors import InputError

DESCRIPTION = f"""\
Attack a suite of victim networks and report queries, time and accuracy against the true weights.

  quick      random 10-15-15-1, random 40-20-10-10-1, digits-trained 64-32-32-10, and the shared
             CM24 unitary 784-128-1 and FMSH24 MNIST 784-15-15-1 files
  paper      the published settings of CJM20, CM24 and FMSH24, with their figures beside ours
  deep       the deep-network targets (2 to 4 hidden layers, random, trained and shared files)
  one-layer  the one-hidden-layer rows of benchmarks/one_hidden_layer.py, with their targets
  cifar      issue 7: 3072-256x8-10 trained on mnist32 and CM24 unitary (seed --seed); writes one
             result file per victim, cifar3072-256x8-10-{{trained,unitary}}.json, into --results-dir
             (default benchmarks/results under the project root), also when a run fails part-way.
             Victims are built once and kept in --cache (default $RELUX_CACHE_DIR, else
             ~/.cache/relux); the attack stops {VERIFY_RESERVE_SECONDS:g} s before --timeout to leave time
             to verify on 10^5 fresh inputs per source

Each case runs in its own process and is killed after --timeout seconds (default {DEFAULT_TIMEOUT:g},
{DEFAULT_CIFAR_TIMEOUT:g} for cifar; 0 runs the cases in this process without a limit). Shared files are
looked for in ../shared/models beside the project (or --shared-models, or $RELUX_SHARED_MODELS); rows
whose file is absent are skipped.
Status per row: ok, failed (reason in the notes), skipped, timeout. Exit status 0 when the suite ran
(with --strict: 1 when a row failed, timed out or missed its targets).
"""


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="run a benchmark suite (queries, time, accuracy per victim)",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--suite", default="quick", metavar="{" + ",".join(SUITE_NAMES) + "}",
                        help="which suite to run (default quick)")
    parser.add_argument("--json", type=Path, default=None, metavar="OUT", help="write the rows as a JSON list")
    parser.add_argument("--markdown", type=Path, default=None, metavar="OUT", help="write a markdown table")
    parser.add_argument("--plots", type=Path, default=None, metavar="DIR",
                        help="write PNG plots here (needs matplotlib: pip install 'relux[bench]')")
    parser.add_argument("--seed", type=int, default=0, help="seed of the victims and the attack (default 0)")
    parser.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                        help=f"wall-clock limit per case (default {DEFAULT_TIMEOUT:g}, cifar "
                             f"{DEFAULT_CIFAR_TIMEOUT:g}; 0: no limit, no worker)")
    parser.add_argument("--only", action="append", default=None, metavar="TEXT",
                        help="run only the rows whose name contains TEXT (repeatable)")
    parser.add_argument("--shared-models", type=Path, default=None, metavar="DIR",
                        help="directory of the shared victim files (default: ../shared/models beside the project)")
    parser.add_argument("--results-dir", type=Path, default=None, metavar="DIR",
                        help="cifar suite: where the per-victim result files go (default: benchmarks/results "
                             "under the project root; created if missing)")
    parser.add_argument("--cache", type=Path, default=None, metavar="DIR",
                        help="cifar suite: cache of built victims (default $RELUX_CACHE_DIR, else "
                             "$XDG_CACHE_HOME/relux or ~/.cache/relux)")
    parser.add_argument("--agreement-points", type=int, default=None, metavar="N",
                        help="cifar suite: fresh inputs per source for the argmax agreement (default 100000)")
    parser.add_argument("--strict", action="store_true",
                        help="exit 1 when a row failed, timed out or missed its targets")
    add_parallel_options(parser)
    parser.set_defaults(func=run)


def _code_root() -> Path:
    """The checkout the running relux comes from (its commit goes into the tables), whatever the
    current directory; the current directory when relux is installed outside a checkout."""
    import relux
    from relux.bench.suites import project_root

    root = project_root(Path(relux.__file__).resolve().parent)
    return root if root is not None else Path.cwd()


def _check_out(path: Path | None, flag: str) -> None:
    if path is None:
        return
    if path.is_dir():
        raise InputError(f"{flag} {path} is a directory; expected a file name")
    if not path.parent.exists():
        raise InputError(f"{flag} {path}: directory {path.parent} does not exist; create it first")


def _command(args: argparse.Namespace) -> str:
    parts = ["relux bench", f"--suite {args.suite}", f"--seed {args.seed}", f"--timeout {args.timeout:g}"]
    for text in args.only or []:
        parts.append(f"--only '{text}'")
    if args.suite == "cifar" and getattr(args, "agreement_points", None) is not None:
        parts.append(f"--agreement-points {args.agreement_points}")
    if getattr(args, "jobs", 1) != 1:
        parts.append(f"--jobs {args.jobs}")
    if getattr(args, "backend", "loky") != "loky":
        parts.append(f"--backend {args.backend}")
    if getattr(args, "address", None):
        parts.append(f"--address {args.address}")
    return " ".join(parts)


def run(args: argparse.Namespace) -> int:
    from relux.bench import report
    from relux.bench.runner import run_case
    from relux.bench.suites import shared_models_dir, suite

    if args.suite not in SUITE_NAMES + HIDDEN_SUITES:
        raise InputError(f"--suite {args.suite!r}: expected one of {', '.join(SUITE_NAMES)}")
    if args.seed < 0:
        raise InputError(f"--seed must be >= 0, found {args.seed}")
    if args.timeout is None:
        args.timeout = DEFAULT_CIFAR_TIMEOUT if args.suite == "cifar" else DEFAULT_TIMEOUT
    if not (math.isfinite(args.timeout) and args.timeout >= 0):
        raise InputError(f"--timeout must be a number of seconds >= 0 (0: no limit), found {args.timeout}")
    _check_out(args.json, "--json")
    _check_out(args.markdown, "--markdown")
    if args.plots is not None and args.plots.exists() and not args.plots.is_dir():
        raise InputError(f"--plots {args.plots} is a file; expected a directory")
    if args.shared_models is not None and not args.shared_models.is_dir():
        raise InputError(f"--shared-models {args.shared_models} is not a directory")
    parallel = parallel_options(args)
    cases = [c for c in suite(args.suite) if args.only is None or any(t in c.name for t in args.only)]
    if not cases:
        raise InputError(f"--only {args.only} matches no row of suite {args.suite!r}")
    shared = args.shared_models if args.shared_models is not None else shared_models_dir()
    cifar = _cifar_setup(args, parallel) if args.suite == "cifar" else None
    quiet = bool(getattr(args, "quiet", False))
    timeout = args.timeout if args.timeout > 0 else None
    worker_log = logging.getLogger("relux.bench.worker")

    def say(text: str) -> None:
        if not quiet:
            print(text, file=sys.stderr, flush=True)

    say(f"suite {args.suite}: {len(cases)} case(s), seed {args.seed}, "
        f"{'no time limit' if timeout is None else f'{timeout:g} s per case'}, "
        f"shared models {shared if shared is not None else 'not found'}")
    env = report.environment(_code_root())  # before the run: the commit the suite started on
    rows = []
    for i, case in enumerate(cases, start=1):
        say(f"[{i}/{len(cases)}] {case.name}")
        if cifar is not None:
            row = _run_cifar(case, args, timeout, cifar, say, worker_log)
        else:
            row = run_case(case, args.seed, timeout=timeout, shared_dir=shared,
                           on_log=lambda level, text: worker_log.log(level, "%s", text), parallel=parallel)
        row["suite"] = args.suite
        rows.append(row)
        q = f", {row['queries']} queries" if row.get("queries") else ""
        secs = row.get("wall_seconds")
        say(f"    {report.short_status(row)}{q}" + (f", {secs:.1f} s wall" if secs is not None else ""))

    print(report.format_table(rows))
    if args.json is not None:
        report.write_json(rows, args.json)
        print(f"wrote {args.json}")
    if args.markdown is not None:
        report.write_markdown(rows, args.markdown, title=f"relux bench --suite {args.suite}",
                              command=_command(args), env=env)
        print(f"wrote {args.markdown}")
    if args.plots is not None:
        if report.plots_available():
            for path in report.write_plots(rows, args.plots):
                print(f"wrote {path}")
        else:
            print("plots skipped: matplotlib is not installed (pip install 'relux[bench]')", file=sys.stderr)
    if args.strict:
        bad = [r for r in rows if report.short_status(r) not in ("ok", "skipped") or r.get("met") is False]
        return 1 if bad else 0
    return 0


def _cifar_setup(args: argparse.Namespace, parallel: dict[str, Any]) -> dict[str, Any]:
    """Check the cifar options; the results directory and the options of every cifar case (``parallel``:
    the attack's jobs, backend and Ray address)."""
    from relux.bench.cifar import AGREEMENT_POINTS, CifarOptions
    from relux.bench.suites import project_root

    points = AGREEMENT_POINTS if args.agreement_points is None else args.agreement_points
    if points < 1:
        raise InputError(f"--agreement-points must be >= 1, found {points}")
    if args.results_dir is not None:
        results = args.results_dir
    else:
        root = project_root(Path.cwd().resolve())
        results = (root if root is not None else Path.cwd()) / "benchmarks" / "results"
    if results.exists() and not results.is_dir():
        raise InputError(f"--results-dir {results} is a file; expected a directory")
    if args.cache is not None and args.cache.exists() and not args.cache.is_dir():
        raise InputError(f"--cache {args.cache} is a file; expected a directory")
    options = CifarOptions(cache_dir=None if args.cache is None else str(args.cache), agreement_points=points,
                           jobs=parallel["jobs"], backend=parallel["backend"], ray_address=parallel["ray_address"])
    return {"results": results, "options": options}


def _run_cifar(case: Any, args: argparse.Namespace, timeout: float | None, setup: dict[str, Any],
               say: Callable[[str], None], worker_log: logging.Logger) -> dict[str, Any]:
    """Run one cifar case and write its result file."""
    from relux.bench.cifar import run_cifar_case, run_environment, stamp, write_result

    env = run_environment(_code_root())
    record = run_cifar_case(case, args.seed, timeout=timeout, options=setup["options"],
                            on_log=lambda level, text: worker_log.log(level, "%s", text))
    record["command"] = _command(args)
    stamp(record, env)
    path = write_result(record, setup["results"])
    say(f"    wrote {path}")
    return record
