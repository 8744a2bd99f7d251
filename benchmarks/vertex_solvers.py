"""Time the chords' vertex linear programs: the dense primal simplex (relux.attack.simplex) against HiGHS.

The region is the one the pattern regions of a deep layer use: behind the first K known layers of a
victim (its true weights, in the first layer's frame), the cell of a random point where the first
layers are all on (relux.attack.pattern_layer.random_pattern). The objectives are those of the
*across* chords (a neuron of layer K, tilted at random; relux.attack.active_lines), whose optimum is
a single vertex, so both solvers must return the same point.

    .venv/bin/python benchmarks/vertex_solvers.py                      # CIFAR unitary, layers 1-4
    .venv/bin/python benchmarks/vertex_solvers.py --model m.npz --layers 3 --objectives 40 --json out.json

Without --model the victim is `relux zoo 3072-256x8-10 --init unitary --seed 0`, built in memory.
Timings are wall seconds on one BLAS thread; run on an idle machine for clean figures.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from relux.attack.active_lines import pattern_region  # noqa: E402
from relux.attack.config import ExtractionConfig  # noqa: E402
from relux.attack.frame import input_frame  # noqa: E402
from relux.attack.pattern_layer import random_pattern  # noqa: E402
from relux.attack.simplex import dense_vertex  # noqa: E402
from relux.formats import load_model  # noqa: E402
from relux.zoo import build  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="victim file (default: the CIFAR-scale unitary zoo victim, seed 0)")
    ap.add_argument("--layers", type=int, default=4, help="known layers before the region (default 4)")
    ap.add_argument("--objectives", type=int, default=20, help="vertex problems timed (default 20)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write the numbers here")
    args = ap.parse_args(argv)
    from scipy.optimize import linprog

    model = load_model(args.model) if args.model else build("3072-256x8-10", "unitary", 0)[0]
    layers = [(np.asarray(W, dtype=float), np.asarray(b, dtype=float)) for W, b in model.layers[:-1]]
    if not 1 <= args.layers <= len(layers):
        print(f"--layers must be between 1 and {len(layers)}, found {args.layers}", file=sys.stderr)
        return 2
    # as the attack sees them: in the first layer's frame, with the frame's input scale
    frame = input_frame(layers[:1], layers[0][0].shape[0])
    known = frame.down(layers[:args.layers]) if frame is not None else layers[:args.layers]
    d0 = layers[0][0].shape[1]
    d = known[0][0].shape[1]
    cfg = ExtractionConfig()
    box = 3.0 * (frame.config(cfg, d0) if frame is not None else cfg).input_scale
    rng = np.random.default_rng(args.seed)
    pat = random_pattern(known, box, rng)
    region = None if pat is None else pattern_region(known, box, pat.on, pat.before)
    if region is None:
        print("no region behind those layers", file=sys.stderr)
        return 1
    A, c, margin = region.A, region.c, region.margin
    last = A[-known[-1][0].shape[0]:]
    last = last / np.linalg.norm(last, axis=1, keepdims=True)
    t_dense = t_highs = 0.0
    pivots: list[int] = []
    worst = 0.0
    failed = 0
    for i in range(args.objectives):
        g = last[rng.integers(last.shape[0])] + 0.25 * rng.standard_normal(d) / np.sqrt(d)
        g = g if i % 2 == 0 else -g
        t = time.perf_counter()
        x, info = dense_vertex(A, c, margin, box, g, region.centre)
        t_dense += time.perf_counter() - t
        t = time.perf_counter()
        res = linprog(-g, A_ub=-A, b_ub=c - margin, bounds=[(-box, box)] * d, method="highs")
        highs = time.perf_counter() - t
        t_highs += highs
        if x is None:  # relux.attack.active_lines.vertex then solves it with HiGHS as well
            failed += 1
            t_dense += highs
            continue
        pivots.append(info.pivots)
        worst = max(worst, float(np.linalg.norm(x - res.x)) / float(np.linalg.norm(res.x - region.centre)))
    out = {"victim": args.model or "zoo 3072-256x8-10 unitary seed 0", "layers": args.layers, "dim": d,
           "rows": int(A.shape[0]), "objectives": args.objectives, "dense_seconds": t_dense,
           "highs_seconds": t_highs, "speedup": t_highs / t_dense if t_dense else None,
           "dense_failed": failed, "median_pivots": float(np.median(pivots)) if pivots else None,
           "max_rel_distance_to_highs": worst}
    print(f"region behind {args.layers} layers: {d} dims, {A.shape[0]} rows + {2 * d} box sides")
    print(f"dense simplex {t_dense / args.objectives:.3f} s per vertex (median {out['median_pivots']} pivots after "
          f"a {d}-step crash, {failed} left to HiGHS); HiGHS {t_highs / args.objectives:.3f} s; "
          f"x{out['speedup']:.2f}; largest distance from HiGHS's vertex {worst:.1e} of its distance from the centre")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
