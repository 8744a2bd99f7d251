"""Benchmark: extraction of deep ReLU networks (2 to 4 hidden layers; the issue-4 targets).

Runs the ``deep`` suite of relux.bench.suites, exactly as ``relux bench --suite deep`` does: every case
in its own process under a wall-clock limit. Rows:

  random 30-20-20-12-4, digits-trained 64-32-24-16-10, random expansive 20-40-40-1,
  digits-trained 64-40-40-40-40-10, random 40-20-10-10-1, and the shared files
  ../shared/models/random-cjm20-style/40_20x2_1_Carlini.keras (40-20-20-1),
  ../shared/models/trained-fmsh24/mnist784_15x2_1v2.keras (784-15-15-1),
  ../shared/models/unitary-cm24/unitary_100_200x3_10.keras (100-200-200-200-10), skipped when absent.

Usage (from the project root); every option of ``relux bench`` applies:

    .venv/bin/python benchmarks/deep_layers.py [--timeout 300] [--json deep.json] [--markdown deep.md]
                                               [--plots DIR] [--seed S] [--only TEXT] [--strict]
"""

from __future__ import annotations

import sys

from relux.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "--suite", "deep", *sys.argv[1:]]))
