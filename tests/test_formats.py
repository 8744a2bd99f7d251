"""Model formats: round trips, hand-made ONNX graphs, Keras layouts, torch and sklearn, bad input."""

from __future__ import annotations

import io
import json
import pickle
import zipfile
import zlib
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from relux.cli import main as cli_main
from relux.errors import InputError
from relux.formats import load_model, oracle_from_file, save_model
from relux.formats.exchange import load_npz
from relux.formats.keras_io import load_keras
from relux.formats.onnx_io import model_to_onnx, onnx_to_model
from relux.model import MLP
from relux.oracle import MLPOracle, OutputKind
from relux.oracle.onnx_oracle import ONNXOracle

U = 2.0**-53  # unit roundoff of float64


# --------------------------------------------------------------------------- helpers
def random_mlp(rng: np.random.Generator, arch: tuple[int, ...], activation: str = "linear") -> MLP:
    return MLP(
        [
            (rng.normal(size=(o, i)) / np.sqrt(i), rng.normal(size=o))
            for i, o in zip(arch, arch[1:], strict=False)
        ],
        activation,
    )


def fp_bound(model: MLP, X: np.ndarray) -> np.ndarray:
    """Bound on |computed - exact| for ANY float64 evaluation order of the forward pass, per output.

    A sum of n products computed in any order (with or without FMA) errs by at most
    gamma_n * sum|a_i b_i|, gamma_n = n u / (1 - n u) (Higham, Accuracy and Stability, Thm 3.1 / 3.5).
    With the bias that is n + 1 terms; input errors E propagate through |W| (ReLU is 1-Lipschitz):
    E' = |W| E + gamma (|W| (|h| + E) + |b|). Two implementations (numpy/BLAS vs onnxruntime or torch)
    are each within E of the exact value, so they differ by at most 2 E. This is ~1e-15 relative.
    """
    H = np.abs(np.asarray(X, dtype=np.float64))
    E = np.zeros_like(H)
    for i, (W, b) in enumerate(model.layers):
        n = W.shape[1] + 1
        gamma = n * U / (1 - n * U)
        A = np.abs(W)
        E = E @ A.T + gamma * ((H + E) @ A.T + np.abs(b))
        H = H @ A.T + np.abs(b)
        if i < len(model.layers) - 1:
            H = np.maximum(H, 0)  # |relu(z)| <= |z| <= |W||h| + |b|
    return 2 * E


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def run_ort(path_or_proto: Any, X: np.ndarray) -> np.ndarray:
    data = (
        path_or_proto.SerializeToString()
        if isinstance(path_or_proto, onnx.ModelProto)
        else str(path_or_proto)
    )
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    dtype = np.float32 if inp.type == "tensor(float)" else np.float64
    return np.asarray(sess.run(None, {inp.name: X.astype(dtype)})[0], dtype=np.float64)


ARCHS = [(3, 1), (5, 4, 2), (7, 6, 5, 3), (4, 8, 8, 8, 1)]
ACTIVATIONS = ["linear", "softmax", "sigmoid"]


# --------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("ext", ["npz", "safetensors", "pt", "pth", "onnx"])
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_round_trip_is_bitwise(tmp_path: Path, ext: str, arch: tuple[int, ...], activation: str) -> None:
    rng = np.random.default_rng(zlib.crc32(repr((ext, arch, activation)).encode()))
    model = random_mlp(rng, arch, activation)
    path = tmp_path / f"model.{ext}"
    save_model(model, path)
    back = load_model(path)
    # Every format stores float64 tensors verbatim, so the weights come back bit for bit, and the same
    # weights in the same (C) layout give bitwise-identical forward passes.
    assert back == model
    assert back.output_activation == activation
    X = rng.normal(size=(20, arch[0]))
    assert np.array_equal(back.forward(X), model.forward(X))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_onnx_file_runs_in_onnxruntime(tmp_path: Path, arch: tuple[int, ...], activation: str) -> None:
    rng = np.random.default_rng(len(arch) + 10 * ACTIVATIONS.index(activation))
    model = random_mlp(rng, arch, activation)
    path = tmp_path / "m.onnx"
    save_model(model, path)
    X = rng.normal(size=(50, arch[0]))
    logits = model.forward(X)
    got = run_ort(path, X)
    bound = fp_bound(model, X)
    if activation == "linear":
        assert np.all(np.abs(got - logits) <= bound)
    else:
        # softmax and sigmoid have derivatives bounded by 1 (in the max norm), so the logit bound carries
        # over, plus a few ulps for exp and the division.
        ref = softmax(logits) if activation == "softmax" else sigmoid(logits)
        assert np.all(np.abs(got - ref) <= bound.max(axis=1, keepdims=True) + 8 * U)
    # The oracle drops the final activation and answers logits.
    oracle = oracle_from_file(path)
    assert isinstance(oracle, ONNXOracle)
    assert oracle.output_kind is OutputKind.LOGITS
    assert (oracle.input_dim, oracle.output_dim) == (arch[0], arch[-1])
    assert np.all(np.abs(oracle.query(X) - logits) <= bound)
    raw = ONNXOracle(path, logits=False)
    expected_kind = OutputKind.LOGITS if activation == "linear" else OutputKind.PROBABILITIES
    assert raw.output_kind is expected_kind
    assert oracle.query(np.empty((0, arch[0]))).shape == (0, arch[-1])


