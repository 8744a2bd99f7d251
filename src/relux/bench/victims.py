"""Victims built by :func:`relux.zoo.build`, kept on disk between benchmark runs.

Training the CIFAR-scale victim takes minutes, so :func:`cached_victim` builds it once and keeps it in a
cache directory outside the repository (:func:`default_cache_dir`: ``$RELUX_CACHE_DIR``, else
``$XDG_CACHE_HOME/relux``, else ``~/.cache/relux``; then ``victims/``). An entry is named by its build
parameters (:func:`cache_key`) and holds two files:

- ``KEY.npz``: the weights in the exchange layout, the bytes ``relux zoo ARCH ... --out KEY.npz`` writes
  (so their SHA-256 is the one that command prints);
- ``KEY.json``: the SHA-256 of the ``.npz`` and the build summary of :func:`relux.zoo.build` (dataset and
  training report, test accuracy included).

An entry is used only when the ``.npz`` still has the SHA-256 its summary records; otherwise (a torn or
edited file) it is rebuilt. Delete the directory to force a rebuild (e.g. after a change of the training
code or of the installed MNIST source, which the summary's ``dataset`` entry records).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from relux.errors import InputError
from relux.model import MLP, format_arch

log = logging.getLogger(__name__)

#: Environment variable naming the cache directory (its ``victims/`` subdirectory holds the victims).
CACHE_ENV = "RELUX_CACHE_DIR"


def default_cache_dir() -> Path:
    """``$RELUX_CACHE_DIR``, else ``$XDG_CACHE_HOME/relux``, else ``~/.cache/relux``."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "relux"


def cache_key(arch: Sequence[int], init: str, seed: int, data: str | None = None) -> str:
    """The entry name of a victim, from its build parameters: ``trained-3072-256x8-10-mnist32-seed0``."""
    parts = [init, format_arch(tuple(arch))]
    if data is not None:
        parts.append(data)
    parts.append(f"seed{seed}")
    return "-".join(parts)


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cached_victim(
    arch: Sequence[int],
    init: str,
    seed: int,
    data: str | None = None,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
) -> tuple[MLP, dict[str, Any]]:
    """The victim ``relux zoo ARCH --init INIT --seed SEED [--data DATA]`` builds, from the cache when a
    valid entry exists, else built now and stored.

    Returns the model and the build summary of :func:`relux.zoo.build` plus ``sha256`` (of the ``.npz``),
    ``path``, ``cache_key`` and ``cached`` (whether it came from the cache).
    """
    from relux.formats import load_model, save_model
    from relux.formats._common import atomic_write_bytes
    from relux.zoo import build

    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    directory = root / "victims"
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create the victim cache {directory}: {exc}; pass another directory") from exc
    key = cache_key(arch, init, seed, data)
    weights = directory / f"{key}.npz"
    summary = directory / f"{key}.json"
    if weights.is_file() and summary.is_file():
        try:
            info: dict[str, Any] = json.loads(summary.read_text())
            sha = file_sha256(weights)
            if info.get("sha256") == sha:
                model = load_model(weights)
                log.info("victim %s from the cache %s (sha256 %s)", key, weights, sha[:16])
                return model, {**info, "path": str(weights), "cache_key": key, "cached": True}
            log.warning("victim cache entry %s: sha256 %s differs from the recorded %s; rebuilding",
                        weights, sha[:16], str(info.get("sha256"))[:16])
        except (OSError, ValueError) as exc:
            log.warning("victim cache entry %s unreadable (%s); rebuilding", weights, exc)
    log.info("building victim %s (not in the cache %s)", key, directory)
    model, info = build(tuple(arch), init, seed, data)
    save_model(model, weights)
    info["sha256"] = file_sha256(weights)
    info["cache_key"] = key
    atomic_write_bytes(summary, (json.dumps(info, indent=2) + "\n").encode())
    log.info("victim %s built and cached in %s (sha256 %s)", key, weights, info["sha256"][:16])
    return model, {**info, "path": str(weights), "cached": False}
