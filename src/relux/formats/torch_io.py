"""PyTorch adapter (optional extra ``relux[torch]``): modules and ``.pt``/``.pth`` state_dicts.

``torch`` is imported inside the functions, so the rest of relux never needs it.

A ``.pt`` file is the ``state_dict`` of ``nn.Sequential(Linear, ReLU, Linear, ..., Linear)``: entries
``{i}.weight`` (out, in) and ``{i}.bias`` (out,), read with ``torch.load(weights_only=True)`` (no
arbitrary unpickling). A state_dict cannot say what sits between the Linear layers; relux assumes ReLU
and rejects Linear layers at adjacent indices (nothing between them). The output activation is kept in
the state_dict's own ``_metadata`` (key ``relux.output_activation``), which ``load_state_dict`` ignores,
so the file still loads into ``to_torch(model)``.
"""

from __future__ import annotations

import io
import os
import re
import warnings
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from relux.errors import InputError
from relux.formats._common import (
    LINEAR,
    SIGMOID,
    SOFTMAX,
    atomic_write_bytes,
    check_output_activation,
    existing_file,
    translate_errors,
)
from relux.model import MLP

if TYPE_CHECKING:
    import torch

METADATA_KEY = "relux.output_activation"
_ENTRY = re.compile(r"^(?P<prefix>(?:.+\.)?)(?P<index>\d+)\.(?P<kind>weight|bias)$")
_LAYOUT = (
    "relux reads the state_dict of an nn.Sequential of Linear and ReLU "
    "('0.weight', '0.bias', '2.weight', ...)"
)


def import_torch() -> ModuleType:
    """Import PyTorch, or raise :class:`InputError` saying how to install it."""
    try:
        import torch
    except ImportError as exc:
        raise InputError(
            "this needs PyTorch, which is an optional extra: pip install 'relux[torch]'"
        ) from exc
    return torch


# --------------------------------------------------------------------------- modules
def to_torch(model: MLP, *, include_output_activation: bool = False) -> torch.nn.Sequential:
    """``nn.Sequential(Linear, ReLU, ..., Linear)`` in float64 computing ``model``'s logits.

    With ``include_output_activation`` a final ``Softmax(dim=-1)`` or ``Sigmoid`` is appended when the
    model declares one.
    """
    th = import_torch()
    mods: list[Any] = []
    last = len(model.layers) - 1
    for i, (W, b) in enumerate(model.layers):
        lin = th.nn.Linear(W.shape[1], W.shape[0], dtype=th.float64)
        with th.no_grad():
            lin.weight.copy_(th.tensor(W, dtype=th.float64))
            lin.bias.copy_(th.tensor(b, dtype=th.float64))
        mods.append(lin)
        if i < last:
            mods.append(th.nn.ReLU())
    if include_output_activation and model.output_activation == SOFTMAX:
        mods.append(th.nn.Softmax(dim=-1))
    elif include_output_activation and model.output_activation == SIGMOID:
        mods.append(th.nn.Sigmoid())
    seq: torch.nn.Sequential = th.nn.Sequential(*mods)
    return seq


def _tensor_to_numpy(t: Any, what: str) -> NDArray[np.float64]:
    th = import_torch()
    if not isinstance(t, th.Tensor):
        raise InputError(f"{what} is a {type(t).__name__}, not a tensor")
    if not (t.dtype.is_floating_point or t.dtype in (th.int8, th.int16, th.int32, th.int64)):
        raise InputError(f"{what} has dtype {t.dtype}; expected real floating-point numbers")
    arr: NDArray[np.float64] = t.detach().to(device="cpu", dtype=th.float64).numpy().copy()
    return arr


