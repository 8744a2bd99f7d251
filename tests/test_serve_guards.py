"""The server's guards and protocol details, probed with raw HTTP requests (http.client)."""

from __future__ import annotations

import http.client
import json
import logging
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pytest
from starlette.types import ASGIApp

from relux.errors import InputError
from relux.model import MLP
from relux.serve import background_server, create_app

D, K = 5, 2
V2 = "/v2/models/model"
V1 = "/v1/models/model"


def small_mlp() -> MLP:
    rng = np.random.default_rng(0)
    return MLP([(rng.normal(size=(4, D)), rng.normal(size=4)), (rng.normal(size=(K, 4)), rng.normal(size=K))])


class Client:
    """Raw requests to one server; answers are (status, headers, decoded JSON body)."""

    def __init__(self, base: str) -> None:
        parts = urlsplit(base)
        self.host, self.port = parts.hostname or "", parts.port or 80

    def send(
        self,
        method: str,
        path: str,
        body: bytes | Iterator[bytes] | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, http.client.HTTPMessage, Any]:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=5)
        try:
            chunked = body is not None and not isinstance(body, bytes)
            conn.request(method, path, body=body, headers=headers or {}, encode_chunked=chunked)
            resp = conn.getresponse()
            return resp.status, resp.headers, json.loads(resp.read())
        finally:
            conn.close()

    def post(self, path: str, payload: Any, headers: dict[str, str] | None = None) -> tuple[int, Any]:
        status, _, body = self.send("POST", path, json.dumps(payload).encode(), headers)
        return status, body


@pytest.fixture
def serve(live_server: Any) -> Any:
    def start(app: ASGIApp) -> Client:
        return Client(live_server(app))

    return start


@pytest.fixture(scope="module")
def default() -> Iterator[Client]:
    """One server with default settings shared by the tests that only look at single answers."""
    with background_server(create_app(small_mlp())) as base:
        yield Client(base)


def v2_request(X: Any, shape: Any = None) -> dict[str, Any]:
    A = np.asarray(X, dtype=np.float64)
    shape = list(A.shape) if shape is None else shape
    return {"inputs": [{"name": "input", "shape": shape, "datatype": "FP64", "data": A.ravel().tolist()}]}


def test_metadata_of_both_protocols(default: Client) -> None:
    client = default
    status, _, meta = client.send("GET", V2)
    assert status == 200
    assert meta["name"] == "model"
    assert meta["inputs"] == [{"name": "input", "datatype": "FP64", "shape": [-1, D]}]
    assert meta["outputs"] == [{"name": "output", "datatype": "FP64", "shape": [-1, K]}]
    status, _, info = client.send("GET", V1)
    assert status == 200 and (info["input_dim"], info["output_dim"]) == (D, K)
    assert info["model_version_status"][0]["state"] == "AVAILABLE"
    assert client.send("GET", "/v2/health/ready")[2] == {"ready": True}
    assert client.send("GET", "/v2/health/live")[2] == {"live": True}


def test_both_protocols_answer_flat_and_nested_data(serve: Any) -> None:
    model = small_mlp()
    app = create_app(model)
    client = serve(app)
    X = np.random.default_rng(1).normal(size=(3, D))
    expected = model.forward(X)
    status, flat = client.post(V2 + "/infer", v2_request(X))
    assert status == 200 and flat["model_name"] == "model"
    out = flat["outputs"][0]
    assert out["shape"] == [3, K] and out["datatype"] == "FP64"
    assert np.array(out["data"]).reshape(3, K).tobytes() == expected.tobytes()
    nested = v2_request(X)
    nested["inputs"][0]["data"] = X.tolist()
    assert client.post(V2 + "/infer", nested)[1]["outputs"][0]["data"] == out["data"]
    status, v1 = client.post(V1 + ":predict", {"instances": X.tolist()})
    assert status == 200 and np.array(v1["predictions"]).tobytes() == expected.tobytes()
    assert app.state.stats.rows_served == 9 and app.state.stats.requests_served == 3
    assert app.state.stats.to_json()["rows_served"] == 9


