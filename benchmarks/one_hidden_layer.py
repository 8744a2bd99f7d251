"""Benchmark: extraction of one-hidden-layer ReLU networks (the issue-3 targets).

Rows:
  unitary 784-128-1   CM24's published "unitary balanced" victim (../shared/models; skipped if absent)
  trained 64-48-10    a digits classifier trained by relux.zoo
  random 40-24-3      a CJM20-style random network
  random 20-40-1      an expansive random network (more neurons than inputs)

Each victim is attacked through its oracle only; its true weights are used afterwards by relux.verify.
Usage (from the project root):

    .venv/bin/python benchmarks/one_hidden_layer.py [--json results.json] [--seed S] [--repeat N] [--only NAME]

Exit status 0 when every row that ran meets its targets, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from relux.attack import ExtractionConfig, ExtractionResult, extract
from relux.errors import ExtractionFailed, ReluxError
from relux.model import MLP, format_arch
from relux.oracle import MLPOracle, Oracle
from relux.verify import verify

ROOT = Path(__file__).resolve().parents[1]
UNITARY = ROOT.parent / "shared" / "models" / "unitary-cm24" / "unitary_784_128_1.keras"

#: Accuracy targets, the same for every row.
MAX_WEIGHT_ERROR = 2.0**-30
MAX_OUTPUT_ERROR = 1e-9


@dataclass(frozen=True)
class Case:
    """One benchmark row: how to build the victim (reference model + its oracle) and its cost targets."""

    name: str
    build: Callable[[int], tuple[MLP, Oracle] | None]  # victim seed -> (reference, oracle), None to skip
    max_log2_queries: float
    max_seconds: float | None = None
    skip_reason: str = ""


def _unitary(_seed: int) -> tuple[MLP, Oracle] | None:
    if not UNITARY.is_file():
        return None
    from relux.formats import load_model, oracle_from_file

    return load_model(UNITARY), oracle_from_file(UNITARY)


def _trained_digits(seed: int) -> tuple[MLP, Oracle]:
    from relux.zoo import trained_mlp

    model, report = trained_mlp((64, 48, 10), "digits", np.random.default_rng(seed))
    print(f"  trained 64-48-10 on digits: {report!r}", file=sys.stderr)
    return model, MLPOracle(model)


def _random(arch: tuple[int, ...]) -> Callable[[int], tuple[MLP, Oracle]]:
    def build(seed: int) -> tuple[MLP, Oracle]:
        from relux.zoo import random_mlp

        model = random_mlp(arch, np.random.default_rng(seed))
        return model, MLPOracle(model)

    return build


CASES = (
    Case("unitary 784-128-1", _unitary, 19.0, 60.0, skip_reason=f"{UNITARY} not found"),
    Case("trained 64-48-10", _trained_digits, 16.0),
    Case("random 40-24-3", _random((40, 24, 3)), 15.0),
    Case("random 20-40-1", _random((20, 40, 1)), 15.0),
)


def run_case(case: Case, victim_seed: int, attack_seed: int) -> dict[str, Any]:
    built = case.build(victim_seed)
    if built is None:
        return {"name": case.name, "skipped": case.skip_reason}
    reference, oracle = built
    row: dict[str, Any] = {
        "name": case.name,
        "arch": format_arch(reference.arch),
        "victim_seed": victim_seed,
        "attack_seed": attack_seed,
        "target_log2_queries": case.max_log2_queries,
        "target_seconds": case.max_seconds,
    }
    t0 = time.perf_counter()
    result: ExtractionResult | None
    try:
        result = extract(oracle, reference.arch, ExtractionConfig(seed=attack_seed))
        row["error"] = None
    except ExtractionFailed as exc:
        result = exc.partial if isinstance(exc.partial, ExtractionResult) else None
        row["error"] = " ".join(str(exc).split())
    except ReluxError as exc:
        result = None
        row["error"] = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
    if result is None:
        row.update(seconds=time.perf_counter() - t0, met=False)
        return row
    report = verify(reference, result.model, rng=np.random.default_rng(0))
    row.update(
        queries=result.queries,
        log2_queries=math.log2(result.queries),
        seconds=result.seconds,
        log2_weight_error=report.log2_max_norm_weight_error,
        max_rel_output_error=report.max_rel_output_error,
        sign_errors=report.sign_errors,
        unmatched=report.unmatched,
        selfcheck=result.selfcheck.passed,
        selfcheck_rel_error=result.selfcheck.max_rel_error,
        stages=[s.to_json() for s in result.stages],
        warnings=list(result.warnings),
    )
    misses = []
    if not report.max_norm_weight_error <= MAX_WEIGHT_ERROR:
        misses.append(f"weight error 2^{report.log2_max_norm_weight_error:.1f} > 2^-30")
    if not report.max_rel_output_error <= MAX_OUTPUT_ERROR:
        misses.append(f"output error {report.max_rel_output_error:.2g} > 1e-9")
    if report.sign_errors or report.unmatched:
        misses.append(f"{report.sign_errors} sign errors, {report.unmatched} unmatched neurons")
    if row["log2_queries"] > case.max_log2_queries:
        misses.append(f"queries 2^{row['log2_queries']:.2f} > 2^{case.max_log2_queries:g}")
    if case.max_seconds is not None and result.seconds > case.max_seconds:
        misses.append(f"{result.seconds:.1f} s > {case.max_seconds:g} s")
    if not result.selfcheck.passed:
        misses.append("self-check failed")
    row["misses"] = misses
    row["met"] = not misses
    return row


def format_table(rows: list[dict[str, Any]]) -> str:
    head = ["victim", "seed", "queries", "log2 q", "target", "seconds", "log2 w err", "max rel out err", "sign err",
            "selfcheck", "met"]
    table = [head]
    for r in rows:
        if "skipped" in r:
            table.append([r["name"], "-", "skipped: " + r["skipped"]] + [""] * (len(head) - 3))
            continue
        if "queries" not in r:
            table.append([r["name"], str(r["victim_seed"]), "error: " + str(r["error"])] + [""] * (len(head) - 3))
            continue
        table.append(
            [
                r["name"],
                f"{r['victim_seed']}/{r['attack_seed']}",
                str(r["queries"]),
                f"{r['log2_queries']:.2f}",
                f"2^{r['target_log2_queries']:g}" + (f", {r['target_seconds']:g} s" if r["target_seconds"] else ""),
                f"{r['seconds']:.2f}",
                f"{r['log2_weight_error']:.1f}",
                f"{r['max_rel_output_error']:.2g}",
                str(r["sign_errors"]),
                "passed" if r["selfcheck"] else "FAILED",
                "yes" if r["met"] else "NO",
            ]
        )
    widths = [max(len(row[c]) for row in table) for c in range(len(head))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    for r in rows:
        for miss in r.get("misses", []):
            lines.append(f"missed: {r['name']} (seed {r['victim_seed']}): {miss}")
        if r.get("error") and "queries" in r:
            lines.append(f"error: {r['name']} (seed {r['victim_seed']}): {r['error']}")
    return "\n".join(lines)


def _environment() -> dict[str, Any]:
    try:
        commit = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, check=False
        ).stdout.strip()
    except OSError:
        commit = ""
    return {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "machine": platform.machine(),
        "processor": platform.processor(),
        "system": platform.platform(),
        "commit": commit or None,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="write the results as JSON here")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first victim and attack (default 0)")
    parser.add_argument("--repeat", type=int, default=1, metavar="N", help="run every row with N seeds (default 1)")
    parser.add_argument("--only", action="append", default=None, metavar="NAME",
                        help="run only rows whose name contains NAME (repeatable)")
    args = parser.parse_args(argv)
    if args.repeat < 1 or args.seed < 0:
        parser.error("--repeat must be >= 1 and --seed >= 0")
    cases = [c for c in CASES if args.only is None or any(s in c.name for s in args.only)]
    rows = []
    for case in cases:
        for i in range(args.repeat):
            seed = args.seed + i
            print(f"running {case.name} (seed {seed})", file=sys.stderr, flush=True)
            rows.append(run_case(case, victim_seed=seed, attack_seed=seed))
    print(format_table(rows))
    ran = [r for r in rows if "skipped" not in r]
    if args.repeat > 1:
        for case in cases:
            mine = [r for r in ran if r["name"] == case.name]
            if mine:
                print(f"{case.name}: targets met in {sum(r['met'] for r in mine)}/{len(mine)} runs")
    if args.json is not None:
        payload = {
            "benchmark": "one_hidden_layer",
            "targets": {"max_weight_error": MAX_WEIGHT_ERROR, "max_rel_output_error": MAX_OUTPUT_ERROR},
            "environment": _environment(),
            "rows": rows,
        }
        args.json.write_text(json.dumps(payload, indent=2, allow_nan=False) + "\n")
        print(f"wrote {args.json}")
    return 0 if all(r["met"] for r in ran) else 1


if __name__ == "__main__":
    sys.exit(main())