def test_writer_is_valid_onnx_with_metadata() -> None:
    model = random_mlp(np.random.default_rng(0), (4, 3, 2), "softmax")
    proto = model_to_onnx(model)
    onnx.checker.check_model(proto, full_check=True)
    props = {p.key: p.value for p in proto.metadata_props}
    assert props == {"relux.arch": "4-3-2", "relux.output_activation": "softmax"}
    assert [n.op_type for n in proto.graph.node] == ["Gemm", "Relu", "Gemm", "Softmax"]
    assert all(t.data_type == TensorProto.DOUBLE for t in proto.graph.initializer)


def test_oracle_from_file_other_formats(tmp_path: Path) -> None:
    model = random_mlp(np.random.default_rng(1), (5, 4, 3))
    save_model(model, tmp_path / "m.npz")
    oracle = oracle_from_file(tmp_path / "m.npz")
    assert isinstance(oracle, MLPOracle)
    X = np.random.default_rng(2).normal(size=(6, 5))
    assert np.array_equal(oracle.query(X), model.forward(X))


def test_save_is_atomic_and_overwrites(tmp_path: Path) -> None:
    a = random_mlp(np.random.default_rng(3), (3, 2, 1))
    b = random_mlp(np.random.default_rng(4), (3, 5, 1))
    path = tmp_path / "m.safetensors"
    save_model(a, path)
    save_model(b, path)
    assert load_model(path) == b
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]  # no temp files left


# --------------------------------------------------------------------------- hand-built ONNX graphs
def _vi(name: str, elem: int, width: int) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, ["n", width])


def _model(
    nodes: list[onnx.NodeProto],
    inits: list[np.ndarray],
    names: list[str],
    d: int,
    k: int,
    elem: int = TensorProto.DOUBLE,
    out: str = "y",
) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "g",
        [_vi("x", elem, d)],
        [_vi(out, elem, k)],
        initializer=[numpy_helper.from_array(a, n) for a, n in zip(inits, names, strict=True)],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_onnx_matmul_add_float32() -> None:
    rng = np.random.default_rng(5)
    W1, b1 = rng.normal(size=(6, 4)).astype(np.float32), rng.normal(size=6).astype(np.float32)
    W2, b2 = rng.normal(size=(2, 6)).astype(np.float32), rng.normal(size=2).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "k1"], ["h1"]),
        helper.make_node("Add", ["h1", "c1"], ["z1"]),
        helper.make_node("Relu", ["z1"], ["a1"]),
        helper.make_node("MatMul", ["a1", "k2"], ["h2"]),
        helper.make_node("Add", ["c2", "h2"], ["y"]),  # bias on the left is fine too
    ]
    proto = _model(
        nodes, [W1.T.copy(), b1, W2.T.copy(), b2], ["k1", "c1", "k2", "c2"], 4, 2, TensorProto.FLOAT
    )
    model = onnx_to_model(proto)
    # float32 -> float64 conversion is exact, so the weights must match bit for bit.
    assert model == MLP([(W1, b1), (W2, b2)])
    X = rng.normal(size=(30, 4))
    oracle = ONNXOracle(proto)  # float32 input: queries are cast
    ref = model.forward(X.astype(np.float32).astype(np.float64))
    # onnxruntime computes in float32: relative error ~ n * 2^-24 per layer; 1e-5 of the scale is loose.
    scale = np.abs(ref).max() + 1
    assert np.allclose(oracle.query(X), ref, rtol=0, atol=1e-5 * scale)


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("c_shape", ["vector", "row", "scalar", "none"])
def test_onnx_gemm_attributes(trans_b: int, c_shape: str) -> None:
    rng = np.random.default_rng(6 + trans_b)
    W1, b1 = rng.normal(size=(5, 3)), rng.normal(size=5)
    W2 = rng.normal(size=(2, 5))
    c2 = {
        "vector": rng.normal(size=2),
        "row": rng.normal(size=(1, 2)),
        "scalar": np.array(0.7),
        "none": None,
    }[c_shape]
    B2 = W2 if trans_b else W2.T.copy()
    inits, names = [W1, b1, B2], ["w1", "b1", "B2"]
    gemm2_inputs = ["a1", "B2"]
    if c2 is not None:
        inits.append(c2)
        names.append("c2")
        gemm2_inputs.append("c2")
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["z1"], transB=1),
        helper.make_node("Relu", ["z1"], ["r1"]),
        helper.make_node("Identity", ["r1"], ["a1"]),
        helper.make_node("Gemm", gemm2_inputs, ["y"], transB=trans_b, alpha=0.5, beta=2.0),
    ]
    proto = _model(nodes, inits, names, 3, 2)
    model = onnx_to_model(proto)
    bias = np.zeros(2) if c2 is None else 2.0 * np.broadcast_to(np.asarray(c2).reshape(-1), (2,))
    assert model == MLP([(W1, b1), (0.5 * W2, bias)])
    X = rng.normal(size=(40, 3))
    # Scaling by alpha = 0.5 and beta = 2 is exact in binary, so only summation order differs.
    assert np.all(np.abs(run_ort(proto, X) - model.forward(X)) <= fp_bound(model, X))


