"""``relux serve MODEL``: serve a model file as a black box over HTTP (KServe v2 and TF-Serving v1)."""

from __future__ import annotations

import argparse
import math
from typing import Any

from relux.errors import InputError


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="serve a model file as a black-box oracle over HTTP",
        description=(
            "Serve MODEL over HTTP with both the KServe v2 Open Inference Protocol "
            "(POST /v2/models/NAME/infer) and the TF-Serving REST protocol (POST /v1/models/NAME:predict). "
            "Answers are exact float64. Binds the loopback address unless --host says otherwise."
        ),
    )
    parser.add_argument("model", metavar="MODEL", help="model file to serve (any format relux reads)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    parser.add_argument(
        "--port", type=int, default=8000, help="TCP port; 0 picks a free one (default: %(default)s)"
    )
    parser.add_argument("--name", default="model", help="model name in the URLs (default: %(default)s)")
    parser.add_argument(
        "--token", default=None, help="require the header 'Authorization: Bearer TOKEN' on every request"
    )
    parser.add_argument(
        "--max-queries", type=int, default=None, metavar="N", help="answer at most N rows in total, then 429"
    )
    parser.add_argument(
        "--max-body-mb",
        type=float,
        default=64.0,
        metavar="MB",
        help="largest request body in MiB; bigger ones get 413 (default: %(default)g)",
    )
    parser.add_argument("--access-log", action="store_true", help="log every HTTP request")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if not 0 <= args.port <= 65535:
        raise InputError(f"--port must be in 0..65535, found {args.port}")
    if args.max_queries is not None and args.max_queries < 0:
        raise InputError(f"--max-queries must be >= 0, found {args.max_queries}")
    if not math.isfinite(args.max_body_mb) or args.max_body_mb <= 0:
        raise InputError(f"--max-body-mb must be a positive number, found {args.max_body_mb}")

    from relux.formats import oracle_from_file
    from relux.serve import create_app, run_server

    oracle = oracle_from_file(args.model)
    app = create_app(
        oracle,
        name=args.name,
        token=args.token,
        max_body_bytes=max(1, int(args.max_body_mb * 2**20)),
        max_queries=args.max_queries,
    )

    def announce(url: str) -> None:
        budget = f", at most {args.max_queries} rows" if args.max_queries is not None else ""
        auth = ", bearer token required" if args.token else ""
        sizes = f"{oracle.input_dim} inputs -> {oracle.output_dim} outputs"
        print(f"relux: serving {args.model} ({sizes}{budget}{auth})")
        print(f"  KServe v2:   {url}/v2/models/{args.name}    (POST .../infer)")
        print(f"  TF-Serving:  {url}/v1/models/{args.name}    (POST ...:predict)")
        print("  press Ctrl-C to stop", flush=True)

    try:
        run_server(app, host=args.host, port=args.port, announce=announce, access_log=args.access_log)
    except KeyboardInterrupt:  # uvicorn has already shut down gracefully on Ctrl-C
        pass
    print(f"relux: server stopped after answering {app.state.stats.rows_served} rows")
    return 0