def test_token_guard(serve: Any) -> None:
    client = serve(create_app(small_mlp(), token="tok-123"))
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic tok-123"}):
        status, resp_headers, body = client.send("GET", V2, headers=headers)
        assert status == 401 and "Bearer" in body["error"]
        assert resp_headers["WWW-Authenticate"].startswith("Bearer")
        assert client.post(V2 + "/infer", v2_request(np.zeros((1, D))), headers)[0] == 401
    assert client.send("GET", "/v2/health/ready")[0] == 401  # every request, health included
    assert client.send("GET", V2, headers={"Authorization": "Bearer tok-123"})[0] == 200


def test_declared_big_body_is_refused_before_reading(serve: Any) -> None:
    client = serve(create_app(small_mlp(), max_body_bytes=1000))
    conn = http.client.HTTPConnection(client.host, client.port, timeout=5)
    try:
        # Announce 1 GB and send none of it: only an answer that does not wait for the body comes back.
        conn.putrequest("POST", V2 + "/infer")
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(10**9))
        conn.endheaders()
        resp = conn.getresponse()
        assert resp.status == 413
        assert "1000000000 bytes exceeds the limit of 1000" in json.loads(resp.read())["error"]
    finally:
        conn.close()


def test_streamed_big_body_is_refused(serve: Any) -> None:
    client = serve(create_app(small_mlp(), max_body_bytes=1000))
    row = b"[0.0, 0.0, 0.0, 0.0, 0.0]"
    chunks = iter([b'{"instances": [' + (row + b", ") * 10, row * 40])
    status, _, body = client.send("POST", V1 + ":predict", chunks)  # chunked: no Content-Length
    assert status == 413 and "limit of 1000 bytes" in body["error"]


@pytest.mark.parametrize("path", [V2 + "/infer", V1 + ":predict"])
@pytest.mark.parametrize("raw", [b"{not json", b"", b"\xff\xfe", b"[" * 100_000, b"[1, 2]"])
def test_malformed_json_is_400(default: Client, path: str, raw: bytes) -> None:
    status, _, body = default.send("POST", path, raw)
    assert status == 400 and isinstance(body["error"], str)


@pytest.mark.parametrize(
    "payload",
    [
        v2_request(np.zeros((2, D + 1))),
        v2_request(np.zeros((2, D)), shape=[2, D, 1]),
        v2_request(np.zeros((2, D)), shape=[D]),
        v2_request(np.zeros((2, D)), shape=[-2, D]),
        v2_request(np.zeros((2, D)), shape=[3, D]),  # data too short for the shape
        v2_request(np.zeros((2, D)), shape="2x5"),
    ],
)
def test_wrong_v2_shape_is_400_naming_the_expected_shape(default: Client, payload: dict[str, Any]) -> None:
    status, body = default.post(V2 + "/infer", payload)
    assert status == 400 and f"[n, {D}]" in body["error"]


@pytest.mark.parametrize(
    "instances", [np.zeros((2, D + 1)).tolist(), [[0.0] * D, [0.0] * (D - 1)], [0.0] * D]
)
def test_wrong_v1_shape_is_400(default: Client, instances: Any) -> None:
    status, body = default.post(V1 + ":predict", {"instances": instances})
    assert status == 400 and (f"[n, {D}]" in body["error"] or "equal-length" in body["error"])


@pytest.mark.parametrize(
    "payload",
    [
        {"inputs": []},
        {"instances_typo": []},
        {"inputs": [{"name": "input", "shape": [1, D], "datatype": "BYTES", "data": ["a"] * D}]},
        {"inputs": [{"name": "input", "shape": [1, D], "datatype": "FP64", "data": ["1"] * D}]},
        {"inputs": [{"name": "input", "shape": [1, D], "datatype": "FP64", "data": [True] * D}]},
        {"inputs": [{"name": "input", "shape": [1, D], "datatype": "FP64"}]},
    ],
)
def test_malformed_requests_are_400(default: Client, payload: dict[str, Any]) -> None:
    status, body = default.post(V2 + "/infer", payload)
    assert status == 400 and body["error"]


