"""Keras models (read-only), with h5py and the standard library only: no TensorFlow.

Two layouts are read, chosen by the file's first bytes, whatever its suffix:

* **Keras 3 zip** (``.keras``): ``config.json`` + ``model.weights.h5``. In the weights file a layer's
  variables live at ``layers/<group>/vars/<j>`` where ``<group>`` is the snake-cased class name with a
  per-class counter (``dense``, ``dense_1``, ...), not the layer's own name; some writers used Windows
  backslashes (``layers\\dense_3/vars/0``). The i-th Dense layer of ``config.json`` is matched with the
  i-th ``dense*`` group ordered by numeric suffix, and the shapes must chain.
* **Legacy HDF5** (``.h5``, and some ``.keras`` files): the file attribute ``model_config`` (JSON) gives
  the layer order, weights live under ``model_weights/<layer name>/`` named by that group's
  ``weight_names`` attribute (``<name>/kernel:0``, ``<name>/bias:0``).

Kernels are stored ``(in, out)`` and transposed to relux's ``(out, in)``. Accepted layers: ``InputLayer``,
``Dense`` (ReLU hidden, linear/softmax/sigmoid output), ``Activation``/``ReLU`` folded into the preceding
Dense, and the inference no-ops ``Dropout`` and ``Flatten``. The model must be a plain chain.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from numpy.typing import NDArray

from relux.errors import InputError
from relux.formats._common import LINEAR, SIGMOID, SOFTMAX, as_float64, existing_file, translate_errors
from relux.model import MLP

log = logging.getLogger(__name__)

HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
ZIP_MAGIC = b"PK\x03\x04"

_SUPPORTED = "relux reads Dense layers with ReLU"
_OUTPUT_ACTIVATIONS = {"linear": LINEAR, "softmax": SOFTMAX, "sigmoid": SIGMOID}
_NO_OPS = ("Dropout", "Flatten", "InputLayer")
_DENSE_GROUP = re.compile(r"^layers/(dense(?:_(\d+))?)/vars/(\d+)$")


@dataclass(frozen=True)
class DenseSpec:
    """One Dense layer as the model config declares it."""

    name: str
    units: int | None
    activation: str
    use_bias: bool


# --------------------------------------------------------------------------- config parsing
def _activation_name(value: Any) -> str:
    """Keras writes ``"relu"``, ``None``, or ``{"class_name": "function", "config": "relu"}``."""
    if value is None:
        return "linear"
    if isinstance(value, str):
        return value.lower()
    if isinstance(value, Mapping):
        cfg = value.get("config")
        if isinstance(cfg, str):
            return cfg.lower()
        if isinstance(cfg, Mapping) and isinstance(cfg.get("name"), str):
            return str(cfg["name"]).lower()
        cls = value.get("class_name")
        if isinstance(cls, str):
            return cls.lower()
    return repr(value)


def _layer_list(config: Any, source: str) -> list[Mapping[str, Any]]:
    if not isinstance(config, Mapping):
        raise InputError(f"{source}: the model config is not a JSON object")
    cls = config.get("class_name")
    if cls not in ("Sequential", "Functional", "Model"):
        raise InputError(
            f"{source}: the saved object is a {cls!r}; relux reads Sequential or Functional models"
        )
    inner = config.get("config")
    layers = inner.get("layers") if isinstance(inner, Mapping) else inner
    if not isinstance(layers, list) or not all(isinstance(x, Mapping) for x in layers):
        raise InputError(f"{source}: the model config has no list of layers")
    return layers


def _names_in(obj: Any) -> Iterator[str]:
    """Layer names referenced in a Keras 2 or Keras 3 ``inbound_nodes`` / ``output_layers`` entry."""
    if isinstance(obj, Mapping):
        hist = obj.get("keras_history")
        if isinstance(hist, list) and hist and isinstance(hist[0], str):
            yield hist[0]
            return
        for v in obj.values():
            yield from _names_in(v)
    elif isinstance(obj, list):
        if len(obj) >= 3 and isinstance(obj[0], str) and isinstance(obj[1], int):
            yield obj[0]
            return
        for v in obj:
            yield from _names_in(v)


def _layer_name(layer: Mapping[str, Any], cfg: Mapping[str, Any], index: int) -> str:
    name = layer.get("name", cfg.get("name"))
    return str(name) if name is not None else f"#{index}"


def dense_chain(config: Any, source: str) -> list[DenseSpec]:
    """The Dense layers of a Keras model config, in order, checked to form a supported ReLU chain."""
    layers = _layer_list(config, source)
    functional = config.get("class_name") != "Sequential"
    specs: list[DenseSpec] = []
    prev_name: str | None = None
    for index, layer in enumerate(layers):
        cls = str(layer.get("class_name"))
        raw_cfg = layer.get("config", {})
        cfg: Mapping[str, Any] = raw_cfg if isinstance(raw_cfg, Mapping) else {}
        name = _layer_name(layer, cfg, index)
        if functional and prev_name is not None:
            inbound = set(_names_in(layer.get("inbound_nodes", [])))
            if inbound and inbound != {prev_name}:
                raise InputError(
                    f"{source}: layer {name!r} takes input from {sorted(inbound)}, not only from the "
                    f"previous layer {prev_name!r}; relux reads a plain chain of layers"
                )
        prev_name = name
        if cls == "Dense":
            units = cfg.get("units")
            specs.append(
                DenseSpec(
                    name=name,
                    units=int(units) if isinstance(units, int) else None,
                    activation=_activation_name(cfg.get("activation", "linear")),
                    use_bias=bool(cfg.get("use_bias", True)),
                )
            )
        elif cls in ("Activation", "ReLU"):
            if cls == "ReLU":
                plain = all(not cfg.get(k) for k in ("max_value", "negative_slope", "threshold"))
                act = "relu" if plain else "relu (clipped or leaky)"
            else:
                act = _activation_name(cfg.get("activation"))
            if not specs or specs[-1].activation != "linear":
                raise InputError(
                    f"{source}: layer {name!r} of type {cls} ({act}) does not follow a linear Dense layer; "
                    f"{_SUPPORTED}"
                )
            specs[-1] = replace(specs[-1], activation=act)
        elif cls in _NO_OPS:
            if cls == "Dropout":
                log.debug("%s: ignoring Dropout layer %r (a no-op at inference)", source, name)
        else:
            raise InputError(f"{source}: layer {name!r} of type {cls} is not supported: {_SUPPORTED}")
    if not specs:
        raise InputError(f"{source}: the model has no Dense layer; {_SUPPORTED}")
    for spec in specs[:-1]:
        if spec.activation != "relu":
            raise InputError(
                f"{source}: hidden layer {spec.name!r} has activation {spec.activation!r}; "
                "relux reads Dense layers with ReLU (only the output layer may differ)"
            )
    out = specs[-1]
    if out.activation not in _OUTPUT_ACTIVATIONS:
        raise InputError(
            f"{source}: output layer {out.name!r} has activation {out.activation!r}; "
            "expected linear, softmax or sigmoid"
        )
    if functional:
        outputs = set(_names_in(config.get("config", {}).get("output_layers", [])))
        if outputs and outputs != {prev_name}:
            raise InputError(
                f"{source}: the model outputs {sorted(outputs)}; relux reads single-output chains "
                f"ending at {prev_name!r}"
            )
    return specs


def _build(specs: list[DenseSpec], weights: list[tuple[Any, Any]], source: str) -> MLP:
    layers: list[tuple[NDArray[np.float64], NDArray[np.float64]]] = []
    for i, (spec, (kernel, bias)) in enumerate(zip(specs, weights, strict=True)):
        K = as_float64(kernel, f"{source}: kernel of layer {spec.name!r}")
        if K.ndim != 2:
            raise InputError(
                f"{source}: kernel of layer {spec.name!r} has shape {K.shape}; expected (in, out)"
            )
        if spec.units is not None and K.shape[1] != spec.units:
            raise InputError(
                f"{source}: layer {spec.name!r} declares {spec.units} units but its kernel has shape "
                f"{K.shape} (in, out)"
            )
        if layers and K.shape[0] != layers[-1][0].shape[0]:
            raise InputError(
                f"{source}: Dense layer {i} ({spec.name!r}) has a kernel of shape {K.shape} (in, out) "
                f"but the previous layer has {layers[-1][0].shape[0]} units; the weights do not chain"
            )
        if bias is None:
            b = np.zeros(K.shape[1])
        else:
            b = as_float64(bias, f"{source}: bias of layer {spec.name!r}").reshape(-1)
            if b.shape != (K.shape[1],):
                raise InputError(
                    f"{source}: bias of layer {spec.name!r} has shape {b.shape}; expected ({K.shape[1]},)"
                )
        layers.append((np.ascontiguousarray(K.T), b))  # C order: same BLAS path as other formats
    activation = _OUTPUT_ACTIVATIONS[specs[-1].activation]
    if activation == SOFTMAX and layers[-1][0].shape[0] == 1:
        log.info("%s declares a 1-unit softmax output, which is constant; oracles use its logits", source)
    return MLP(layers, activation)


# --------------------------------------------------------------------------- Keras 3 zip
def _dense_groups(h5: h5py.File) -> dict[int, dict[int, h5py.Dataset]]:
    """``{suffix: {var index: dataset}}`` for every ``layers/dense*`` group, whatever the path separator."""
    groups: dict[int, dict[int, h5py.Dataset]] = {}

    def visit(name: str, obj: Any) -> None:
        if not isinstance(obj, h5py.Dataset):
            return
        m = _DENSE_GROUP.match(name.replace("\\", "/"))
        if m is not None:
            suffix = int(m.group(2)) if m.group(2) is not None else 0
            groups.setdefault(suffix, {})[int(m.group(3))] = obj

    h5.visititems(visit)
    return groups


def _load_zip(p: Path, source: str) -> MLP:
    with zipfile.ZipFile(p) as zf:
        names = set(zf.namelist())
        for required in ("config.json", "model.weights.h5"):
            if required not in names:
                raise InputError(
                    f"{source}: the archive has no {required!r} (found {sorted(names)[:6]}); "
                    "not a Keras 3 .keras file"
                )
        config = json.loads(zf.read("config.json").decode("utf-8"))
        specs = dense_chain(config, source)
        weights_bytes = zf.read("model.weights.h5")
    with h5py.File(io.BytesIO(weights_bytes), "r") as h5:
        groups = _dense_groups(h5)
        if len(groups) != len(specs):
            found = ", ".join("dense" if s == 0 else f"dense_{s}" for s in sorted(groups)) or "none"
            raise InputError(
                f"{source}: config.json declares {len(specs)} Dense layers but model.weights.h5 has "
                f"{len(groups)} 'layers/dense*' groups ({found})"
            )
        weights: list[tuple[Any, Any]] = []
        for spec, suffix in zip(specs, sorted(groups), strict=True):
            vars_ = groups[suffix]
            group = "dense" if suffix == 0 else f"dense_{suffix}"
            if 0 not in vars_ or (spec.use_bias and 1 not in vars_):
                raise InputError(
                    f"{source}: group 'layers/{group}' lacks its kernel (vars/0) or bias (vars/1)"
                )
            weights.append((vars_[0][()], vars_[1][()] if spec.use_bias else None))
    return _build(specs, weights, source)


# --------------------------------------------------------------------------- legacy HDF5
def _as_text(value: Any) -> str:
    if isinstance(value, bytes | np.bytes_):
        return bytes(value).decode("utf-8")
    return str(value)


def _legacy_weights(mw: h5py.Group, spec: DenseSpec, source: str) -> tuple[Any, Any]:
    group = mw.get(spec.name)
    if not isinstance(group, h5py.Group):
        raise InputError(
            f"{source}: no weights group 'model_weights/{spec.name}' for Dense layer {spec.name!r}"
        )
    found: dict[str, h5py.Dataset] = {}
    names = [_as_text(n) for n in np.asarray(group.attrs.get("weight_names", [])).reshape(-1)]
    if names:
        for n in names:
            obj = group.get(n)
            if isinstance(obj, h5py.Dataset):
                found[n.rsplit("/", 1)[-1].split(":", 1)[0]] = obj
    else:

        def visit(name: str, obj: Any) -> None:
            if isinstance(obj, h5py.Dataset):
                found.setdefault(name.rsplit("/", 1)[-1].split(":", 1)[0], obj)

        group.visititems(visit)
    if "kernel" not in found or (spec.use_bias and "bias" not in found):
        raise InputError(
            f"{source}: weights of Dense layer {spec.name!r} not found under 'model_weights/{spec.name}' "
            f"(found {sorted(found)}); expected kernel and bias"
        )
    return found["kernel"][()], (found["bias"][()] if spec.use_bias else None)


def _load_hdf5(p: Path, source: str) -> MLP:
    with h5py.File(p, "r") as h5:
        raw = h5.attrs.get("model_config")
        if raw is None:
            raise InputError(
                f"{source}: HDF5 file without a 'model_config' attribute (a weights-only file?); relux "
                "needs a full Keras model saved with model.save()"
            )
        specs = dense_chain(json.loads(_as_text(raw)), source)
        mw = h5.get("model_weights", h5)
        weights = [_legacy_weights(mw, spec, source) for spec in specs]
    return _build(specs, weights, source)


# --------------------------------------------------------------------------- entry point
def load_keras(path: str | os.PathLike[str]) -> MLP:
    """Read a Keras 3 ``.keras`` archive or a legacy Keras HDF5 file, whichever the bytes say it is."""
    p = existing_file(path)
    source = f"'{p}'"
    with translate_errors(p, "a Keras model"):
        with open(p, "rb") as fh:
            head = fh.read(8)
        if head.startswith(ZIP_MAGIC):
            return _load_zip(p, source)
        if head == HDF5_MAGIC or h5py.is_hdf5(str(p)):
            return _load_hdf5(p, source)
        raise InputError(
            f"{source} is neither a Keras 3 archive (zip) nor a Keras HDF5 file (it starts with {head!r})"
        )
