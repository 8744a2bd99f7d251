"""Model files: load, save and query ReLU networks stored in common formats, chosen by extension.

======================  ==========  ===================================================================
extension               read/write  layout
======================  ==========  ===================================================================
``.npz``                read/write  exchange layout (:mod:`relux.formats.exchange`), never unpickled
``.safetensors``        read/write  exchange layout, output activation in the metadata
``.onnx``               read/write  Gemm / MatMul+Add / Relu chain (:mod:`relux.formats.onnx_io`)
``.keras``, ``.h5``     read        Keras 3 zip or legacy HDF5, h5py only (:mod:`relux.formats.keras_io`)
``.pt``, ``.pth``       read/write  state_dict of nn.Sequential(Linear, ReLU, ...) (needs ``relux[torch]``)
======================  ==========  ===================================================================

Every failure (missing, corrupt, truncated or unsupported file) is an :class:`~relux.errors.InputError`
that names what was found. Format modules import their libraries lazily, so ``import relux.formats``
is cheap.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from relux.errors import InputError
from relux.model import MLP

if TYPE_CHECKING:
    from relux.oracle.base import Oracle

#: extension -> format name.
FORMATS = {
    ".npz": "npz",
    ".safetensors": "safetensors",
    ".onnx": "onnx",
    ".keras": "keras",
    ".h5": "keras",
    ".pt": "torch",
    ".pth": "torch",
}
#: formats :func:`save_model` writes.
WRITABLE = ("npz", "safetensors", "onnx", "torch")


def model_format(path: str | os.PathLike[str]) -> str:
    """The format name for ``path``'s extension (case-insensitive), or :class:`InputError`."""
    suffix = Path(path).suffix.lower()
    fmt = FORMATS.get(suffix)
    if fmt is None:
        known = ", ".join(FORMATS)
        found = f"extension {suffix!r}" if suffix else "no extension"
        raise InputError(f"cannot tell the model format of '{path}' ({found}); expected one of {known}")
    return fmt


def check_writable(path: str | os.PathLike[str]) -> str:
    """The format :func:`save_model` would write for ``path``, or :class:`InputError` if it cannot."""
    fmt = model_format(path)
    if fmt not in WRITABLE:
        exts = ", ".join(e for e, f in FORMATS.items() if f in WRITABLE)
        raise InputError(
            f"relux reads Keras files but does not write them ('{path}'); save as one of {exts}"
        )
    return fmt


def load_model(path: str | os.PathLike[str]) -> MLP:
    """Read a model file; the format is chosen by extension (see the module docstring)."""
    fmt = model_format(path)
    if fmt == "npz":
        from relux.formats.exchange import load_npz

        return load_npz(path)
    if fmt == "safetensors":
        from relux.formats.exchange import load_safetensors

        return load_safetensors(path)
    if fmt == "onnx":
        from relux.formats.onnx_io import load_onnx

        return load_onnx(path)
    if fmt == "keras":
        from relux.formats.keras_io import load_keras

        return load_keras(path)
    from relux.formats.torch_io import load_torch

    return load_torch(path)


def save_model(model: MLP, path: str | os.PathLike[str]) -> None:
    """Write ``model`` in the format named by ``path``'s extension (atomically: temp file + rename)."""
    if not isinstance(model, MLP):
        raise InputError(f"save_model expects an MLP, found {type(model).__name__}")
    fmt = check_writable(path)
    if fmt == "npz":
        from relux.formats.exchange import save_npz

        save_npz(model, path)
    elif fmt == "safetensors":
        from relux.formats.exchange import save_safetensors

        save_safetensors(model, path)
    elif fmt == "onnx":
        from relux.formats.onnx_io import save_onnx

        save_onnx(model, path)
    else:
        from relux.formats.torch_io import save_torch

        save_torch(model, path)


def oracle_from_file(path: str | os.PathLike[str]) -> Oracle:
    """An oracle answering with the logits of the model in ``path``.

    ``.onnx`` files are run by onnxruntime (:class:`~relux.oracle.onnx_oracle.ONNXOracle`), so any graph
    onnxruntime runs is accepted, not only those :func:`load_model` reads; a final Softmax/Sigmoid is
    dropped so the oracle answers logits. Other formats are loaded and served by
    :class:`~relux.oracle.local.MLPOracle`.
    """
    if model_format(path) == "onnx":
        from relux.oracle.onnx_oracle import ONNXOracle

        return ONNXOracle(path)
    from relux.oracle.local import MLPOracle

    return MLPOracle(load_model(path))


__all__ = [
    "FORMATS",
    "WRITABLE",
    "model_format",
    "check_writable",
    "load_model",
    "save_model",
    "oracle_from_file",
]
