"""Benchmark: deep extraction over many random victims (how often it works, and whether it is honest).

For each ``ARCH:SEEDS`` argument, every victim ``relux.zoo.random_mlp(ARCH, numpy.random.default_rng(v))``
(v in SEEDS) is extracted with ``ExtractionConfig(seed=S)`` through its oracle only, then compared with
its true weights by ``relux.verify`` (20,000 Gaussian and 20,000 uniform inputs and 50 lines, a stream
the attack never draws). Each run is one of:

- ``ok``: the self-check passed and ``verify`` agrees (relative output error at most 1e-8);
- ``failed``: the self-check failed (relux exits 1 and reports how far it got): honest;
- ``WRONG``: the self-check passed but ``verify`` finds a relative output error above 1e-8;
- ``CRASH``: ``extract`` raised anything other than :class:`~relux.errors.ExtractionFailed`.

Unmatched neurons are listed too: a run can be ``ok`` with some (a neuron never on, or weights that
no input can tell apart). Usage, from the project root:

    .venv/bin/python benchmarks/seed_sweep.py 30-20-20-12-4:1-10 20-10-10-10-2:1-5 30-15-15-15-1:1-6 \\
        10-10-10-10-1:1-3 40-20-10-10-1:1-3 20-40-40-1:1-2 [--seed S] [--json sweep.json]

Exit status 1 when any run is ``WRONG`` or ``CRASH``, else 0.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from typing import Any

import numpy as np

import relux
from relux.attack.config import ExtractionConfig
from relux.errors import ExtractionFailed
from relux.verify import verify
from relux.zoo import random_mlp


def _seeds(text: str) -> list[int]:
    out: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out += list(range(int(lo), int(hi or lo) + 1))
    return out


def run(arch: str, victim_seed: int, attack_seed: int) -> dict[str, Any]:
    model = random_mlp(arch, np.random.default_rng(victim_seed))
    t0 = time.perf_counter()
    try:
        res = relux.extract(relux.MLPOracle(model), arch, ExtractionConfig(seed=attack_seed))
        passed = True
    except ExtractionFailed as exc:
        res, passed = exc.partial, False
    except Exception as exc:  # a benchmark records a crash as a result
        return {"arch": arch, "victim_seed": victim_seed, "attack_seed": attack_seed, "queries": 0,
                "seconds": round(time.perf_counter() - t0, 2), "selfcheck_passed": False, "status": "CRASH",
                "error": f"{type(exc).__name__}: {exc}"}
    seconds = time.perf_counter() - t0
    row: dict[str, Any] = {"arch": arch, "victim_seed": victim_seed, "attack_seed": attack_seed,
                           "queries": int(res.queries), "seconds": round(seconds, 2), "selfcheck_passed": passed}
    model_out = getattr(res, "model", None)
    if model_out is not None:
        rep = verify(model, model_out, rng=np.random.default_rng(1), n_random=20000, n_lines=50)
        row.update(log2_weight_error=rep.log2_max_norm_weight_error, max_rel_output_error=rep.max_rel_output_error,
                   sign_errors=rep.sign_errors, unmatched=rep.unmatched)
    wrong = passed and not (row.get("max_rel_output_error", math.inf) <= 1e-8)
    row["status"] = "WRONG" if wrong else ("ok" if passed else "failed")
    return row


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("cases", nargs="+", help="ARCH:SEEDS, e.g. 30-20-20-12-4:1-10 or 20-10-10-10-2:1,3")
    ap.add_argument("--seed", type=int, default=0, help="attack seed (default 0)")
    ap.add_argument("--json", help="write every row to this file")
    args = ap.parse_args(argv)
    rows = []
    for case in args.cases:
        arch, _, seeds = case.partition(":")
        for v in _seeds(seeds or "0"):
            row = run(arch, v, args.seed)
            rows.append(row)
            err = row.get("max_rel_output_error")
            print(f"{arch:<16} victim {v:<3} {row['status']:<7} {row['queries']:>9} queries "
                  f"(2^{math.log2(max(row['queries'], 1)):.2f}) {row['seconds']:>7.1f} s  "
                  f"w 2^{row.get('log2_weight_error', float('nan')):.1f}  out {err if err is None else f'{err:.1e}'}  "
                  f"unmatched {row.get('unmatched')}{'  ' + row['error'] if 'error' in row else ''}", flush=True)
    counts = {s: sum(r["status"] == s for r in rows) for s in ("ok", "failed", "WRONG", "CRASH")}
    print(f"{len(rows)} runs: {counts['ok']} ok, {counts['failed']} failed (self-check), {counts['WRONG']} WRONG, "
          f"{counts['CRASH']} CRASH")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"rows": rows, "counts": counts, "attack_seed": args.seed}, fh, indent=1)
    return 1 if counts["WRONG"] or counts["CRASH"] else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
