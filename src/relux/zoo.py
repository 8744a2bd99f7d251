"""Victim networks to attack: random, "unitary balanced" and trained ReLU MLPs.

- :func:`random_mlp`: CJM20-style Gaussian networks. CJM20 draw standard normal weights scaled by
  ``1/sqrt(fan_out)`` and zero biases, then nudge them with a few Adam steps on random data. We draw
  He-scaled weights ``N(0, 2/fan_in)``, which keep every layer's pre-activations at the scale of its
  input (so deep nets do not blow up or vanish), and small Gaussian biases ``N(0, bias_std^2)`` so that
  no neuron's hyperplane passes exactly through the origin. With zero-mean weights and small biases
  almost every neuron is active on a sizeable fraction of ``N(0, I)`` or ``U[-1, 1]^d`` inputs.
- :func:`unitary_mlp`: CM24's "unitary balanced" networks: each neuron's weight vector is uniform on the
  unit sphere and its bias is minus the median of its pre-activation over ``U[-1, 1]^d0`` samples pushed
  through the layers built so far, so each neuron is on about half the time.
- :func:`trained_mlp`: trained on a packaged dataset (:mod:`relux.data`) by :mod:`relux.train`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from relux.data import DATASETS, Dataset, load_dataset
from relux.errors import InputError
from relux.model import MLP, format_arch, parse_arch
from relux.train import EpochCallback, TrainConfig, TrainReport, he_init, train_mlp

FloatArray = NDArray[np.float64]

#: Initialisations :func:`build` accepts.
INITS = ("random", "unitary", "trained")


def as_arch(arch: str | Sequence[int]) -> tuple[int, ...]:
    """An architecture from ``'784-128-10'`` or a sequence of positive widths."""
    if isinstance(arch, str):
        return parse_arch(arch)
    try:
        sizes = tuple(int(s) for s in arch)
    except (TypeError, ValueError):
        raise InputError(f"expected an architecture such as (784, 128, 10), found {arch!r}") from None
    if len(sizes) < 2 or any(s < 1 for s in sizes):
        raise InputError(f"expected at least an input and an output size, all >= 1, found {arch!r}")
    return sizes


def random_mlp(arch: str | Sequence[int], rng: np.random.Generator, *, bias_std: float = 0.1) -> MLP:
    """CJM20-style random network: weights ``N(0, 2/fan_in)``, biases ``N(0, bias_std^2)``."""
    sizes = as_arch(arch)
    if not (math.isfinite(bias_std) and bias_std >= 0):
        raise InputError(f"bias_std must be a finite number >= 0, found {bias_std!r}")
    layers = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:], strict=True):
        W = rng.standard_normal((fan_out, fan_in)) * math.sqrt(2.0 / fan_in)
        b = rng.standard_normal(fan_out) * bias_std
        layers.append((W, b))
    return MLP(layers)


def unit_rows(rows: int, cols: int, rng: np.random.Generator) -> FloatArray:
    """``(rows, cols)`` matrix whose rows are independent and uniform on the unit sphere."""
    W = rng.standard_normal((rows, cols))
    norms = np.linalg.norm(W, axis=1, keepdims=True)
    while np.any(norms == 0.0):  # probability zero, but never divide by it
        bad = norms[:, 0] == 0.0
        W[bad] = rng.standard_normal((int(bad.sum()), cols))
        norms = np.linalg.norm(W, axis=1, keepdims=True)
    out: FloatArray = W / norms
    return out


def unitary_mlp(arch: str | Sequence[int], rng: np.random.Generator, *, n_samples: int = 4096) -> MLP:
    """CM24 "unitary balanced" network.

    Every neuron (output neurons included) has a unit-norm weight vector and bias ``-median`` of its
    pre-activation over ``n_samples`` inputs drawn from ``U[-1, 1]^d0`` and propagated through the
    layers already built: each hidden neuron is on for about half of such inputs.
    """
    sizes = as_arch(arch)
    if n_samples < 2:
        raise InputError(f"n_samples must be >= 2, found {n_samples}")
    H = rng.uniform(-1.0, 1.0, size=(n_samples, sizes[0]))
    layers = []
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        W = unit_rows(fan_out, fan_in, rng)
        Z = H @ W.T
        b = -np.median(Z, axis=0)
        layers.append((W, b))
        if i < len(sizes) - 2:
            H = np.maximum(Z + b, 0.0)
    return MLP(layers)


def default_train_config(dataset: str) -> TrainConfig:
    """Hyper-parameters that reach good accuracy quickly on each packaged dataset."""
    if dataset == "digits":
        return TrainConfig(epochs=50, batch_size=32, learning_rate=3e-3)
    return TrainConfig(epochs=10, batch_size=128, learning_rate=1e-3)


DATASET_INPUTS = {"digits": 64, "mnist": 784, "mnist32": 3072}


def check_dataset_input(name: str, input_dim: int) -> None:
    """Refuse, before any data is loaded, an architecture whose input size is not the dataset's."""
    want = DATASET_INPUTS.get(name)
    if want is not None and want != input_dim:
        raise InputError(
            f"the {name} dataset has {want} input features, the architecture takes {input_dim}; "
            f"use an architecture starting with {want} or another --data"
        )


