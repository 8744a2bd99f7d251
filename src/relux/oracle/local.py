"""Local oracles: an in-memory MLP, and any Python callable (also importable from ``file.py:NAME``)."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from relux.errors import InputError
from relux.model import MLP
from relux.oracle.base import FloatArray, OutputKind, ShapedOracle, as_query_batch, check_answer


class MLPOracle:
    """Black-box access to an in-memory :class:`~relux.model.MLP`. Returns logits."""

    def __init__(self, model: MLP) -> None:
        self._model = model

    @property
    def input_dim(self) -> int:
        return self._model.input_dim

    @property
    def output_dim(self) -> int:
        return self._model.output_dim

    @property
    def output_kind(self) -> OutputKind:
        return OutputKind.LOGITS

    def query(self, X: FloatArray) -> FloatArray:
        return self._model.forward(as_query_batch(X, self.input_dim))

    def __repr__(self) -> str:
        return f"MLPOracle(arch={'-'.join(map(str, self._model.arch))})"


class CallableOracle(ShapedOracle):
    """Wraps ``fn(X) -> Y`` for ``X`` of shape ``(n, input_dim)``; answers are validated."""

    def __init__(
        self,
        fn: Callable[[FloatArray], Any],
        input_dim: int,
        output_dim: int,
        output_kind: OutputKind = OutputKind.LOGITS,
        name: str = "callable",
    ) -> None:
        if input_dim < 1 or output_dim < 1:
            raise InputError(f"input and output sizes must be >= 1, found {input_dim} and {output_dim}")
        self._fn = fn
        self._d = int(input_dim)
        self._k = int(output_dim)
        self._kind = output_kind
        self.name = name

    def query(self, X: FloatArray) -> FloatArray:
        A = as_query_batch(X, self._d)
        return check_answer(self._fn(A.copy()), A.shape[0], self._k, f"oracle {self.name}")

    def __repr__(self) -> str:
        return f"CallableOracle({self.name}, {self._d}->{self._k})"


def load_callable(spec: str) -> Callable[[FloatArray], Any]:
    """Import ``path/to/file.py:NAME`` or ``package.module:NAME`` and return the callable ``NAME``."""
    if ":" not in spec:
        raise InputError(f"expected an oracle as FILE.py:NAME or package.module:NAME, found {spec!r}")
    target, _, name = spec.rpartition(":")
    if not target or not name.isidentifier():
        raise InputError(f"expected an oracle as FILE.py:NAME or package.module:NAME, found {spec!r}")
    module: Any
    if target.endswith(".py") or "/" in target or "\\" in target:
        path = Path(target)
        if not path.is_file():
            raise InputError(f"oracle file {target!r} does not exist")
        mod_name = f"relux_user_oracle_{abs(hash(str(path.resolve())))}"
        spec_obj = importlib.util.spec_from_file_location(mod_name, path)
        if spec_obj is None or spec_obj.loader is None:
            raise InputError(f"cannot import {target!r} as a Python file")
        module = importlib.util.module_from_spec(spec_obj)
        sys.modules[mod_name] = module
        try:
            spec_obj.loader.exec_module(module)
        except Exception as exc:
            raise InputError(f"importing oracle file {target!r} failed: {type(exc).__name__}: {exc}") from exc
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            raise InputError(f"cannot import module {target!r}: {exc}") from exc
    fn = getattr(module, name, None)
    if fn is None or not callable(fn):
        raise InputError(f"{target!r} has no callable named {name!r}")
    return fn  # type: ignore[no-any-return]


def model_oracle(model: MLP) -> MLPOracle:
    """The oracle of an in-memory model (the attack only ever sees the oracle)."""
    return MLPOracle(model)


__all__ = ["MLPOracle", "CallableOracle", "load_callable", "model_oracle"]