def test_onnx_gemm_without_c_then_add_and_constant_node() -> None:
    rng = np.random.default_rng(8)
    W, b = rng.normal(size=(2, 3)), rng.normal(size=2)
    nodes = [
        helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(W, "w")),
        helper.make_node("Gemm", ["x", "w"], ["z"], transB=1),
        helper.make_node("Add", ["z", "b"], ["y"]),
    ]
    model = onnx_to_model(_model(nodes, [b], ["b"], 3, 2))
    assert model == MLP([(W, b)])


def test_onnx_matmul_without_bias_and_final_sigmoid() -> None:
    W = np.random.default_rng(9).normal(size=(1, 3))
    nodes = [helper.make_node("MatMul", ["x", "k"], ["z"]), helper.make_node("Sigmoid", ["z"], ["y"])]
    model = onnx_to_model(_model(nodes, [W.T.copy()], ["k"], 3, 1))
    assert model == MLP([(W, np.zeros(1))], "sigmoid")
    assert model.output_activation == "sigmoid"


def _gemm(x: str, w: str, b: str, y: str) -> onnx.NodeProto:
    return helper.make_node("Gemm", [x, w, b], [y], transB=1)


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("conv", "'Conv'"),
        ("tanh", "'Tanh'"),
        ("no_relu", "no Relu between"),
        ("ends_relu", "ends with Relu"),
        ("softmax_middle", "follows the final activation"),
        ("branch", "single chain"),
        ("weights_from_input", "not a constant"),
        ("custom_domain", "domain"),
    ],
)
def test_onnx_unsupported_graphs(tmp_path: Path, case: str, message: str) -> None:
    W1, b1, W2, b2 = np.ones((3, 3)), np.zeros(3), np.ones((2, 3)), np.zeros(2)
    inits, names = [W1, b1, W2, b2], ["w1", "b1", "w2", "b2"]
    relu = helper.make_node("Relu", ["z1"], ["a1"])
    last = _gemm("a1", "w2", "b2", "y")
    nodes = {
        "conv": [helper.make_node("Conv", ["x", "w1"], ["z1"]), relu, last],
        "tanh": [_gemm("x", "w1", "b1", "z1"), helper.make_node("Tanh", ["z1"], ["a1"]), last],
        "no_relu": [
            _gemm("x", "w1", "b1", "z1"),
            helper.make_node("Gemm", ["z1", "w2", "b2"], ["y"], transB=1),
        ],
        "ends_relu": [
            _gemm("x", "w1", "b1", "z1"),
            relu,
            _gemm("a1", "w2", "b2", "z2"),
            helper.make_node("Relu", ["z2"], ["y"]),
        ],
        "softmax_middle": [
            _gemm("x", "w1", "b1", "z1"),
            helper.make_node("Softmax", ["z1"], ["a1"]),
            helper.make_node("Relu", ["a1"], ["y"]),
        ],
        "branch": [_gemm("x", "w1", "b1", "z1"), relu, _gemm("x", "w1", "b1", "q"), last],
        "weights_from_input": [helper.make_node("Gemm", ["x", "x", "b1"], ["z1"]), relu, last],
        "custom_domain": [
            helper.make_node("FusedGemm", ["x", "w1", "b1"], ["z1"], domain="com.microsoft"),
            relu,
            last,
        ],
    }[case]
    proto = _model(nodes, inits, names, 3, 2)
    path = tmp_path / "bad.onnx"
    path.write_bytes(proto.SerializeToString())
    with pytest.raises(InputError, match=message):
        load_model(path)


