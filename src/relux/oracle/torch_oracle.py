"""An oracle around a PyTorch module (optional extra ``relux[torch]``; torch is imported lazily)."""

from __future__ import annotations

from typing import Any

import numpy as np

from relux.errors import InputError, OracleError
from relux.formats._common import short
from relux.formats.torch_io import import_torch
from relux.oracle.base import FloatArray, OutputKind, ShapedOracle, as_query_batch, check_answer


class TorchOracle(ShapedOracle):
    """Black-box access to ``module`` (any ``torch.nn.Module`` mapping ``(n, d)`` to ``(n, k)``).

    Queries run under ``torch.no_grad()`` in the module's own floating-point dtype (float64 for modules
    from :func:`relux.formats.torch_io.to_torch`; a float32 module gets float32 inputs) and answers are
    returned as float64. ``input_dim``/``output_dim`` default to the first Linear's ``in_features`` and
    the last Linear's ``out_features``. The module is used as given: call ``.eval()`` first if it has
    dropout or batch-norm layers.
    """

    def __init__(
        self,
        module: Any,
        *,
        input_dim: int | None = None,
        output_dim: int | None = None,
        output_kind: OutputKind = OutputKind.LOGITS,
    ) -> None:
        torch = import_torch()
        if not isinstance(module, torch.nn.Module):
            raise InputError(f"TorchOracle expects a torch.nn.Module, found {type(module).__name__}")
        linears = [m for m in module.modules() if isinstance(m, torch.nn.Linear)]
        if input_dim is None or output_dim is None:
            if not linears:
                raise InputError(
                    f"cannot infer the input and output sizes of a {type(module).__name__} without Linear "
                    "layers; pass input_dim and output_dim"
                )
        self._d = int(input_dim if input_dim is not None else linears[0].in_features)
        self._k = int(output_dim if output_dim is not None else linears[-1].out_features)
        if self._d < 1 or self._k < 1:
            raise InputError(f"input and output sizes must be >= 1, found {self._d} and {self._k}")
        params = [p for p in module.parameters() if p.dtype.is_floating_point]
        self._dtype = params[0].dtype if params else torch.float64
        self._module = module
        self._kind = output_kind

    def query(self, X: FloatArray) -> FloatArray:
        torch = import_torch()
        A = as_query_batch(X, self._d)
        try:
            with torch.no_grad():
                T = torch.from_numpy(A.copy()).to(self._dtype)
                Y = self._module(T).detach().to(device="cpu", dtype=torch.float64).numpy()
        except Exception as exc:
            raise OracleError(f"the torch module failed on a batch of {A.shape[0]}: {short(exc)}") from exc
        return check_answer(np.asarray(Y), A.shape[0], self._k, f"torch module {type(self._module).__name__}")

    def __repr__(self) -> str:
        return f"TorchOracle({type(self._module).__name__}, {self._d}->{self._k})"


__all__ = ["TorchOracle"]
