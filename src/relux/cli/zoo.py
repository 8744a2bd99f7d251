"""``relux zoo``: build a victim network (random, unitary balanced or trained) and write it to a file."""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

from relux.data import DATASETS
from relux.errors import InputError
from relux.model import parse_arch
from relux.zoo import INITS, build, check_dataset_input, dataset_for_input, default_train_config

DESCRIPTION = """\
Build a victim ReLU network and save it.

  random    CJM20-style Gaussian weights N(0, 2/fan_in), biases N(0, 0.1^2)
  unitary   CM24 "unitary balanced": unit-norm neurons, each on half the time on U[-1,1]^d
  trained   trained with Adam on a dataset shipped inside an installed package:
            digits (64 features), mnist (784), mnist32 (MNIST resized to 32x32x3 = 3072)
            k >= 2 outputs train a softmax classifier, k = 1 a regression of the digit

The same ARCH, --init, --seed (and --data, --epochs) give the same weights on the same machine.
"""


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "zoo",
        help="build a random, unitary or trained victim network",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("arch", metavar="ARCH", help="layer widths, e.g. 784-128-10 or 3072-256x8-10")
    parser.add_argument("--init", choices=INITS, required=True, help="how to choose the weights")
    parser.add_argument(
        "--data",
        choices=DATASETS,
        default=None,
        help="training data for --init trained (default: chosen from the input width)",
    )
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (default per dataset)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--out", type=Path, required=True, help="model file to write (format from suffix)")
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    parser.set_defaults(func=run)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def run(args: argparse.Namespace) -> int:
    from relux.formats import save_model  # lazy: keeps `relux --help` light

    out: Path = args.out
    if out.is_dir():
        raise InputError(f"--out {out} is a directory; expected a file name such as model.npz")
    if not out.parent.exists():
        raise InputError(f"--out {out}: directory {out.parent} does not exist; create it first")
    if args.epochs is not None and args.epochs < 1:
        raise InputError(f"--epochs must be >= 1, found {args.epochs}")
    quiet = bool(getattr(args, "quiet", False))

    progress = None
    on_epoch = None
    if args.init == "trained":
        from tqdm import tqdm

        sizes = parse_arch(args.arch)
        name = args.data if args.data is not None else dataset_for_input(sizes[0])
        check_dataset_input(name, sizes[0])
        total = args.epochs if args.epochs is not None else default_train_config(name).epochs
        progress = tqdm(total=total, desc=f"training on {name}", unit="epoch", file=sys.stderr, disable=quiet)

        def on_epoch(epoch: int, loss: float) -> None:
            assert progress is not None
            progress.set_postfix(loss=f"{loss:.4f}", refresh=False)
            progress.update(1)

    try:
        model, info = build(args.arch, args.init, args.seed, args.data, epochs=args.epochs, on_epoch=on_epoch)
    finally:
        if progress is not None:
            progress.close()

    save_model(model, out)
    info["out"] = str(out)
    info["sha256"] = _sha256(out)

    if args.json:
        print(json.dumps(info))
        return 0
    print(f"arch    {info['arch']}")
    print(f"params  {info['params']}")
    print(f"init    {info['init']} (seed {info['seed']})")
    training = info.get("training")
    if training is not None:
        print(
            f"data    {info['data']}: {training['n_train']} train / {training['n_test']} test, "
            f"{training['epochs']} epochs in {training['seconds']:.1f} s"
        )
        if training["task"] == "classification":
            print(f"train accuracy  {training['train_accuracy']:.4f}")
            print(f"test accuracy   {training['test_accuracy']:.4f}")
        else:
            print(f"train MSE       {training['train_mse']:.4f}")
            print(f"test MSE        {training['test_mse']:.4f}")
    print(f"wrote   {out}")
    print(f"sha256  {info['sha256']}")
    return 0
