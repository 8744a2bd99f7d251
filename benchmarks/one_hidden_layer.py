"""Benchmark: extraction of one-hidden-layer ReLU networks (the issue-3 targets).

Rows (the ``one-layer`` suite of relux.bench.suites, also ``relux bench --suite one-layer``):
  unitary 784-128-1   CM24's published "unitary balanced" victim (../shared/models; skipped if absent)
  trained 64-48-10    a digits classifier trained by relux.zoo
  random 40-24-3      a CJM20-style random network
  random 20-40-1      an expansive random network (more neurons than inputs)

Each victim is attacked through its oracle only; its true weights are used afterwards by relux.verify.
Usage (from the project root):

    .venv/bin/python benchmarks/one_hidden_layer.py [--json results.json] [--seed S] [--repeat N] [--only NAME]
                                                    [--timeout SECONDS]

Exit status 0 when every row that ran meets its targets, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from relux.bench import environment, format_table, run_case, suite
from relux.bench.suites import MAX_OUTPUT_ERROR, MAX_WEIGHT_ERROR

ROOT = Path(__file__).resolve().parents[1]
SUITE = "one-layer"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="write the results as JSON here")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first victim and attack (default 0)")
    parser.add_argument("--repeat", type=int, default=1, metavar="N", help="run every row with N seeds (default 1)")
    parser.add_argument("--only", action="append", default=None, metavar="NAME",
                        help="run only rows whose name contains NAME (repeatable)")
    parser.add_argument("--timeout", type=float, default=0.0, metavar="SECONDS",
                        help="wall-clock limit per run, in a worker process (default 0: no limit, in this process)")
    args = parser.parse_args(argv)
    if args.repeat < 1 or args.seed < 0 or args.timeout < 0:
        parser.error("--repeat must be >= 1, --seed >= 0 and --timeout >= 0")
    cases = [c for c in suite(SUITE) if args.only is None or any(s in c.name for s in args.only)]
    rows: list[dict[str, Any]] = []
    for case in cases:
        for i in range(args.repeat):
            seed = args.seed + i
            print(f"running {case.name} (seed {seed})", file=sys.stderr, flush=True)
            rows.append(run_case(case, seed, timeout=args.timeout or None))
    print(format_table(rows))
    ran = [r for r in rows if not str(r["status"]).startswith("skipped")]
    if args.repeat > 1:
        for case in cases:
            mine = [r for r in ran if r["model"] == case.name]
            if mine:
                print(f"{case.name}: targets met in {sum(bool(r.get('met')) for r in mine)}/{len(mine)} runs")
    if args.json is not None:
        payload = {
            "benchmark": "one_hidden_layer",
            "targets": {"max_weight_error": MAX_WEIGHT_ERROR, "max_rel_output_error": MAX_OUTPUT_ERROR},
            "environment": environment(ROOT),
            "rows": rows,
        }
        args.json.write_text(json.dumps(payload, indent=2, allow_nan=False) + "\n")
        print(f"wrote {args.json}")
    return 0 if all(r.get("met") for r in ran) else 1


if __name__ == "__main__":
    sys.exit(main())