def test_onnx_conv_message_names_the_op(tmp_path: Path) -> None:
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], name="conv1")]
    path = tmp_path / "conv.onnx"
    path.write_bytes(_model(nodes, [np.ones((2, 3, 1))], ["w"], 3, 2).SerializeToString())
    with pytest.raises(InputError, match=r"node 'conv1' \(Conv\).*op 'Conv' is not supported"):
        load_model(path)


def test_onnx_external_data_is_refused(tmp_path: Path) -> None:
    proto = model_to_onnx(random_mlp(np.random.default_rng(0), (3, 2)))
    t = proto.graph.initializer[0]
    t.data_location = TensorProto.EXTERNAL
    t.ClearField("raw_data")
    entry = t.external_data.add()
    entry.key, entry.value = "location", "/etc/passwd"
    path = tmp_path / "ext.onnx"
    path.write_bytes(proto.SerializeToString())
    with pytest.raises(InputError, match="external data"):
        load_model(path)
    with pytest.raises(InputError, match="external data"):
        oracle_from_file(path)


def test_onnx_oracle_rejects_image_input(tmp_path: Path) -> None:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.DOUBLE, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.DOUBLE, [1, 3, 8, 8])],
    )
    path = tmp_path / "img.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)
    with pytest.raises(InputError, match="rank 4"):
        oracle_from_file(path)


# --------------------------------------------------------------------------- Keras layouts (synthetic)
def _dense_cfg(name: str, units: int, activation: Any) -> dict[str, Any]:
    return {
        "class_name": "Dense",
        "name": name,
        "config": {"name": name, "units": units, "activation": activation, "use_bias": True},
    }


def _keras_zip(
    path: Path, layers_cfg: list[dict[str, Any]], weights: dict[str, np.ndarray], cls: str = "Sequential"
) -> Path:
    buf = io.BytesIO()
    with h5py.File(buf, "w") as h5:
        for name, arr in weights.items():
            h5.create_dataset(name, data=arr)
        h5.create_group("optimizer/vars").create_dataset("0", data=np.int64(3))
    config = {"class_name": cls, "config": {"name": "m", "layers": layers_cfg}}
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("metadata.json", json.dumps({"keras_version": "3.0.0"}))
        zf.writestr("config.json", json.dumps(config))
        zf.writestr("model.weights.h5", buf.getvalue())
    return path


def test_keras_zip_orders_groups_by_numeric_suffix_with_backslashes(tmp_path: Path) -> None:
    """11 Dense layers of distinct widths: 'dense_10' must come after 'dense_9', not after 'dense_1'."""
    rng = np.random.default_rng(10)
    arch = tuple(range(3, 15))  # 3-4-...-14, so any misordering breaks the shape chain
    model = random_mlp(rng, arch)
    layers_cfg: list[dict[str, Any]] = [{"class_name": "InputLayer", "name": "in", "config": {"name": "in"}}]
    weights: dict[str, np.ndarray] = {}
    for i, (W, b) in enumerate(model.layers):
        last = i == len(model.layers) - 1
        layers_cfg.append(_dense_cfg(f"layer{i}", W.shape[0], "linear" if last else "relu"))
        group = "dense" if i == 0 else f"dense_{i}"
        sep = "\\" if i % 2 else "/"  # mix Windows and POSIX separators
        weights[f"layers{sep}{group}/vars/0"] = W.T
        weights[f"layers{sep}{group}/vars/1"] = b
    path = _keras_zip(tmp_path / "m.keras", layers_cfg, weights)
    assert load_model(path) == model


