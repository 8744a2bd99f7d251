"""HTTP oracle clients against a real uvicorn server: exactness, batching, faults, retries, bad URLs."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Callable, Sequence

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from relux.errors import BudgetExhausted, InputError, OracleError
from relux.model import MLP
from relux.oracle import CallableOracle, OutputKind
from relux.oracle.http import KServeV2Oracle, RemoteOracle, TFServingOracle, oracle_from_url
from relux.oracle.retry import RetryPolicy
from relux.serve import create_app

LiveServer = Callable[[ASGIApp], str]

#: Fast retries for tests: tiny waits, a few seconds at most in total.
FAST = RetryPolicy(max_attempts=50, base_delay=0.001, max_delay=0.01, total_timeout=10.0)

CLIENTS: dict[str, tuple[type[RemoteOracle], str]] = {
    "kserve-v2": (KServeV2Oracle, "/v2/models/{name}"),
    "tf-serving": (TFServingOracle, "/v1/models/{name}"),
}


def random_mlp(arch: Sequence[int], seed: int = 0) -> MLP:
    rng = np.random.default_rng(seed)
    sizes = zip(arch[:-1], arch[1:], strict=True)
    return MLP([(rng.normal(size=(o, i)) / np.sqrt(i), rng.normal(size=o)) for i, o in sizes])


def chunked_forward(model: MLP, X: np.ndarray, rows: int) -> np.ndarray:
    """The exact reference for a client sending ``rows`` rows per request.

    ``MLP.forward`` is not bitwise independent of the batch it is given (BLAS uses other kernels
    for, e.g., a single row: answers differ in the last bit), so the server's answers are compared
    with ``forward`` on the same chunks the client sends.
    """
    return np.concatenate([model.forward(X[i : i + rows]) for i in range(0, len(X), rows)])


def model_url(base: str, protocol: str, name: str = "model") -> str:
    return base + CLIENTS[protocol][1].format(name=name)


def hard_floats(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    """Inputs whose decimal forms are long or extreme: any float32 or short-decimal step would show."""
    X = rng.normal(size=(n, d)) * 10.0 ** rng.integers(-30, 30, size=(n, d))
    X.flat[:6] = [1 / 3, 0.1, -0.0, 5e-324, 2.2250738585072014e-308, 1.7976931348623157e300]
    return X


class FaultInjector:
    """ASGI middleware failing requests to matching paths in a fixed cycle of behaviours.

    ``"ok"`` passes through; ``"500"``/``"503"``/``"400"`` answer that status; ``"429"`` answers 429
    with ``Retry-After: 0``; ``"drop"`` starts a 200 answer and cuts the connection mid-body;
    ``"slow"`` answers after ``slow_seconds`` (longer than the client's timeout).
    """

    def __init__(
        self,
        app: ASGIApp,
        pattern: Sequence[str],
        paths: Sequence[str] = ("/infer", ":predict"),
        slow_seconds: float = 0.6,
    ) -> None:
        self.app = app
        self.pattern = list(pattern)
        self.paths = tuple(paths)
        self.slow_seconds = slow_seconds
        self.seen: list[str] = []
        self._lock = threading.Lock()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].endswith(self.paths):
            await self.app(scope, receive, send)
            return
        with self._lock:
            fault = self.pattern[len(self.seen) % len(self.pattern)]
            self.seen.append(fault)
        if fault == "ok":
            await self.app(scope, receive, send)
            return
        await _drain(receive)
        if fault == "slow":
            await asyncio.sleep(self.slow_seconds)
            await _send(send, 503, b'{"error": "too late"}')
        elif fault == "drop":
            headers = [(b"content-type", b"application/json"), (b"content-length", b"1000")]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": b'{"outputs": [', "more_body": True})
            raise ConnectionAbortedError("injected: connection dropped mid-answer")
        else:
            extra = [(b"retry-after", b"0")] if fault == "429" else []
            await _send(send, int(fault), b'{"error": "injected failure"}', extra)


async def _drain(receive: Receive) -> None:
    message: Message = await receive()
    while message.get("more_body", False):
        message = await receive()


async def _send(send: Send, status: int, body: bytes, extra: list[tuple[bytes, bytes]] | None = None) -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += extra or []
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def free_port() -> int:
    """A loopback port with nothing listening on it (bound then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- exactness, batching, counting --------------------------------------------------------------


@pytest.mark.parametrize("protocol", list(CLIENTS))
def test_answers_are_bitwise_mlp_forward_and_batches_split(live_server: LiveServer, protocol: str) -> None:
    model = random_mlp((6, 16, 16, 3), seed=1)
    app = create_app(model)
    base = live_server(app)
    cls = CLIENTS[protocol][0]
    oracle = cls(model_url(base, protocol), max_batch_rows=16, retry=FAST)
    assert (oracle.input_dim, oracle.output_dim) == (6, 3)
    X = hard_floats(np.random.default_rng(2), 50, 6)
    Y = oracle.query(X)
    # Exact: JSON carries float64 via repr and the server computes with MLP.forward itself.
    assert Y.dtype == np.float64 and Y.tobytes() == chunked_forward(model, X, 16).tobytes()
    assert app.state.stats.rows_served == 50
    assert app.state.stats.requests_served == 4  # 16 + 16 + 16 + 2 rows
    assert oracle.query(X[:0]).shape == (0, 3)
    assert app.state.stats.requests_served == 4  # an empty batch sends nothing


def test_requests_are_also_bounded_in_bytes(live_server: LiveServer) -> None:
    model = random_mlp((40, 4, 2), seed=3)
    app = create_app(model)
    oracle = KServeV2Oracle(model_url(live_server(app), "kserve-v2"), max_request_bytes=10_000, retry=FAST)
    assert oracle.rows_per_request == 10_000 // (25 * 40)  # 25 characters per value at most
    X = np.random.default_rng(0).normal(size=(33, 40))
    assert oracle.query(X).tobytes() == chunked_forward(model, X, oracle.rows_per_request).tobytes()
    assert app.state.stats.requests_served == 4


def test_server_does_not_round_through_float32(live_server: LiveServer) -> None:
    identity = CallableOracle(lambda X: X, input_dim=3, output_dim=3, name="identity")
    base = live_server(create_app(identity, name="id"))
    clients = [cls(model_url(base, p, "id"), retry=FAST) for p, (cls, _) in CLIENTS.items()]

    @settings(max_examples=40, deadline=None)
    @given(arrays(np.float64, (4, 3), elements=st.floats(allow_nan=False, allow_infinity=False)))
    def round_trip(X: np.ndarray) -> None:
        for client in clients:
            assert client.query(X).tobytes() == X.tobytes()  # bit for bit, -0.0 and subnormals included

    round_trip()


def test_concurrent_threads_get_exact_answers(live_server: LiveServer) -> None:
    model = random_mlp((5, 8, 2), seed=4)
    app = create_app(model)
    oracle = TFServingOracle(model_url(live_server(app), "tf-serving"), max_batch_rows=3, retry=FAST)
    batches = [np.random.default_rng(i).normal(size=(10, 5)) for i in range(8)]
    results: dict[int, np.ndarray] = {}

    def work(i: int) -> None:
        results[i] = oracle.query(batches[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, X in enumerate(batches):
        assert results[i].tobytes() == chunked_forward(model, X, 3).tobytes()
    assert app.state.stats.rows_served == 80
    oracle.close()


# -- metadata and URLs --------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", list(CLIENTS))
def test_given_sizes_are_checked_against_metadata(live_server: LiveServer, protocol: str) -> None:
    base = live_server(create_app(random_mlp((4, 3, 2))))
    url = model_url(base, protocol)
    assert oracle_from_url(url, input_dim=4, output_dim=2, retry=FAST).input_dim == 4
    with pytest.raises(InputError, match="5 inputs.*serves one with 4"):
        oracle_from_url(url, input_dim=5, retry=FAST)
    with pytest.raises(InputError, match="3 outputs.*serves one with 2"):
        oracle_from_url(url, output_dim=3, retry=FAST)


def test_oracle_from_url_picks_the_protocol(live_server: LiveServer) -> None:
    base = live_server(create_app(random_mlp((4, 3, 2))))
    assert isinstance(oracle_from_url(base + "/v2/models/model", retry=FAST), KServeV2Oracle)
    assert isinstance(oracle_from_url(base + "/v1/models/model", retry=FAST), TFServingOracle)
    assert isinstance(oracle_from_url(base + "/v2/models/model/infer", retry=FAST), KServeV2Oracle)
    assert isinstance(oracle_from_url(base + "/v1/models/model:predict", retry=FAST), TFServingOracle)
    for bad in (base + "/models/model", "ftp://127.0.0.1/v2/models/m", "not a url"):
        with pytest.raises(InputError):
            oracle_from_url(bad)


@pytest.mark.parametrize("protocol", list(CLIENTS))
def test_refused_connection_is_input_error_at_once(protocol: str) -> None:
    url = model_url(f"http://127.0.0.1:{free_port()}", protocol)
    start = time.monotonic()
    with pytest.raises(InputError, match="connection refused.*relux serve"):
        CLIENTS[protocol][0](url)  # default retry policy: a retry would show in the time
    assert time.monotonic() - start < 1.0


@pytest.mark.parametrize("protocol", list(CLIENTS))
def test_unknown_model_is_input_error_at_once(live_server: LiveServer, protocol: str) -> None:
    url = model_url(live_server(create_app(random_mlp((4, 3, 2)), name="real")), protocol, "wrong")
    start = time.monotonic()
    with pytest.raises(InputError, match=f"{url} answered 404.*'real'"):
        CLIENTS[protocol][0](url)
    assert time.monotonic() - start < 1.0


def test_token_is_sent_and_a_missing_one_is_input_error(live_server: LiveServer) -> None:
    model = random_mlp((4, 3, 2))
    url = model_url(live_server(create_app(model, token="s3cret")), "kserve-v2")
    X = np.ones((2, 4))
    assert KServeV2Oracle(url, token="s3cret", retry=FAST).query(X).tobytes() == model.forward(X).tobytes()
    with pytest.raises(InputError, match="401.*--token"):
        KServeV2Oracle(url, retry=FAST)
    assert "s3cret" not in repr(KServeV2Oracle(url, token="s3cret", retry=FAST))


# -- faults and retries -------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", list(CLIENTS))
def test_transient_faults_are_retried_to_exact_answers(live_server: LiveServer, protocol: str) -> None:
    model = random_mlp((5, 7, 3), seed=5)
    faulty = FaultInjector(create_app(model), ["500", "ok", "503", "429", "drop", "ok", "slow", "ok"])
    base = live_server(faulty)
    oracle = CLIENTS[protocol][0](model_url(base, protocol), max_batch_rows=4, timeout=0.3, retry=FAST)
    X = np.random.default_rng(6).normal(size=(20, 5))
    assert oracle.query(X).tobytes() == chunked_forward(model, X, 4).tobytes()
    assert {"500", "503", "429", "drop", "slow"} <= set(faulty.seen)
    assert faulty.seen.count("ok") == 5  # one success per batch of 4 rows: nothing answered twice


def test_faults_on_the_metadata_request_are_retried_too(live_server: LiveServer) -> None:
    faulty = FaultInjector(create_app(random_mlp((4, 3, 2))), ["503", "500", "ok"], paths=("/model",))
    oracle = KServeV2Oracle(model_url(live_server(faulty), "kserve-v2"), retry=FAST)
    assert oracle.input_dim == 4 and faulty.seen == ["503", "500", "ok"]


@pytest.mark.parametrize("fault", ["503", "drop", "429"])
def test_permanent_failure_gives_up_within_total_timeout(live_server: LiveServer, fault: str) -> None:
    base = live_server(FaultInjector(create_app(random_mlp((4, 3, 2))), [fault]))
    policy = RetryPolicy(max_attempts=10_000, base_delay=0.01, max_delay=0.05, total_timeout=0.5)
    oracle = KServeV2Oracle(model_url(base, "kserve-v2"), timeout=0.3, retry=policy)
    start = time.monotonic()
    with pytest.raises(OracleError, match="still failing.*total timeout 0.5 s"):
        oracle.query(np.zeros((3, 4)))
    # The budget is 0.5 s; the slack covers one in-flight request and thread scheduling.
    assert time.monotonic() - start < 1.5


def test_client_errors_fail_at_once_with_the_server_text(live_server: LiveServer) -> None:
    faulty = FaultInjector(create_app(random_mlp((4, 3, 2))), ["400"])
    oracle = TFServingOracle(model_url(live_server(faulty), "tf-serving"), retry=FAST)
    with pytest.raises(OracleError, match="HTTP 400 Bad Request: injected failure"):
        oracle.query(np.zeros((3, 4)))
    assert faulty.seen == ["400"]


def test_spent_server_budget_raises_budget_exhausted_without_retrying(live_server: LiveServer) -> None:
    app = create_app(random_mlp((4, 3, 2)), max_queries=10)
    oracle = KServeV2Oracle(model_url(live_server(app), "kserve-v2"), retry=FAST)
    oracle.query(np.zeros((8, 4)))
    start = time.monotonic()
    with pytest.raises(BudgetExhausted, match="at most 10 rows") as info:
        oracle.query(np.zeros((8, 4)))
    assert (info.value.queries, info.value.budget) == (8, 10)
    assert time.monotonic() - start < 0.5
    assert app.state.stats.rows_served == 8


class OverflowingOracle:
    """A raw oracle (no answer validation) whose answers contain inf and NaN."""

    input_dim = 2
    output_dim = 2
    output_kind = OutputKind.LOGITS

    def query(self, X: np.ndarray) -> np.ndarray:
        Y = X.copy()
        Y[0, 0] = np.inf
        Y[-1, 1] = np.nan
        return Y


@pytest.mark.parametrize("protocol", list(CLIENTS))
def test_non_finite_answers_are_rejected_not_retried(live_server: LiveServer, protocol: str) -> None:
    app = create_app(OverflowingOracle())
    client = CLIENTS[protocol][0](model_url(live_server(app), protocol), retry=FAST)
    with pytest.raises(OracleError, match="2 NaN/inf values"):
        client.query(np.ones((3, 2)))
    assert app.state.stats.requests_served == 1


def test_a_failing_served_oracle_is_not_retried(live_server: LiveServer) -> None:
    failing = CallableOracle(lambda X: np.full((len(X), 2), np.nan), 2, 2, name="nan")
    app = create_app(failing)
    client = KServeV2Oracle(model_url(live_server(app), "kserve-v2"), retry=FAST)
    start = time.monotonic()
    with pytest.raises(OracleError, match="HTTP 422.*could not answer.*NaN"):
        client.query(np.ones((3, 2)))
    assert time.monotonic() - start < 0.5
    assert app.state.stats.rows_served == 0


def test_wrong_answer_shape_is_oracle_error(live_server: LiveServer) -> None:
    async def liar(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        await _drain(receive)
        if scope["method"] == "GET":
            meta = {"inputs": [{"name": "x", "shape": [-1, 2]}], "outputs": [{"name": "y", "shape": [-1, 3]}]}
            await _send(send, 200, json.dumps(meta).encode())
        else:
            answer = {"outputs": [{"name": "y", "shape": [1, 2], "data": [1.0, 2.0]}]}
            await _send(send, 200, json.dumps(answer).encode())

    client = KServeV2Oracle(live_server(liar) + "/v2/models/liar", retry=FAST)
    assert (client.input_dim, client.output_dim) == (2, 3)
    with pytest.raises(OracleError, match=r"shape \(2,\); expected \(1, 3\)"):
        client.query(np.zeros((1, 2)))


def test_server_restart_mid_run_is_survived() -> None:
    from relux.serve import background_server

    model = random_mlp((4, 3, 2), seed=8)
    app = create_app(model)
    port = free_port()
    sleeps: list[float] = []

    def record_sleep(seconds: float) -> None:
        sleeps.append(seconds)
        time.sleep(seconds)

    X = np.random.default_rng(9).normal(size=(5, 4))
    with background_server(app, port=port) as base:
        patient = RetryPolicy(max_attempts=1000, base_delay=0.01, max_delay=0.05, total_timeout=10.0)
        oracle = KServeV2Oracle(model_url(base, "kserve-v2"), retry=patient, sleep=record_sleep)
        assert oracle.query(X).tobytes() == model.forward(X).tobytes()
    # Restarted at once: the kept-alive connection is stale and is replaced without any wait.
    with background_server(app, port=port):
        assert oracle.query(X).tobytes() == model.forward(X).tobytes()
    assert sleeps == []
    # Down for a while: refused connections are retried until the server is back.
    restarted = threading.Event()

    def restart_later() -> None:
        time.sleep(0.3)
        with background_server(app, port=port):
            restarted.set()
            time.sleep(1.0)

    thread = threading.Thread(target=restart_later)
    thread.start()
    try:
        assert oracle.query(X).tobytes() == model.forward(X).tobytes()
    finally:
        thread.join()
    assert restarted.is_set() and len(sleeps) > 1
    assert app.state.stats.rows_served == 15


def fake_tf_serving(with_signature: bool) -> ASGIApp:
    """A stand-in for real TF-Serving: its status has no sizes; ``/metadata`` has the signature."""
    status = {"model_version_status": [{"version": "1", "state": "AVAILABLE"}]}
    dims = {"inputs": [{"size": "-1"}, {"size": "3"}], "outputs": [{"size": "-1"}, {"size": "2"}]}
    signature = {
        key: {"t": {"dtype": "DT_FLOAT", "tensor_shape": {"dim": dims[key]}}} for key in ("inputs", "outputs")
    }
    metadata = {"metadata": {"signature_def": {"signature_def": {"serving_default": signature}}}}

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        await _drain(receive)
        if scope["path"].endswith("/metadata"):
            if with_signature:
                await _send(send, 200, json.dumps(metadata).encode())
            else:
                await _send(send, 404, b'{"error": "Not found"}')
        elif scope["method"] == "GET":
            await _send(send, 200, json.dumps(status).encode())
        else:
            await _send(send, 200, b'{"predictions": [[0.5, -0.25]]}')

    return app


def test_tf_serving_sizes_come_from_the_signature_or_the_caller(live_server: LiveServer) -> None:
    url = live_server(fake_tf_serving(with_signature=True)) + "/v1/models/m"
    oracle = TFServingOracle(url, retry=FAST)
    assert (oracle.input_dim, oracle.output_dim) == (3, 2)
    assert oracle.query(np.zeros((1, 3))).tolist() == [[0.5, -0.25]]
    bare = live_server(fake_tf_serving(with_signature=False)) + "/v1/models/m"
    with pytest.raises(InputError, match="does not say how many inputs.*--arch"):
        TFServingOracle(bare, retry=FAST)
    assert TFServingOracle(bare, input_dim=3, output_dim=2, retry=FAST).output_dim == 2
