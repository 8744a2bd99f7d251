"""The real victim files in ../shared/models: every loader path, checked against INDEX.md.

Skipped when the directory is absent (the files are never copied into the repository).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from relux.formats import load_model, oracle_from_file, save_model
from relux.model import MLP, parse_arch

MODELS = Path(__file__).resolve().parents[2] / "shared" / "models"
INDEX = MODELS / "INDEX.md"
U = 2.0**-53

pytestmark = pytest.mark.skipif(not INDEX.is_file(), reason=f"shared models not found at {MODELS}")


def index_rows() -> list[tuple[str, tuple[int, ...]]]:
    """(relative path, architecture) for every table row of INDEX.md; '×' is written 'x' for parse_arch."""
    if not INDEX.is_file():
        return []
    rows = []
    for line in INDEX.read_text(encoding="utf-8").splitlines():
        m = re.match(r"^\|\s*([\w./-]+\.(?:keras|h5|onnx|npz|safetensors|pt))\s*\|\s*([^|]+?)\s*\|", line)
        if m:
            rows.append((m.group(1), parse_arch(m.group(2).replace("×", "x"))))
    return rows


ROWS = index_rows()


def fp_bound(model: MLP, X: np.ndarray) -> np.ndarray:
    """Rigorous bound on the difference of two float64 evaluations in any summation order (see
    tests/test_formats.py: gamma_n = n u / (1 - n u) per dot product, propagated through |W|, times 2)."""
    H, E = np.abs(X), np.zeros_like(X)
    for i, (W, b) in enumerate(model.layers):
        n = W.shape[1] + 1
        g, A = n * U / (1 - n * U), np.abs(W)
        E = E @ A.T + g * ((H + E) @ A.T + np.abs(b))
        H = H @ A.T + np.abs(b)
        if i < len(model.layers) - 1:
            H = np.maximum(H, 0)
    return 2 * E


def test_index_lists_every_file() -> None:
    on_disk = sorted(str(p.relative_to(MODELS)) for p in MODELS.rglob("*") if p.is_file() and p.name != "INDEX.md")
    assert sorted(r for r, _ in ROWS) == on_disk


@pytest.mark.parametrize(("rel", "arch"), ROWS, ids=[r for r, _ in ROWS])
def test_loads_with_documented_arch(rel: str, arch: tuple[int, ...]) -> None:
    model = load_model(MODELS / rel)
    assert model.arch == arch
    # INDEX.md: "random-cjm20-style files declare a 1-unit softmax output"; the others are linear
    # except the CIFAR classifiers, whose config declares softmax over 10 logits.
    expected = "softmax" if rel.startswith("random-cjm20-style/") or "cifar" in rel else "linear"
    assert model.output_activation == expected
    X = np.random.default_rng(0).uniform(-1, 1, size=(64, arch[0]))
    Y = model.forward(X)
    assert Y.shape == (64, arch[-1]) and np.all(np.isfinite(Y))
    assert all(W.flags.c_contiguous for W, _ in model.layers)


@pytest.mark.parametrize("rel", [r for r, _ in ROWS if r.startswith("unitary-cm24/")])
def test_unitary_construction_confirms_kernel_orientation(rel: str) -> None:
    """INDEX.md: unit-norm weight columns (Keras (in, out) kernels), i.e. unit-norm rows of relux's (out, in)
    W, and neurons on about half the time on U[-1, 1]. A missing transpose fails both checks."""
    model = load_model(MODELS / rel)
    W1, b1 = model.layers[0]
    assert np.allclose(np.linalg.norm(W1, axis=1), 1.0, rtol=0, atol=1e-12)  # stored as float64 unit vectors
    X = np.random.default_rng(1).uniform(-1, 1, size=(4000, model.input_dim))
    rate = (X @ W1.T + b1 > 0).mean(axis=0)
    # Binomial(4000, 1/2) has standard deviation 0.008; 0.1 is > 10 sigma.
    assert np.all(np.abs(rate - 0.5) < 0.1)


@pytest.mark.parametrize("ext", ["onnx", "safetensors"])
@pytest.mark.parametrize("rel", [r for r, _ in ROWS], ids=[r for r, _ in ROWS])
def test_convert_and_query(tmp_path: Path, rel: str, ext: str) -> None:
    model = load_model(MODELS / rel)
    out = tmp_path / f"m.{ext}"
    save_model(model, out)
    assert load_model(out) == model
    X = np.random.default_rng(2).uniform(-1, 1, size=(32, model.input_dim))
    got = oracle_from_file(out).query(X)
    # ONNX runs in onnxruntime (another summation order): within the rigorous float64 bound.
    assert np.all(np.abs(got - model.forward(X)) <= fp_bound(model, X))