def test_keras_zip_activation_layer_and_dict_activation(tmp_path: Path) -> None:
    rng = np.random.default_rng(11)
    model = random_mlp(rng, (4, 3, 2), "softmax")
    (W1, b1), (W2, b2) = model.layers
    layers_cfg = [
        _dense_cfg("a", 3, None),
        {"class_name": "Activation", "name": "act", "config": {"name": "act", "activation": "relu"}},
        {"class_name": "Dropout", "name": "drop", "config": {"name": "drop", "rate": 0.5}},
        _dense_cfg("b", 2, {"module": "keras.activations", "class_name": "function", "config": "softmax"}),
    ]
    weights = {
        "layers/dense/vars/0": W1.T,
        "layers/dense/vars/1": b1,
        "layers/dense_1/vars/0": W2.T,
        "layers/dense_1/vars/1": b2,
    }
    back = load_model(_keras_zip(tmp_path / "m.keras", layers_cfg, weights))
    assert back == model and back.output_activation == "softmax"


@pytest.mark.parametrize(
    ("layers_cfg", "message"),
    [
        (
            [
                {"class_name": "Conv2D", "name": "conv2d", "config": {"name": "conv2d"}},
                _dense_cfg("d", 2, "linear"),
            ],
            "layer 'conv2d' of type Conv2D is not supported: relux reads Dense layers with ReLU",
        ),
        (
            [_dense_cfg("h", 3, "tanh"), _dense_cfg("o", 2, "linear")],
            "hidden layer 'h' has activation 'tanh'",
        ),
        ([_dense_cfg("h", 3, "relu"), _dense_cfg("o", 2, "relu")], "output layer 'o' has activation 'relu'"),
    ],
)
def test_keras_unsupported_layers(tmp_path: Path, layers_cfg: list[dict[str, Any]], message: str) -> None:
    path = _keras_zip(tmp_path / "m.keras", layers_cfg, {})
    with pytest.raises(InputError, match=message):
        load_model(path)


def test_keras_zip_shapes_must_chain(tmp_path: Path) -> None:
    layers_cfg = [_dense_cfg("a", 3, "relu"), _dense_cfg("b", 2, "linear")]
    weights = {
        "layers/dense/vars/0": np.ones((4, 3)),
        "layers/dense/vars/1": np.zeros(3),
        "layers/dense_1/vars/0": np.ones((5, 2)),
        "layers/dense_1/vars/1": np.zeros(2),
    }
    with pytest.raises(InputError, match="do not chain"):
        load_model(_keras_zip(tmp_path / "m.keras", layers_cfg, weights))


def test_keras_zip_missing_weights(tmp_path: Path) -> None:
    layers_cfg = [_dense_cfg("a", 3, "relu"), _dense_cfg("b", 2, "linear")]
    weights = {"layers/dense/vars/0": np.ones((4, 3)), "layers/dense/vars/1": np.zeros(3)}
    with pytest.raises(InputError, match="declares 2 Dense layers but model.weights.h5 has 1"):
        load_model(_keras_zip(tmp_path / "m.keras", layers_cfg, weights))


def test_keras_functional_branches_rejected(tmp_path: Path) -> None:
    def layer(name: str, units: int, act: str, src: str) -> dict[str, Any]:
        cfg = _dense_cfg(name, units, act)
        cfg["inbound_nodes"] = [[[src, 0, 0, {}]]]
        return cfg

    layers_cfg = [
        {"class_name": "InputLayer", "name": "in", "config": {"name": "in"}, "inbound_nodes": []},
        layer("a", 3, "relu", "in"),
        layer("b", 3, "relu", "in"),
    ]
    with pytest.raises(InputError, match="plain chain"):
        load_model(_keras_zip(tmp_path / "m.keras", layers_cfg, {}, cls="Functional"))


def _legacy_h5(path: Path, model: MLP, names: list[str]) -> Path:
    layers_cfg: list[dict[str, Any]] = [
        {"class_name": "InputLayer", "name": "input", "config": {"name": "input"}}
    ]
    with h5py.File(path, "w") as h5:
        mw = h5.create_group("model_weights")
        for i, ((W, b), name) in enumerate(zip(model.layers, names, strict=True)):
            last = i == len(model.layers) - 1
            layers_cfg.append(_dense_cfg(name, W.shape[0], model.output_activation if last else "relu"))
            g = mw.create_group(name)
            g.attrs["weight_names"] = [f"{name}/kernel:0".encode(), f"{name}/bias:0".encode()]
            g.create_dataset(f"{name}/kernel:0", data=W.T)
            g.create_dataset(f"{name}/bias:0", data=b)
        h5.attrs["model_config"] = json.dumps({"class_name": "Sequential", "config": {"layers": layers_cfg}})
    return path


