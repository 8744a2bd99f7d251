"""ONNX models: read chains of Gemm (or MatMul + Add) and Relu, write Gemm + Relu in float64.

Reading accepts a single chain from the one graph input to the one graph output:

* ``Gemm`` (``transA = 0``; ``transB``, ``alpha``, ``beta`` respected; ``C`` optional),
* ``MatMul`` with a constant right operand, optionally followed by ``Add`` of a constant bias,
* ``Relu`` after every hidden affine layer,
* ``Softmax`` or ``Sigmoid`` only as the final node (recorded as the output activation),
* ``Identity`` anywhere, ``Constant`` nodes as weight sources.

Anything else raises :class:`InputError` naming the op. Weights may be float16/32/64; they are converted
to float64 exactly. Tensors stored as external data are refused (the loader never opens other files).

Writing produces opset :data:`OPSET` (IR version :data:`IR_VERSION`), DOUBLE tensors, one ``Gemm``
(``transB = 1``, so weights are stored ``(out, in)``) per layer with ``Relu`` between, and a final
``Softmax``/``Sigmoid`` node when the model declares one, so the file behaves like its source.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from numpy.typing import NDArray
from onnx import TensorProto, helper, numpy_helper

from relux.errors import InputError
from relux.formats._common import (
    LINEAR,
    SIGMOID,
    SOFTMAX,
    as_float64,
    atomic_write_bytes,
    existing_file,
    translate_errors,
)
from relux.model import MLP, format_arch

#: Opset written by :func:`save_onnx` (onnxruntime >= 1.14 runs it).
OPSET = 17
#: IR version matching :data:`OPSET`.
IR_VERSION = 8
#: Element types relux accepts for the graph input.
FLOAT_TYPES: dict[int, type[np.floating[Any]]] = {
    TensorProto.FLOAT: np.float32,
    TensorProto.DOUBLE: np.float64,
}

_FINAL_OPS = {"Softmax": SOFTMAX, "Sigmoid": SIGMOID}
_SUPPORTED = "relux reads Gemm, MatMul+Add and Relu, with Softmax or Sigmoid only as the final node"


# --------------------------------------------------------------------------- reading the file
def read_onnx_proto(path: str | os.PathLike[str]) -> onnx.ModelProto:
    """Parse an ONNX file without following external-data references."""
    p = existing_file(path)
    with translate_errors(p, "an ONNX model"):
        proto = onnx.load_model(str(p), load_external_data=False)
        if not isinstance(proto, onnx.ModelProto) or not proto.HasField("graph"):
            raise InputError(f"'{p}' holds no ONNX graph; the file is corrupt or not an ONNX model")
        for t in proto.graph.initializer:
            if t.data_location == TensorProto.EXTERNAL:
                raise InputError(
                    f"'{p}': initializer {t.name!r} is stored as external data, which relux does not "
                    "follow; re-save the model with all tensors inside the file"
                )
        return proto


@dataclass(frozen=True)
class GraphIO:
    """The single graph input and output of a model: names, element types and static widths."""

    input_name: str
    input_type: int
    input_width: int | None
    output_name: str
    output_type: int
    output_width: int | None


def _last_dim(vi: onnx.ValueInfoProto) -> tuple[int, int | None, int | None]:
    """(elem_type, rank or None, static last dim or None) of a value info."""
    tt = vi.type.tensor_type
    if not vi.type.HasField("tensor_type"):
        return 0, None, None
    if not tt.HasField("shape"):
        return tt.elem_type, None, None
    dims = tt.shape.dim
    if not dims:
        return tt.elem_type, 0, None
    last = dims[-1]
    width = int(last.dim_value) if last.HasField("dim_value") and last.dim_value > 0 else None
    return tt.elem_type, len(dims), width


def graph_io(proto: onnx.ModelProto, source: str) -> GraphIO:
    """Find the single non-initializer input and the single output; check they are 2-D float tensors."""
    g = proto.graph
    init_names = {t.name for t in g.initializer}
    inputs = [vi for vi in g.input if vi.name not in init_names]
    if len(inputs) != 1:
        raise InputError(
            f"{source}: expected one graph input (a batch of vectors), found {len(inputs)}: "
            f"{[vi.name for vi in inputs]}"
        )
    if len(g.output) != 1:
        raise InputError(
            f"{source}: expected one graph output, found {len(g.output)}: {[o.name for o in g.output]}"
        )
    in_type, in_rank, in_width = _last_dim(inputs[0])
    out_type, out_rank, out_width = _last_dim(g.output[0])
    if in_type not in FLOAT_TYPES:
        name = TensorProto.DataType.Name(in_type) if in_type in TensorProto.DataType.values() else in_type
        raise InputError(f"{source}: graph input has element type {name}; expected FLOAT or DOUBLE")
    if in_rank is not None and in_rank != 2:
        raise InputError(
            f"{source}: graph input {inputs[0].name!r} has rank {in_rank}; relux queries batches of "
            "vectors, shape (n, d)"
        )
    if out_rank is not None and out_rank != 2:
        raise InputError(f"{source}: graph output has rank {out_rank}; expected (n, k)")
    return GraphIO(inputs[0].name, in_type, in_width, g.output[0].name, out_type, out_width)


# --------------------------------------------------------------------------- graph -> MLP
@dataclass
class _Affine:
    W: NDArray[np.float64]
    b: NDArray[np.float64]
    has_bias: bool
    node: str


def _node_label(node: onnx.NodeProto) -> str:
    return f"node {node.name!r} ({node.op_type})" if node.name else f"a {node.op_type} node"


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _constant_value(node: onnx.NodeProto) -> NDArray[Any]:
    attrs = _attrs(node)
    if "value" in attrs:
        return numpy_helper.to_array(attrs["value"])
    for key in ("value_float", "value_floats", "value_int", "value_ints"):
        if key in attrs:
            return np.asarray(attrs[key])
    raise InputError(f"{_node_label(node)}: unsupported Constant attributes {sorted(attrs)}")


def _bias_vector(c: NDArray[Any], out: int, label: str) -> NDArray[np.float64]:
    C = as_float64(c, f"{label}: bias")
    if C.size == 1:
        return np.full(out, float(C.reshape(-1)[0]))
    if C.shape in ((out,), (1, out)):
        return C.reshape(out).copy()
    raise InputError(f"{label}: bias of shape {C.shape} does not broadcast to a per-unit bias of size {out}")


def onnx_to_model(proto: onnx.ModelProto, source: str = "ONNX model") -> MLP:
    """Convert a Gemm/MatMul+Add/Relu chain into an :class:`MLP`."""
    g = proto.graph
    io_ = graph_io(proto, source)
    consts: dict[str, NDArray[Any]] = {}
    for t in g.initializer:
        if t.data_location == TensorProto.EXTERNAL:
            raise InputError(f"{source}: initializer {t.name!r} is stored as external data")
        consts[t.name] = numpy_helper.to_array(t)

    def const(name: str, node: onnx.NodeProto, role: str) -> NDArray[Any]:
        if name not in consts:
            raise InputError(
                f"{source}: {_node_label(node)} takes its {role} from {name!r}, which is not a constant "
                f"initializer; {_SUPPORTED}"
            )
        return consts[name]

    cur = io_.input_name
    layers: list[tuple[NDArray[np.float64], NDArray[np.float64]]] = []
    pending: _Affine | None = None
    activation = LINEAR
    final_node: str | None = None
    for node in g.node:
        op = node.op_type
        label = f"{source}: {_node_label(node)}"
        if node.domain not in ("", "ai.onnx"):
            raise InputError(f"{label} is from operator domain {node.domain!r}; {_SUPPORTED}")
        if op == "Constant":
            consts[node.output[0]] = _constant_value(node)
            continue
        if final_node is not None:
            raise InputError(f"{label} follows the final activation {final_node}; {_SUPPORTED}")
        if cur not in node.input:
            raise InputError(
                f"{label} does not take the running activation {cur!r} as input: the graph is not a "
                f"single chain; {_SUPPORTED}"
            )
        if len(node.output) != 1:
            raise InputError(f"{label} has {len(node.output)} outputs; expected 1")
        if op == "Gemm":
            if pending is not None:
                raise InputError(f"{label} follows {pending.node} with no Relu between; {_SUPPORTED}")
            a = _attrs(node)
            if node.input[0] != cur or int(a.get("transA", 0)) != 0:
                raise InputError(f"{label}: expected the activation as input A with transA = 0")
            if len(node.input) < 2:
                raise InputError(f"{label} has no B input")
            B = as_float64(const(node.input[1], node, "weights"), f"{label}: weights")
            if B.ndim != 2:
                raise InputError(f"{label}: weights have shape {B.shape}; expected a matrix")
            W = np.ascontiguousarray(float(a.get("alpha", 1.0)) * (B if int(a.get("transB", 0)) else B.T))
            has_c = len(node.input) > 2 and node.input[2] != ""
            if has_c:
                C = const(node.input[2], node, "bias")
                b = float(a.get("beta", 1.0)) * _bias_vector(C, W.shape[0], label)
            else:
                b = np.zeros(W.shape[0])
            pending = _Affine(W, b, has_c, _node_label(node))
        elif op == "MatMul":
            if pending is not None:
                raise InputError(f"{label} follows {pending.node} with no Relu between; {_SUPPORTED}")
            if node.input[0] != cur:
                raise InputError(f"{label}: expected the activation as the left operand (x @ W)")
            B = as_float64(const(node.input[1], node, "weights"), f"{label}: weights")
            if B.ndim != 2:
                raise InputError(f"{label}: weights have shape {B.shape}; expected a matrix")
            pending = _Affine(np.ascontiguousarray(B.T), np.zeros(B.shape[1]), False, _node_label(node))
        elif op == "Add":
            if pending is None or pending.has_bias:
                raise InputError(
                    f"{label}: an Add is only supported as the bias of a MatMul or of a Gemm without C"
                )
            other = node.input[1] if node.input[0] == cur else node.input[0]
            pending.b = _bias_vector(const(other, node, "bias"), pending.W.shape[0], label)
            pending.has_bias = True
        elif op == "Relu":
            if pending is None:
                raise InputError(f"{label} does not follow an affine layer (Gemm or MatMul)")
            layers.append((pending.W, pending.b))
            pending = None
        elif op == "Identity":
            pass
        elif op in _FINAL_OPS:
            if pending is None:
                raise InputError(f"{label} does not follow the output layer (Gemm or MatMul)")
            if op == "Softmax":
                axis = int(_attrs(node).get("axis", -1))
                if axis not in (-1, 1):
                    raise InputError(f"{label}: softmax over axis {axis}; expected the last axis")
            activation = _FINAL_OPS[op]
            final_node = _node_label(node)
        else:
            raise InputError(f"{label}: ONNX op {op!r} is not supported; {_SUPPORTED}")
        cur = node.output[0]
    if pending is None:
        what = "Relu" if layers else "no affine layer"
        raise InputError(
            f"{source}: the graph ends with {what}; relux models end with a linear (Gemm or MatMul) layer"
        )
    layers.append((pending.W, pending.b))
    if cur != io_.output_name:
        raise InputError(
            f"{source}: the chain ends at {cur!r} but the graph output is {io_.output_name!r}; "
            f"{_SUPPORTED}"
        )
    model = MLP(layers, activation)
    if io_.input_width is not None and io_.input_width != model.input_dim:
        raise InputError(
            f"{source}: graph input has width {io_.input_width} but the first layer expects {model.input_dim}"
        )
    return model


def load_onnx(path: str | os.PathLike[str]) -> MLP:
    """Read an ONNX file into an :class:`MLP` (see the module docstring for what is accepted)."""
    proto = read_onnx_proto(path)
    p = Path(path)
    with translate_errors(p, "an ONNX model"):
        return onnx_to_model(proto, f"'{p}'")


# --------------------------------------------------------------------------- MLP -> graph
def model_to_onnx(model: MLP, *, input_name: str = "input", output_name: str = "output") -> onnx.ModelProto:
    """A float64 Gemm + Relu graph computing ``model`` (plus its output activation, if any)."""
    inits: list[TensorProto] = []
    nodes: list[onnx.NodeProto] = []
    cur = input_name
    last = len(model.layers) - 1
    final_act = model.output_activation != LINEAR
    for i, (W, b) in enumerate(model.layers):
        w_name, b_name = f"layers.{i}.weight", f"layers.{i}.bias"
        inits.append(numpy_helper.from_array(np.ascontiguousarray(W, dtype=np.float64), w_name))
        inits.append(numpy_helper.from_array(np.ascontiguousarray(b, dtype=np.float64), b_name))
        out = output_name if (i == last and not final_act) else f"layers.{i}.linear"
        nodes.append(helper.make_node("Gemm", [cur, w_name, b_name], [out], name=f"gemm_{i}", transB=1))
        cur = out
        if i < last:
            nodes.append(helper.make_node("Relu", [cur], [f"layers.{i}.relu"], name=f"relu_{i}"))
            cur = f"layers.{i}.relu"
    if model.output_activation == SOFTMAX:
        nodes.append(helper.make_node("Softmax", [cur], [output_name], name="softmax", axis=-1))
    elif model.output_activation == SIGMOID:
        nodes.append(helper.make_node("Sigmoid", [cur], [output_name], name="sigmoid"))
    graph = helper.make_graph(
        nodes,
        "relux_mlp",
        [helper.make_tensor_value_info(input_name, TensorProto.DOUBLE, ["batch", model.input_dim])],
        [helper.make_tensor_value_info(output_name, TensorProto.DOUBLE, ["batch", model.output_dim])],
        initializer=inits,
    )
    proto = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="relux", ir_version=IR_VERSION
    )
    helper.set_model_props(
        proto, {"relux.arch": format_arch(model.arch), "relux.output_activation": model.output_activation}
    )
    onnx.checker.check_model(proto)
    return proto


def save_onnx(model: MLP, path: str | os.PathLike[str]) -> Path:
    """Write ``model`` as a float64 ONNX file that onnxruntime runs."""
    return atomic_write_bytes(path, model_to_onnx(model).SerializeToString())
