"""``relux verify``: compare an extracted network with a reference (weights after alignment, outputs).

It reports and does not judge: the exit status is 0 whatever the errors are, 2 for bad input.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from relux.cli.common import nonneg_int
from relux.errors import InputError

DESCRIPTION = """\
Compare an extracted network with the reference it was extracted from. The extracted network is
aligned to the reference layer by layer (a permutation and a positive scale per hidden neuron, the
symmetries of ReLU networks), then the report gives the normalised weight error per layer
(max|d(w,b)| / ||w_ref|| for hidden rows, max|dW,db| / max|W_ref| for the output layer, also as log2),
neurons recovered with the wrong sign, unmatched neurons (e.g. dead ones), and the output error
max|f - f'| / max|f| on N(0,I) inputs, U[0,1]^d inputs and points along random lines across many kinks,
with argmax agreement (sign agreement for one output). Exit status 0 whatever the errors, 2 for bad input.
"""


def _threshold(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, found {text!r}") from None
    if not value > 0.0:
        raise argparse.ArgumentTypeError(f"expected a positive number, found {text!r}")
    return value


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "verify",
        help="compare an extracted network with a reference (weight and output errors)",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--reference", required=True, metavar="FILE", help="the reference (true) network")
    parser.add_argument("--extracted", required=True, metavar="FILE", help="the extracted network")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default 0)")
    parser.add_argument(
        "--samples",
        type=nonneg_int,
        default=10000,
        metavar="N",
        help="random inputs from each of N(0,I) and U[0,1]^d (default 10000)",
    )
    parser.add_argument(
        "--lines", type=nonneg_int, default=64, metavar="L", help="random lines across kinks (default 64)"
    )
    parser.add_argument(
        "--match-threshold",
        type=_threshold,
        default=None,
        metavar="T",
        help="largest normalised distance at which two neurons still match (default 1e-2)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from relux.formats import load_model
    from relux.verify import VerifyConfig, verify

    if args.seed < 0:
        raise InputError(f"--seed must be an integer >= 0, found {args.seed}")

    models = []
    for flag, path in (("--reference", args.reference), ("--extracted", args.extracted)):
        if not Path(path).is_file():
            raise InputError(f"{flag}: expected a model file, found no file at {path!r}")
        models.append(load_model(path))
    config = VerifyConfig() if args.match_threshold is None else VerifyConfig(match_threshold=args.match_threshold)
    report = verify(
        models[0],
        models[1],
        rng=np.random.default_rng(args.seed),
        n_random=args.samples,
        n_lines=args.lines,
        config=config,
    )
    if args.json:
        out = report.to_json()
        out["reference_file"] = str(args.reference)
        out["extracted_file"] = str(args.extracted)
        out["seed"] = args.seed
        print(json.dumps(out, allow_nan=False))
    else:
        print(report.to_table())
    return 0