@pytest.mark.parametrize("suffix", [".h5", ".keras"])
def test_keras_legacy_hdf5(tmp_path: Path, suffix: str) -> None:
    model = random_mlp(np.random.default_rng(12), (5, 4, 4, 3), "sigmoid")
    # Names sort differently from the layer order: the config, not the file, gives the order.
    path = _legacy_h5(tmp_path / f"m{suffix}", model, ["zeta", "alpha", "mid"])
    back = load_model(path)
    assert back == model and back.output_activation == "sigmoid"


def test_keras_weights_only_hdf5(tmp_path: Path) -> None:
    path = tmp_path / "w.h5"
    with h5py.File(path, "w") as h5:
        h5.create_dataset("dense/kernel:0", data=np.ones((2, 2)))
    with pytest.raises(InputError, match="model_config"):
        load_model(path)


def test_keras_is_read_only(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not write"):
        save_model(random_mlp(np.random.default_rng(0), (2, 1)), tmp_path / "m.keras")


# --------------------------------------------------------------------------- torch adapter
def test_torch_adapter_round_trip_and_forward() -> None:
    torch = pytest.importorskip("torch")
    from relux.formats.torch_io import from_torch, to_torch
    from relux.oracle.torch_oracle import TorchOracle

    rng = np.random.default_rng(13)
    model = random_mlp(rng, (6, 5, 5, 3), "softmax")
    seq = to_torch(model)
    assert [type(m).__name__ for m in seq] == ["Linear", "ReLU", "Linear", "ReLU", "Linear"]
    assert all(p.dtype == torch.float64 for p in seq.parameters())
    back = from_torch(seq)
    assert back == model and back.output_activation == "linear"  # logits module: no activation layer
    with_act = to_torch(model, include_output_activation=True)
    assert from_torch(with_act).output_activation == "softmax"
    X = rng.normal(size=(40, 6))
    with torch.no_grad():
        got = seq(torch.from_numpy(X)).numpy()
    # torch and numpy may order the sums differently: compare within the rigorous float64 bound.
    assert np.all(np.abs(got - model.forward(X)) <= fp_bound(model, X))
    oracle = TorchOracle(seq)
    assert (oracle.input_dim, oracle.output_dim, oracle.output_kind) == (6, 3, OutputKind.LOGITS)
    assert np.all(np.abs(oracle.query(X) - model.forward(X)) <= fp_bound(model, X))


def test_torch_state_dict_loads_into_torch(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from relux.formats.torch_io import to_torch

    model = random_mlp(np.random.default_rng(14), (4, 3, 2), "sigmoid")
    path = tmp_path / "m.pt"
    save_model(model, path)
    state = torch.load(path, weights_only=True)
    fresh = to_torch(random_mlp(np.random.default_rng(15), (4, 3, 2)))
    fresh.load_state_dict(state)  # strict: the file is a plain nn.Sequential state_dict
    assert torch.equal(fresh[0].weight, torch.from_numpy(model.layers[0][0].copy()))


def test_torch_float32_module_and_bias_free_linear() -> None:
    torch = pytest.importorskip("torch")
    from relux.formats.torch_io import from_torch
    from relux.oracle.torch_oracle import TorchOracle

    torch.manual_seed(0)
    seq = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2, bias=False))
    model = from_torch(seq)
    assert np.array_equal(model.layers[1][1], np.zeros(2))
    X = np.random.default_rng(16).normal(size=(10, 3))
    ref = model.forward(X.astype(np.float32).astype(np.float64))
    # The module computes in float32: a few float32 ulps of the scale.
    assert np.allclose(TorchOracle(seq).query(X), ref, rtol=0, atol=1e-5 * (np.abs(ref).max() + 1))


