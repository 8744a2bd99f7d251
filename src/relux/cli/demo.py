"""``relux demo``: a real end-to-end run, no files needed.

Builds a small random victim, serves it over HTTP (KServe v2) on a free loopback port in a background
thread, extracts it through the HTTP client as any remote attacker would, then verifies the result
against the victim's true weights.
"""

from __future__ import annotations

import argparse
from typing import Any

from relux.errors import InputError
from relux.model import format_arch, parse_arch

DESCRIPTION = """\
End-to-end demonstration of relux, in a few seconds and without files:

  1. build a random one-hidden-layer victim (default 32-16-3, seed 0) with relux.zoo;
  2. serve it with the KServe v2 protocol on 127.0.0.1 (a free port, in a background thread);
  3. extract it through the HTTP client: the attack sees only the endpoint and the architecture;
  4. verify the extracted weights against the victim's and print both tables.

Exit status 0 when the extracted network matches (weight error <= 2^-30, output error <= 1e-9, no sign
errors), 1 otherwise.
"""

#: Success criteria of the demo (the project's targets for one hidden layer).
MAX_WEIGHT_ERROR = 2.0**-30
MAX_OUTPUT_ERROR = 1e-9


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="extract a small random victim served over HTTP, then verify it (no arguments needed)",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--arch", default="32-16-3", help="victim architecture (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the victim and of the attack (default 0)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from relux.attack import ExtractionConfig, extract
    from relux.cli.extract import format_summary
    from relux.oracle.http import KServeV2Oracle
    from relux.progress import QueryProgress, progress_logging
    from relux.serve import background_server, create_app
    from relux.verify import verify
    from relux.zoo import random_mlp

    arch = parse_arch(args.arch)
    if len(arch) < 3:
        raise InputError(f"the demo victim needs at least one hidden layer (e.g. 32-16-3), found {args.arch!r}")
    if args.seed < 0:
        raise InputError(f"--seed must be >= 0, found {args.seed}")
    quiet = bool(getattr(args, "quiet", False))
    victim = random_mlp(arch, np.random.default_rng(args.seed))
    print(f"relux demo: random {format_arch(arch)} victim ({victim.n_params} parameters, seed {args.seed})")

    app = create_app(victim, name="victim")
    with background_server(app, host="127.0.0.1", port=0) as base:
        url = f"{base}/v2/models/victim"
        print(f"serving it over KServe v2 at {url}")
        with (
            KServeV2Oracle(url) as remote,
            QueryProgress(remote, desc="extract", disable=True if quiet else None) as oracle,
            progress_logging(not quiet),
        ):
            # The attack gets the endpoint and the architecture; nothing else about the victim.
            result = extract(oracle, arch, ExtractionConfig(seed=args.seed))
        served = app.state.stats.rows_served

    print("\nextraction")
    print(format_summary(result))
    print(f"\nthe server answered {served} rows (attack count {result.queries})")
    report = verify(victim, result.model, rng=np.random.default_rng(args.seed))
    print("\nverification against the victim's true weights")
    print(report.to_table())
    ok = (
        report.complete
        and report.sign_errors == 0
        and report.max_norm_weight_error <= MAX_WEIGHT_ERROR
        and report.max_rel_output_error <= MAX_OUTPUT_ERROR
    )
    print(
        f"\n{'OK' if ok else 'MISMATCH'}: {result.queries} queries, weight error "
        f"2^{report.log2_max_norm_weight_error:.1f} (target <= 2^-30), output error "
        f"{report.max_rel_output_error:.2g} (target <= 1e-9), {report.sign_errors} sign errors"
    )
    return 0 if ok else 1
