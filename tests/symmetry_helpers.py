"""Random ReLU networks and their symmetric copies, shared by test_align.py and test_verify.py."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from relux.model import MLP

EPS = float(np.finfo(np.float64).eps)  # 2^-52


def random_mlp(rng: np.random.Generator, arch: Sequence[int], bias_scale: float = 0.5) -> MLP:
    """Weights N(0, 1/fan_in), biases N(0, bias_scale^2)."""
    layers = [
        (rng.standard_normal((o, i)) / np.sqrt(i), bias_scale * rng.standard_normal(o))
        for i, o in zip(arch[:-1], arch[1:], strict=True)
    ]
    return MLP(layers)


def symmetric_copy(model: MLP, perms: Sequence[np.ndarray], scales: Sequence[np.ndarray]) -> MLP:
    """The same function with hidden layer i permuted and scaled.

    Candidate neuron k of hidden layer i is reference neuron ``perms[i][k]`` times ``scales[i][k] > 0``;
    the next layer's column k is divided by ``scales[i][k]``.
    """
    out = []
    src = np.arange(model.input_dim)
    inv = np.ones(model.input_dim)
    for i, (W, b) in enumerate(model.layers):
        W = W[:, src] / inv[None, :]
        if i < model.depth:
            p, s = np.asarray(perms[i]), np.asarray(scales[i], dtype=float)
            W, b = W[p] * s[:, None], b[p] * s
            src, inv = p, s
        out.append((W, b))
    return model.with_layers(out)


def random_symmetry(
    rng: np.random.Generator, widths: Sequence[int], powers_of_two: bool
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Random permutations and positive scales (exact powers of two, or log-uniform in [2^-10, 2^10])."""
    perms = [rng.permutation(w) for w in widths]
    if powers_of_two:
        scales = [np.ldexp(1.0, rng.integers(-10, 11, size=w)) for w in widths]
    else:
        scales = [np.exp2(rng.uniform(-10, 10, size=w)) for w in widths]
    return perms, scales


def replace_layer(model: MLP, index: int, W: np.ndarray, b: np.ndarray) -> MLP:
    layers = list(model.layers)
    layers[index] = (W, b)
    return model.with_layers(layers)
