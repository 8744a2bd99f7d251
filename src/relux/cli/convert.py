"""``relux convert IN OUT``: convert a model file between formats (chosen by extension)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from relux.errors import InputError
from relux.formats import FORMATS, WRITABLE, check_writable, load_model, model_format, save_model
from relux.model import format_arch


def register(subparsers: Any) -> None:
    readable = ", ".join(FORMATS)
    writable = ", ".join(e for e, f in FORMATS.items() if f in WRITABLE)
    parser = subparsers.add_parser(
        "convert",
        help="convert a model file between formats",
        description=(
            f"Convert a ReLU network file between formats, chosen by extension. Reads {readable}; "
            f"writes {writable}. Example: relux convert model.keras model.onnx"
        ),
    )
    parser.add_argument("input", metavar="IN", help="model file to read")
    parser.add_argument("output", metavar="OUT", help="file to write (its extension picks the format)")
    parser.add_argument("-f", "--force", action="store_true", help="overwrite OUT if it exists")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    src, dst = Path(args.input), Path(args.output)
    fmt = check_writable(dst)  # fail before reading anything
    if dst.exists() and not args.force:
        raise InputError(f"'{dst}' already exists; pass --force to overwrite it")
    model = load_model(src)
    save_model(model, dst)
    print(
        f"wrote {dst} ({fmt}) from {src} ({model_format(src)}): MLP {format_arch(model.arch)}, "
        f"{model.n_params} params, output {model.output_activation}"
    )
    return 0
