"""Helpers shared by the format modules: path checks, error translation, array checks, atomic writes."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from relux.errors import InputError

#: Output activations as relux records them (see :data:`relux.model.OUTPUT_ACTIVATIONS`).
LINEAR, SOFTMAX, SIGMOID = "linear", "softmax", "sigmoid"

_MAX_DETAIL = 200


def existing_file(path: str | os.PathLike[str], what: str = "model file") -> Path:
    """``path`` as a :class:`Path`, or :class:`InputError` if it is missing or not a regular file."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{what} '{p}' does not exist; check the path")
    if not p.is_file():
        raise InputError(f"{what} '{p}' is not a regular file (a directory?); give the path of the file")
    return p


def short(exc: BaseException) -> str:
    """A one-line, bounded description of a low-level exception, for wrapping in :class:`InputError`."""
    text = " ".join(str(exc).split())
    if len(text) > _MAX_DETAIL:
        text = text[:_MAX_DETAIL] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


@contextmanager
def translate_errors(path: Path, what: str) -> Iterator[None]:
    """Turn any exception a parsing library raises into an :class:`InputError` naming the file.

    Third-party readers (h5py, protobuf, zipfile, torch, safetensors) raise a zoo of exception types on
    corrupt input; callers of relux only ever see :class:`InputError`. Deliberate ``InputError`` s pass
    through unchanged.
    """
    try:
        yield
    except InputError:
        raise
    except Exception as exc:
        raise InputError(
            f"cannot read '{path}' as {what}: {short(exc)}. The file is corrupt, truncated or not {what}"
        ) from exc


def as_float64(arr: Any, what: str) -> NDArray[np.float64]:
    """Convert a real numeric array to float64 (exact for float16/32 and small ints); reject anything else."""
    a = np.asarray(arr)
    if a.dtype.kind not in "fiu":
        raise InputError(f"{what} has dtype {a.dtype}; expected real floating-point numbers")
    return np.asarray(a, dtype=np.float64)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same directory, then rename.

    A crash or a full disk never leaves a half-written model behind.
    """
    p = Path(path)
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise InputError(f"cannot write '{p}': directory '{parent}' does not exist")
    if p.is_dir():
        raise InputError(f"cannot write '{p}': it is a directory")
    tmp_name: str | None = None
    try:
        with tempfile.NamedTemporaryFile(dir=parent, prefix=f".{p.name}.", suffix=".tmp", delete=False) as fh:
            tmp_name = fh.name
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp_name, p)
        tmp_name = None
    except OSError as exc:
        raise InputError(f"cannot write '{p}': {exc.strerror or short(exc)}") from exc
    finally:
        if tmp_name is not None:
            try:
                os.unlink(tmp_name)
            except OSError:
                pass
    return p


def check_output_activation(name: str, source: str) -> str:
    """Validate an output activation read from a file."""
    if name not in (LINEAR, SOFTMAX, SIGMOID):
        raise InputError(
            f"{source}: output activation {name!r} is not supported; expected linear, softmax or sigmoid"
        )
    return name
