"""The relux exchange layout, in ``.npz`` and ``.safetensors``.

Both files hold float64 tensors ``layers.{i}.weight`` of shape ``(out, in)`` and ``layers.{i}.bias`` of
shape ``(out,)`` for ``i = 0..L`` (the last one is the linear output layer). The output activation is a
0-d unicode array ``output_activation`` in ``.npz`` files (a plain string array, not a pickle) and the
metadata entry ``output_activation`` in ``.safetensors`` files.

``.npz`` files are read member by member with ``allow_pickle=False``; each member's header is checked
before its data is read, so an object array, or a header that claims more bytes than the archive holds,
is rejected without allocating anything.
"""

from __future__ import annotations

import io
import math
import os
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from relux.errors import InputError
from relux.formats._common import (
    LINEAR,
    as_float64,
    atomic_write_bytes,
    check_output_activation,
    existing_file,
    translate_errors,
)
from relux.model import MLP, format_arch

LAYOUT = (
    "the relux exchange layout holds float64 tensors 'layers.{i}.weight' (out, in) and "
    "'layers.{i}.bias' (out,) for i = 0..L"
)
ACTIVATION_KEY = "output_activation"
_KEY = re.compile(r"^layers\.(\d+)\.(weight|bias)$")


# --------------------------------------------------------------------------- layout <-> MLP
def tensors_from_model(model: MLP) -> dict[str, NDArray[np.float64]]:
    """The exchange tensors of ``model`` (C-contiguous float64 copies)."""
    out: dict[str, NDArray[np.float64]] = {}
    for i, (W, b) in enumerate(model.layers):
        out[f"layers.{i}.weight"] = np.ascontiguousarray(W, dtype=np.float64).copy()
        out[f"layers.{i}.bias"] = np.ascontiguousarray(b, dtype=np.float64).copy()
    return out


def model_from_tensors(tensors: Mapping[str, Any], output_activation: str, source: str) -> MLP:
    """Build an :class:`MLP` from exchange-layout tensors; :class:`InputError` names what is wrong."""
    found: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        m = _KEY.match(key)
        if m is None:
            if key == ACTIVATION_KEY:
                continue
            raise InputError(f"{source}: unexpected entry {key!r}; {LAYOUT}")
        found.setdefault(int(m.group(1)), {})[m.group(2)] = value
    if not found:
        shown = ", ".join(sorted(map(repr, tensors))[:8]) or "nothing"
        raise InputError(f"{source}: no 'layers.0.weight' found (found {shown}); {LAYOUT}")
    n = max(found) + 1
    layers = []
    for i in range(n):
        entry = found.get(i, {})
        for part in ("weight", "bias"):
            if part not in entry:
                raise InputError(f"{source}: 'layers.{i}.{part}' is missing ({n} layers found); {LAYOUT}")
        W = as_float64(entry["weight"], f"{source}: 'layers.{i}.weight'")
        b = as_float64(entry["bias"], f"{source}: 'layers.{i}.bias'")
        if W.ndim != 2 or b.ndim != 1:
            raise InputError(
                f"{source}: layer {i} has weight shape {W.shape} and bias shape {b.shape}; "
                "expected a 2-D (out, in) weight and a 1-D (out,) bias"
            )
        layers.append((W, b))
    return MLP(layers, check_output_activation(output_activation, source))


# --------------------------------------------------------------------------- npz
def _npz_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, source: str) -> NDArray[Any]:
    fmt = np.lib.format
    with zf.open(info) as fp:
        version = fmt.read_magic(fp)
        if version == (1, 0):
            shape, _fortran, dtype = fmt.read_array_header_1_0(fp)
        elif version in ((2, 0), (3, 0)):
            shape, _fortran, dtype = fmt.read_array_header_2_0(fp)
        else:
            raise InputError(f"{source}: member {info.filename!r} has unsupported .npy version {version}")
    if dtype.hasobject:
        raise InputError(
            f"{source}: member {info.filename!r} holds an object array (a pickle); relux never loads "
            "pickles (allow_pickle=False). Save plain float arrays, e.g. with 'relux convert'"
        )
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes > info.file_size:
        raise InputError(
            f"{source}: member {info.filename!r} declares {nbytes} bytes of data but holds "
            f"{info.file_size}; the file is truncated or corrupt"
        )
    with zf.open(info) as fp:
        arr: NDArray[Any] = fmt.read_array(fp, allow_pickle=False)
    return arr


def _activation_from_array(value: NDArray[Any], source: str) -> str:
    if value.shape != () or value.dtype.kind != "U":
        raise InputError(
            f"{source}: {ACTIVATION_KEY!r} must be a 0-d string array, found dtype {value.dtype} "
            f"and shape {value.shape}"
        )
    return str(value[()])


def load_npz(path: str | os.PathLike[str]) -> MLP:
    """Read an exchange-layout ``.npz`` file (never unpickles)."""
    p = existing_file(path)
    source = f"'{p}'"
    with translate_errors(p, "an .npz archive"):
        arrays: dict[str, NDArray[Any]] = {}
        with zipfile.ZipFile(p) as zf:
            for info in zf.infolist():
                if info.is_dir():
                    continue
                if not info.filename.endswith(".npy"):
                    raise InputError(f"{source}: member {info.filename!r} is not a .npy array")
                arrays[info.filename[: -len(".npy")]] = _npz_member(zf, info, source)
        activation = LINEAR
        if ACTIVATION_KEY in arrays:
            activation = _activation_from_array(arrays[ACTIVATION_KEY], source)
        return model_from_tensors(arrays, activation, source)


def save_npz(model: MLP, path: str | os.PathLike[str]) -> Path:
    """Write ``model`` as an uncompressed exchange-layout ``.npz``."""
    arrays: dict[str, NDArray[Any]] = dict(tensors_from_model(model))
    arrays[ACTIVATION_KEY] = np.array(model.output_activation, dtype=np.str_)
    buf = io.BytesIO()
    np.savez(buf, allow_pickle=False, **arrays)
    return atomic_write_bytes(path, buf.getvalue())


# --------------------------------------------------------------------------- safetensors
def load_safetensors(path: str | os.PathLike[str]) -> MLP:
    """Read an exchange-layout ``.safetensors`` file."""
    from safetensors import safe_open

    p = existing_file(path)
    source = f"'{p}'"
    with translate_errors(p, "a safetensors file"):
        tensors: dict[str, NDArray[Any]] = {}
        with safe_open(str(p), framework="numpy") as f:
            metadata = f.metadata() or {}
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
        activation = metadata.get(ACTIVATION_KEY, LINEAR)
        return model_from_tensors(tensors, str(activation), source)


def save_safetensors(model: MLP, path: str | os.PathLike[str]) -> Path:
    """Write ``model`` as an exchange-layout ``.safetensors`` file (activation and arch in the metadata)."""
    from safetensors.numpy import save

    metadata = {
        "format": "relux-mlp",
        ACTIVATION_KEY: model.output_activation,
        "arch": format_arch(model.arch),
    }
    data: bytes = save(tensors_from_model(model), metadata=metadata)
    return atomic_write_bytes(path, data)
