"""An oracle that runs an ONNX file with onnxruntime.

Queries arrive as float64; a model whose input is float32 gets them cast (its answers are then float32
precision, cast back to float64). By default a final ``Softmax``/``Sigmoid`` node is removed so the
oracle answers logits, as every oracle built from a file does; pass ``logits=False`` to query the file
as it is (``output_kind`` is then ``PROBABILITIES`` when such a node was found).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from relux.errors import InputError, OracleError
from relux.formats._common import short, translate_errors
from relux.formats.onnx_io import FLOAT_TYPES, graph_io, read_onnx_proto
from relux.oracle.base import FloatArray, OutputKind, ShapedOracle, as_query_batch, check_answer

log = logging.getLogger(__name__)

_FINAL_ACTIVATIONS = ("Softmax", "Sigmoid")


def strip_final_activation(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, str | None]:
    """A copy of ``proto`` without a final Softmax/Sigmoid node, and that node's op (or ``None``)."""
    g = proto.graph
    if len(g.output) != 1:
        return proto, None
    out = g.output[0].name
    for idx in range(len(g.node) - 1, -1, -1):
        node = g.node[idx]
        if out in node.output:
            if node.op_type not in _FINAL_ACTIVATIONS or node.domain not in ("", "ai.onnx"):
                return proto, None
            if len(node.input) != 1 or any(node.input[0] == vi.name for vi in g.input):
                return proto, None
            if any(out in other.input for other in g.node):
                return proto, None
            stripped = onnx.ModelProto()
            stripped.CopyFrom(proto)
            del stripped.graph.node[idx]
            stripped.graph.output[0].name = node.input[0]
            return stripped, node.op_type
    return proto, None


class ONNXOracle(ShapedOracle):
    """Black-box access to the model in an ONNX file, through onnxruntime (CPU)."""

    def __init__(
        self,
        source: str | os.PathLike[str] | onnx.ModelProto,
        *,
        logits: bool = True,
        output_dim: int | None = None,
    ) -> None:
        if isinstance(source, onnx.ModelProto):
            proto, self.name = source, "ONNX model"
            path = Path("<in-memory ONNX model>")
        else:
            proto, self.name = read_onnx_proto(source), f"'{source}'"
            path = Path(source)
        with translate_errors(path, "an ONNX model"):
            io_ = graph_io(proto, self.name)
            original_final = strip_final_activation(proto)[1]
        if logits and original_final is not None:
            proto = strip_final_activation(proto)[0]
            log.info("%s: dropped the final %s node so the oracle answers logits", self.name, original_final)
        if io_.input_width is None:
            raise InputError(
                f"{self.name}: the graph input has no static width; relux needs shape (n, d) with d fixed"
            )
        self._d = io_.input_width
        self._in_name = io_.input_name
        self._in_dtype = FLOAT_TYPES[io_.input_type]
        self._out_name = proto.graph.output[0].name
        self._kind = OutputKind.PROBABILITIES if (original_final and not logits) else OutputKind.LOGITS
        with translate_errors(path, "an ONNX model onnxruntime can run"):
            options = ort.SessionOptions()
            options.log_severity_level = 3
            self._session = ort.InferenceSession(
                proto.SerializeToString(), sess_options=options, providers=["CPUExecutionProvider"]
            )
        if output_dim is not None:
            self._k = int(output_dim)
        elif io_.output_width is not None:
            self._k = io_.output_width
        else:
            with translate_errors(path, "an ONNX model onnxruntime can run"):
                probe = self._run(np.zeros((1, self._d)))
            if probe.ndim != 2:
                raise InputError(f"{self.name}: the graph answers with shape {probe.shape}; expected (n, k)")
            self._k = int(probe.shape[1])
        if self._k < 1:
            raise InputError(f"{self.name}: the graph has {self._k} outputs; expected at least 1")

    def _run(self, A: FloatArray) -> np.ndarray:
        feed = A.astype(self._in_dtype) if self._in_dtype is not np.float64 else A
        (Y,) = self._session.run([self._out_name], {self._in_name: feed})
        return np.asarray(Y)

    def query(self, X: FloatArray) -> FloatArray:
        A = as_query_batch(X, self._d)
        if A.shape[0] == 0:
            return np.empty((0, self._k), dtype=np.float64)
        try:
            Y = self._run(A)
        except Exception as exc:
            raise OracleError(f"onnxruntime failed on {self.name}: {short(exc)}") from exc
        return check_answer(Y.astype(np.float64), A.shape[0], self._k, f"ONNX model {self.name}")

    def __repr__(self) -> str:
        return f"ONNXOracle({self.name}, {self._d}->{self._k}, {self._kind.value})"


__all__ = ["ONNXOracle", "strip_final_activation"]