def dataset_for_input(input_dim: int) -> str:
    """The packaged dataset whose images have ``input_dim`` features."""
    by_dim = {v: k for k, v in DATASET_INPUTS.items()}
    if input_dim not in by_dim:
        raise InputError(
            f"no packaged dataset has {input_dim} input features; trained victims need 64 (digits), "
            "784 (mnist) or 3072 (mnist32)"
        )
    return by_dim[input_dim]


def trained_mlp(
    arch: str | Sequence[int],
    dataset: Dataset | str,
    rng: np.random.Generator,
    *,
    epochs: int | None = None,
    batch_size: int | None = None,
    learning_rate: float | None = None,
    config: TrainConfig | None = None,
    on_epoch: EpochCallback | None = None,
) -> tuple[MLP, TrainReport]:
    """Train a He-initialised network on ``dataset`` (a :class:`Dataset` or a name from
    :data:`relux.data.DATASETS`) with minibatch Adam.

    ``k >= 2`` outputs: softmax classifier (``k`` must cover every label). ``k = 1``: a regression of
    the label, like FMSH24's MNIST regressors. Defaults come from :func:`default_train_config`;
    ``epochs``, ``batch_size`` and ``learning_rate`` override single fields of ``config``.
    """
    sizes = as_arch(arch)
    data = load_dataset(dataset) if isinstance(dataset, str) else dataset
    if sizes[0] != data.n_features:
        raise InputError(
            f"architecture {format_arch(sizes)} takes {sizes[0]} inputs but dataset {data.name!r} has "
            f"{data.n_features} features; start the architecture with {data.n_features}"
        )
    if sizes[-1] != 1 and sizes[-1] < data.n_classes:
        raise InputError(
            f"architecture {format_arch(sizes)} has {sizes[-1]} outputs but dataset {data.name!r} has "
            f"{data.n_classes} classes; end it with {data.n_classes} (classifier) or 1 (regression)"
        )
    base = config if config is not None else default_train_config(data.name)
    overrides: dict[str, Any] = {
        key: value
        for key, value in (("epochs", epochs), ("batch_size", batch_size), ("learning_rate", learning_rate))
        if value is not None
    }
    cfg = dataclasses.replace(base, **overrides)
    start = he_init(sizes, rng)
    return train_mlp(
        start, data.X_train, data.y_train, cfg, rng, X_test=data.X_test, y_test=data.y_test, on_epoch=on_epoch
    )


def build(
    arch: str | Sequence[int],
    init: str,
    seed: int,
    data: str | None = None,
    *,
    epochs: int | None = None,
    on_epoch: EpochCallback | None = None,
) -> tuple[MLP, dict[str, Any]]:
    """Build one victim, as the ``relux zoo`` command does. Returns the model and a JSON-ready summary.

    ``data`` only applies to ``init='trained'``; when omitted there, it is chosen from the input width
    (64 digits, 784 mnist, 3072 mnist32).
    """
    sizes = as_arch(arch)
    if init not in INITS:
        raise InputError(f"unknown init {init!r}; expected one of {', '.join(INITS)}")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise InputError(f"seed must be an integer >= 0, found {seed!r}")
    if data is not None and data not in DATASETS:
        raise InputError(f"unknown dataset {data!r}; expected one of {', '.join(DATASETS)}")
    if init != "trained" and (data is not None or epochs is not None):
        raise InputError(f"--data and --epochs only apply to --init trained, not --init {init}")
    rng = np.random.default_rng(seed)
    info: dict[str, Any] = {"arch": format_arch(sizes), "init": init, "seed": seed}
    if init == "random":
        model = random_mlp(sizes, rng)
    elif init == "unitary":
        model = unitary_mlp(sizes, rng)
    else:
        name = data if data is not None else dataset_for_input(sizes[0])
        dataset = load_dataset(name)
        model, report = trained_mlp(sizes, dataset, rng, epochs=epochs, on_epoch=on_epoch)
        info["data"] = name
        info["dataset"] = dataset.to_dict()
        info["training"] = report.to_dict()
    info["params"] = model.n_params
    return model, info