def test_torch_rejects_other_layers(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from relux.formats.torch_io import from_torch

    with pytest.raises(InputError, match="layer 1 of type Tanh is not supported"):
        from_torch(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Tanh(), torch.nn.Linear(2, 1)))
    with pytest.raises(InputError, match="Conv1d"):
        from_torch(torch.nn.Sequential(torch.nn.Conv1d(1, 1, 2)))
    with pytest.raises(InputError, match="Module"):
        from_torch(torch.nn.Module())
    # A whole pickled module is refused by weights_only loading.
    path = tmp_path / "module.pt"
    torch.save(torch.nn.Sequential(torch.nn.Linear(2, 1)), path)
    with pytest.raises(InputError, match="weights_only"):
        load_model(path)
    # A state_dict with non-Linear entries (BatchNorm statistics).
    bn = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2), torch.nn.Linear(2, 1))
    torch.save(bn.state_dict(), tmp_path / "bn.pt")
    with pytest.raises(InputError, match="running_mean"):
        load_model(tmp_path / "bn.pt")
    # Adjacent Linear layers: nothing between them.
    lin = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    torch.save(lin.state_dict(), tmp_path / "lin.pt")
    with pytest.raises(InputError, match="adjacent"):
        load_model(tmp_path / "lin.pt")


# --------------------------------------------------------------------------- scikit-learn
def _tiny_data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(17)
    X = rng.normal(size=(60, 4))
    return X, X @ np.array([1.0, -2.0, 0.5, 0.0])


@pytest.mark.filterwarnings("ignore:Stochastic Optimizer")
def test_sklearn_classifier_softmax_and_binary() -> None:
    pytest.importorskip("sklearn")
    from sklearn.neural_network import MLPClassifier

    from relux.formats.sklearn_io import from_sklearn

    X, t = _tiny_data()
    y3 = np.digitize(t, [-1.0, 1.0])
    clf = MLPClassifier(hidden_layer_sizes=(5, 4), max_iter=30, random_state=0).fit(X, y3)
    model = from_sklearn(clf)
    assert model.arch == (4, 5, 4, 3) and model.output_activation == "softmax"
    assert np.array_equal(model.layers[0][0], clf.coefs_[0].T)
    # sklearn evaluates the same float64 network with its own BLAS calls: agree to rounding (the
    # probabilities are in [0, 1], so 1e-12 absolute is ~1e4 ulps of slack).
    assert np.allclose(clf.predict_proba(X), softmax(model.forward(X)), rtol=0, atol=1e-12)

    binary = MLPClassifier(hidden_layer_sizes=(3,), max_iter=30, random_state=0).fit(X, t > 0)
    bmodel = from_sklearn(binary)
    assert bmodel.output_dim == 1 and bmodel.output_activation == "sigmoid"
    assert np.allclose(binary.predict_proba(X)[:, 1], sigmoid(bmodel.forward(X))[:, 0], rtol=0, atol=1e-12)


@pytest.mark.filterwarnings("ignore:Stochastic Optimizer")
def test_sklearn_regressor_and_rejections() -> None:
    pytest.importorskip("sklearn")
    from sklearn.linear_model import LinearRegression
    from sklearn.neural_network import MLPRegressor

    from relux.formats.sklearn_io import from_sklearn

    X, t = _tiny_data()
    reg = MLPRegressor(hidden_layer_sizes=(6,), max_iter=30, random_state=0).fit(X, t)
    model = from_sklearn(reg)
    assert model.arch == (4, 6, 1) and model.output_activation == "linear"
    assert np.allclose(reg.predict(X), model.forward(X)[:, 0], rtol=1e-12, atol=1e-12)
    with pytest.raises(InputError, match="activation='tanh'"):
        from_sklearn(MLPRegressor(hidden_layer_sizes=(3,), activation="tanh", max_iter=5).fit(X, t))
    with pytest.raises(InputError, match="not fitted"):
        from_sklearn(MLPRegressor())
    with pytest.raises(InputError, match="LinearRegression"):
        from_sklearn(LinearRegression().fit(X, t))


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("ext", ["npz", "safetensors", "onnx", "keras", "h5", "pt"])
def test_missing_and_corrupt_files(tmp_path: Path, ext: str) -> None:
    with pytest.raises(InputError, match="does not exist"):
        load_model(tmp_path / f"missing.{ext}")
    (tmp_path / f"dir.{ext}").mkdir()
    with pytest.raises(InputError, match="not a regular file"):
        load_model(tmp_path / f"dir.{ext}")
    bad = tmp_path / f"bad.{ext}"
    bad.write_bytes(b"\x00\x01garbage that is no model at all\xff" * 3)
    with pytest.raises(InputError, match=r"bad\."):
        load_model(bad)
    empty = tmp_path / f"empty.{ext}"
    empty.write_bytes(b"")
    with pytest.raises(InputError):
        load_model(empty)