def from_torch(module: Any) -> MLP:
    """Convert an ``nn.Sequential`` of ``Linear`` and ``ReLU`` (optionally ending in Softmax/Sigmoid)."""
    th = import_torch()
    nn = th.nn
    if isinstance(module, nn.Linear):
        children: list[Any] = [module]
    elif isinstance(module, nn.Sequential):
        children = list(module.children())
    else:
        raise InputError(
            f"cannot convert a {type(module).__name__}: relux reads an nn.Sequential of Linear and ReLU"
        )
    layers: list[tuple[NDArray[np.float64], NDArray[np.float64]]] = []
    activation = LINEAR
    expect_linear = True
    for pos, child in enumerate(children):
        kind = type(child).__name__
        is_last = pos == len(children) - 1
        if isinstance(child, nn.Linear):
            if not expect_linear:
                raise InputError(f"layer {pos} (Linear) follows a Linear layer with no ReLU between them")
            W = _tensor_to_numpy(child.weight, f"layer {pos} (Linear) weight")
            b = (
                _tensor_to_numpy(child.bias, f"layer {pos} (Linear) bias")
                if child.bias is not None
                else np.zeros(W.shape[0])
            )
            layers.append((W, b))
            expect_linear = False
        elif isinstance(child, nn.ReLU):
            if expect_linear:
                raise InputError(f"layer {pos} (ReLU) does not follow a Linear layer")
            expect_linear = True
        elif isinstance(child, nn.Softmax | nn.Sigmoid) and is_last and not expect_linear:
            if isinstance(child, nn.Softmax) and child.dim not in (-1, 1):
                raise InputError(f"layer {pos} (Softmax) is over dim {child.dim}; expected the last dim")
            activation = SOFTMAX if isinstance(child, nn.Softmax) else SIGMOID
        elif isinstance(child, nn.Identity):
            continue
        else:
            raise InputError(
                f"layer {pos} of type {kind} is not supported: relux reads an nn.Sequential of Linear and "
                "ReLU (Softmax or Sigmoid only last)"
            )
    if not layers or expect_linear:
        raise InputError("the module must end with a Linear layer (optionally followed by Softmax/Sigmoid)")
    return MLP(layers, activation)


# --------------------------------------------------------------------------- state_dicts
def state_dict_from_model(model: MLP) -> dict[str, Any]:
    """The ``state_dict`` of ``to_torch(model)``, with the output activation in its ``_metadata``."""
    sd: dict[str, Any] = to_torch(model).state_dict()
    meta = getattr(sd, "_metadata", None)
    if meta is None:
        meta = OrderedDict()
        setattr(sd, "_metadata", meta)  # noqa: B010 (torch keeps per-module metadata in this attribute)
    meta.setdefault("", {})[METADATA_KEY] = model.output_activation
    return sd


def model_from_state_dict(state: Any, source: str = "state_dict") -> MLP:
    """Build an :class:`MLP` from an ``nn.Sequential(Linear, ReLU, ...)`` state_dict."""
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise InputError(f"{source} holds a {type(state).__name__}, not a state_dict; {_LAYOUT}")
    if not state:
        raise InputError(f"{source} holds an empty state_dict; {_LAYOUT}")
    prefixes: set[str] = set()
    entries: dict[int, dict[str, Any]] = {}
    for key, value in state.items():
        m = _ENTRY.match(str(key))
        if m is None:
            raise InputError(f"{source}: entry {key!r} is not a Linear weight or bias; {_LAYOUT}")
        prefixes.add(m.group("prefix"))
        entries.setdefault(int(m.group("index")), {})[m.group("kind")] = value
    if len(prefixes) > 1:
        raise InputError(f"{source}: entries come from several modules {sorted(prefixes)}; {_LAYOUT}")
    indices = sorted(entries)
    for a, c in zip(indices, indices[1:], strict=False):
        if c - a < 2:
            raise InputError(
                f"{source}: Linear layers {a} and {c} are adjacent, with no ReLU between them; {_LAYOUT}"
            )
    layers = []
    for i in indices:
        e = entries[i]
        if "weight" not in e:
            raise InputError(f"{source}: entry '{i}.bias' has no matching '{i}.weight'; {_LAYOUT}")
        W = _tensor_to_numpy(e["weight"], f"{source}: '{i}.weight'")
        if W.ndim != 2:
            raise InputError(f"{source}: '{i}.weight' has shape {W.shape}; expected (out, in) of a Linear")
        b = _tensor_to_numpy(e["bias"], f"{source}: '{i}.bias'") if "bias" in e else np.zeros(W.shape[0])
        layers.append((W, b))
    activation = LINEAR
    meta = getattr(state, "_metadata", None)
    if isinstance(meta, Mapping) and isinstance(meta.get(""), Mapping):
        activation = str(meta[""].get(METADATA_KEY, LINEAR))
    return MLP(layers, check_output_activation(activation, source))


def load_torch(path: str | os.PathLike[str]) -> MLP:
    """Read a ``.pt``/``.pth`` state_dict with ``torch.load(weights_only=True)``."""
    p = existing_file(path)
    th = import_torch()
    with translate_errors(p, "a PyTorch state_dict (loaded with weights_only=True)"):
        with warnings.catch_warnings():
            # corrupt files make torch warn about odd pickle protocols before failing
            warnings.simplefilter("ignore", UserWarning)
            state = th.load(str(p), map_location="cpu", weights_only=True)
        return model_from_state_dict(state, f"'{p}'")


def save_torch(model: MLP, path: str | os.PathLike[str]) -> Path:
    """Write the state_dict of ``to_torch(model)`` (loadable with ``weights_only=True``)."""
    th = import_torch()
    buf = io.BytesIO()
    th.save(state_dict_from_model(model), buf)
    return atomic_write_bytes(path, buf.getvalue())