@pytest.mark.parametrize("token", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_non_finite_inputs_are_400(serve: Any, token: str) -> None:
    app = create_app(small_mlp())
    client = serve(app)
    tensor = f'{{"name": "input", "shape": [1, {D}], "datatype": "FP64", "data": [0, 0, 0, 0, {token}]}}'
    v2 = f'{{"inputs": [{tensor}]}}'
    v1 = f'{{"instances": [[0, 0, {token}, 0, 0]]}}'
    for path, raw in ((V2 + "/infer", v2), (V1 + ":predict", v1)):
        status, _, body = client.send("POST", path, raw.encode())
        assert status == 400 and "NaN/inf" in body["error"]
    assert app.state.stats.rows_served == 0


def test_unknown_model_and_path_are_404(serve: Any) -> None:
    client = serve(create_app(small_mlp(), name="victim"))
    assert client.send("GET", "/v2/models/model")[0] == 404
    status, body = client.post("/v2/models/model/infer", v2_request(np.zeros((1, D))))
    assert status == 404 and "'victim'" in body["error"]
    status, body = client.post("/v1/models/model:predict", {"instances": [[0.0] * D]})
    assert status == 404 and "'victim'" in body["error"]
    status, _, body = client.send("GET", "/nowhere")
    assert status == 404 and "no such endpoint" in body["error"]
    status, _, body = client.send("GET", "/v2/models/victim/infer")
    assert status == 405 and body["error"]


def test_row_budget_is_429_past_it(serve: Any) -> None:
    app = create_app(small_mlp(), max_queries=5)
    client = serve(app)
    assert client.post(V2 + "/infer", v2_request(np.zeros((3, D))))[0] == 200
    status, body = client.post(V1 + ":predict", {"instances": np.zeros((3, D)).tolist()})
    assert status == 429 and "at most 5 rows" in body["error"]
    assert body["budget_exhausted"] is True and (body["rows_served"], body["max_queries"]) == (3, 5)
    assert client.post(V1 + ":predict", {"instances": np.zeros((2, D)).tolist()})[0] == 200  # fits exactly
    assert client.post(V2 + "/infer", v2_request(np.zeros((1, D))))[0] == 429
    assert app.state.stats.rows_served == 5


def test_single_input_models_accept_flat_instances(serve: Any) -> None:
    model = MLP([(np.array([[2.0], [-1.0]]), np.zeros(2)), (np.array([[1.0, 1.0]]), np.zeros(1))])
    status, body = serve(create_app(model)).post(V1 + ":predict", {"instances": [0.5, -3.0]})
    assert status == 200 and body["predictions"] == [[1.0], [3.0]]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"name": "a/b"},
        {"name": ""},
        {"token": ""},
        {"token": "a b"},
        {"max_body_bytes": 0},
        {"max_queries": -1},
    ],
)
def test_create_app_validates_its_arguments(kwargs: dict[str, Any]) -> None:
    with pytest.raises(InputError):
        create_app(small_mlp(), **kwargs)
    with pytest.raises(InputError):
        create_app("not a model")  # type: ignore[arg-type]


def test_rows_are_logged_as_they_are_served_and_at_shutdown(
    live_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    from relux.serve import background_server

    caplog.set_level(logging.INFO, logger="relux.serve")
    app = create_app(small_mlp(), log_interval=0.0)
    with background_server(app) as base:
        client = Client(base)
        client.post(V2 + "/infer", v2_request(np.zeros((3, D))))
        client.post(V1 + ":predict", {"instances": np.zeros((4, D)).tolist()})
    messages = [r.getMessage() for r in caplog.records if r.name == "relux.serve"]
    assert "model 'model': 3 rows answered in 1 requests" in messages
    assert "model 'model': 7 rows answered in 2 requests" in messages
    assert any("shutting down after answering 7 rows in 2 requests" in m for m in messages)