def test_unknown_extension(tmp_path: Path) -> None:
    path = tmp_path / "model.bin"
    path.write_bytes(b"x")
    with pytest.raises(InputError, match=r"extension '\.bin'.*\.npz"):
        load_model(path)
    with pytest.raises(InputError, match="no extension"):
        load_model(tmp_path / "model")
    with pytest.raises(InputError, match=r"'\.txt'"):
        save_model(random_mlp(np.random.default_rng(0), (2, 1)), tmp_path / "m.txt")


def test_pickled_npz_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.npz"
    obj = np.empty(1, dtype=object)
    obj[0] = {"layers.0.weight": np.ones((1, 1))}
    np.savez(path, **{"layers.0.weight": obj, "layers.0.bias": np.zeros(1)})
    with pytest.raises(InputError, match="object array"):
        load_model(path)


def test_npz_wrong_layout(tmp_path: Path) -> None:
    np.savez(tmp_path / "a.npz", W0=np.ones((2, 2)), b0=np.zeros(2))
    with pytest.raises(InputError, match="unexpected entry 'W0'.*layers"):
        load_model(tmp_path / "a.npz")
    np.savez(
        tmp_path / "b.npz",
        **{
            "layers.0.weight": np.ones((2, 2)),
            "layers.0.bias": np.zeros(2),
            "layers.2.weight": np.ones((1, 2)),
            "layers.2.bias": np.zeros(1),
        },
    )
    with pytest.raises(InputError, match="'layers.1.weight' is missing"):
        load_model(tmp_path / "b.npz")
    np.savez(
        tmp_path / "c.npz",
        **{
            "layers.0.weight": np.ones((2, 2)),
            "layers.0.bias": np.zeros(2),
            "output_activation": np.array("tanh"),
        },
    )
    with pytest.raises(InputError, match="'tanh'"):
        load_model(tmp_path / "c.npz")
    np.savez(tmp_path / "d.npz", **{"layers.0.weight": np.array([[np.nan]]), "layers.0.bias": np.zeros(1)})
    with pytest.raises(InputError, match="NaN"):
        load_model(tmp_path / "d.npz")


def test_npz_header_claiming_too_much_data(tmp_path: Path) -> None:
    # A valid .npy header declaring 16 GB of data, followed by only 32 bytes.
    fake = io.BytesIO()
    np.lib.format.write_array_header_1_0(fake, {"descr": "<f8", "fortran_order": False, "shape": (10**9, 2)})
    data = fake.getvalue() + np.zeros(4).tobytes()
    path = tmp_path / "huge.npz"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("layers.0.weight.npy", data)
    with pytest.raises(InputError, match="truncated"):
        load_npz(path)


def test_save_into_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        save_model(random_mlp(np.random.default_rng(0), (2, 1)), tmp_path / "nope" / "m.npz")


def test_pickle_is_never_used_for_npz(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = random_mlp(np.random.default_rng(18), (3, 2))
    save_model(model, tmp_path / "m.npz")

    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("pickle used")

    monkeypatch.setattr(pickle, "loads", boom)
    monkeypatch.setattr(pickle, "load", boom)
    assert load_model(tmp_path / "m.npz") == model


def test_load_keras_rejects_other_bytes(tmp_path: Path) -> None:
    path = tmp_path / "m.keras"
    path.write_bytes(b"GIF89a....")
    with pytest.raises(InputError, match="neither a Keras 3 archive"):
        load_keras(path)


# --------------------------------------------------------------------------- relux convert
def test_cli_convert(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = random_mlp(np.random.default_rng(19), (5, 4, 3), "softmax")
    src, dst = tmp_path / "m.npz", tmp_path / "m.onnx"
    save_model(model, src)
    assert cli_main(["convert", str(src), str(dst)]) == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith(f"wrote {dst} (onnx)") and "5-4-3" in out and "39 params" in out
    assert "\n" not in out
    assert load_model(dst) == model
    # Refuses to overwrite without --force, then overwrites with it.
    assert cli_main(["convert", str(src), str(dst)]) == 2
    assert "--force" in capsys.readouterr().err
    assert cli_main(["convert", "--force", str(src), str(dst)]) == 0
    # Keras is read-only, unknown extensions and missing inputs are input errors.
    assert cli_main(["convert", str(src), str(tmp_path / "x.keras")]) == 2
    assert cli_main(["convert", str(src), str(tmp_path / "x.zip")]) == 2
    assert cli_main(["convert", str(tmp_path / "none.npz"), str(tmp_path / "y.pt")]) == 2
    err = capsys.readouterr().err
    assert err.count("relux: error:") == 3 and "Traceback" not in err
