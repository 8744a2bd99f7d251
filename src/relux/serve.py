"""Serve a model as a black box over HTTP, speaking two protocols at once.

* KServe v2 Open Inference Protocol: ``GET /v2/health/ready``, ``GET /v2/models/NAME`` (metadata),
  ``POST /v2/models/NAME/infer`` with ``{"inputs": [{"name", "shape": [n, d], "datatype": "FP64",
  "data": [...]}]}``.
* TF-Serving / KServe v1 REST: ``GET /v1/models/NAME`` (status, with the input and output sizes),
  ``POST /v1/models/NAME:predict`` with ``{"instances": [[...], ...]}``.

Floats are parsed into and written from float64 with Python's ``json`` (``repr``), so values round
trip exactly; nothing goes through float32. The server counts the rows it answers
(``app.state.stats``), logs them every so often and at shutdown, and guards itself: bearer token
(401), body size (413), malformed JSON, wrong shapes and non-finite inputs (400), unknown model
(404), per-server row budget (429). Every error body is ``{"error": "..."}``.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import math
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from relux.errors import BudgetExhausted, InputError, OracleError, ReluxError
from relux.model import MLP
from relux.oracle.base import FloatArray, Oracle
from relux.oracle.local import MLPOracle

logger = logging.getLogger(__name__)

_NUMERIC_V2_TYPES = frozenset(
    ("FP64", "FP32", "FP16", "BF16", "INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64")
)


@dataclass
class ServerStats:
    """What one server has answered so far. Mutable; owned by one app; guarded by its own lock."""

    rows_served: int = 0
    requests_served: int = 0
    rows_in_flight: int = 0
    started: float = field(default_factory=time.monotonic)
    last_log: float = field(default_factory=time.monotonic)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def to_json(self) -> dict[str, int | float]:
        """The counters as plain JSON values (read under the lock, so they are consistent)."""
        with self.lock:
            return {
                "rows_served": self.rows_served,
                "requests_served": self.requests_served,
                "rows_in_flight": self.rows_in_flight,
                "uptime_seconds": time.monotonic() - self.started,
            }


class _HTTPError(Exception):
    """An error answer: ``status`` and ``{"error": message, **extra}``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}
        self.extra = extra or {}


def _json_response(content: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    # allow_nan: a model whose output overflows answers NaN/Infinity tokens (as TF-Serving does);
    # relux clients then reject the answer instead of retrying a request that can never succeed.
    body = json.dumps(content, separators=(",", ":"), allow_nan=True).encode()
    return Response(body, status_code=status, headers=headers, media_type="application/json")


def _error_response(exc: _HTTPError) -> Response:
    return _json_response({"error": exc.message, **exc.extra}, exc.status, exc.headers)


class _BearerAuth:
    """ASGI middleware: every HTTP request needs ``Authorization: Bearer <token>``, else 401."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self._app = app
        self._token = token.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            scheme, _, credential = Headers(scope=scope).get("authorization", "").partition(" ")
            good = hmac.compare_digest(credential.strip().encode(), self._token)
            if scheme.lower() != "bearer" or not good:
                error = _HTTPError(
                    401,
                    "missing or wrong bearer token: send the header 'Authorization: Bearer <token>' "
                    "(the token the server was started with, --token)",
                    headers={"WWW-Authenticate": 'Bearer realm="relux"'},
                )
                await _error_response(error)(scope, receive, send)
                return
        await self._app(scope, receive, send)


def _numeric_array(data: Any, what: str) -> FloatArray:
    """JSON numbers (a flat or nested list) as a float64 array; 400 for anything else."""
    try:
        A = np.array(data)
    except (ValueError, TypeError):
        raise _HTTPError(
            400, f"{what} must be a list of numbers (or of equal-length lists of numbers)"
        ) from None
    if A.dtype.kind not in "fiu":
        raise _HTTPError(400, f"{what} must contain only numbers, found {A.dtype.kind!r}-kind values")
    return A.astype(np.float64, copy=False)


class _Service:
    """The endpoints of one served oracle."""

    def __init__(
        self,
        oracle: Oracle,
        name: str,
        max_body_bytes: int,
        max_queries: int | None,
        log_interval: float,
    ) -> None:
        self.oracle = oracle
        self.name = name
        self.d = int(oracle.input_dim)
        self.k = int(oracle.output_dim)
        self.max_body_bytes = max_body_bytes
        self.max_queries = max_queries
        self.log_interval = log_interval
        self.stats = ServerStats()
        self._oracle_lock = threading.Lock()  # oracles need not be thread-safe

    # -- routes ------------------------------------------------------------------------------

    def routes(self) -> list[Route]:
        return [
            Route("/v2", self.v2_server_metadata, methods=["GET"]),
            Route("/v2/health/live", self.v2_live, methods=["GET"]),
            Route("/v2/health/ready", self.v2_ready, methods=["GET"]),
            Route("/v2/models/{name}", self.v2_model_metadata, methods=["GET"]),
            Route("/v2/models/{name}/ready", self.v2_model_ready, methods=["GET"]),
            Route("/v2/models/{name}/infer", self.v2_infer, methods=["POST"]),
            Route("/v1/models/{name}", self.v1_status, methods=["GET"]),
            Route("/v1/models/{name}/metadata", self.v1_metadata, methods=["GET"]),
            Route("/v1/models/{name}:predict", self.v1_predict, methods=["POST"]),
        ]

    async def v2_server_metadata(self, request: Request) -> Response:
        from relux import __version__

        return _json_response({"name": "relux", "version": __version__, "extensions": []})

    async def v2_live(self, request: Request) -> Response:
        return _json_response({"live": True})

    async def v2_ready(self, request: Request) -> Response:
        return _json_response({"ready": True})

    async def v2_model_ready(self, request: Request) -> Response:
        self._check_model(request)
        return _json_response({"name": self.name, "ready": True})

    async def v2_model_metadata(self, request: Request) -> Response:
        self._check_model(request)
        return _json_response(
            {
                "name": self.name,
                "versions": ["1"],
                "platform": "relux",
                "inputs": [{"name": "input", "datatype": "FP64", "shape": [-1, self.d]}],
                "outputs": [{"name": "output", "datatype": "FP64", "shape": [-1, self.k]}],
                "parameters": {"output_kind": self.oracle.output_kind.value},
            }
        )

    async def v2_infer(self, request: Request) -> Response:
        self._check_model(request)
        body = await self._read_body(request)
        content = await run_in_threadpool(self._infer_v2, body)
        return _json_response(content)

    async def v1_status(self, request: Request) -> Response:
        self._check_model(request)
        return _json_response(
            {
                "model_version_status": [
                    {
                        "version": "1",
                        "state": "AVAILABLE",
                        "status": {"error_code": "OK", "error_message": ""},
                    }
                ],
                "name": self.name,
                "input_dim": self.d,
                "output_dim": self.k,
                "output_kind": self.oracle.output_kind.value,
            }
        )

    async def v1_metadata(self, request: Request) -> Response:
        self._check_model(request)

        def tensor(name: str, size: int) -> dict[str, Any]:
            dims = [{"size": "-1", "name": ""}, {"size": str(size), "name": ""}]
            return {"dtype": "DT_DOUBLE", "tensor_shape": {"dim": dims, "unknown_rank": False}, "name": name}

        signature = {
            "inputs": {"input": tensor("input", self.d)},
            "outputs": {"output": tensor("output", self.k)},
            "method_name": "tensorflow/serving/predict",
        }
        return _json_response(
            {
                "model_spec": {"name": self.name, "signature_name": "", "version": "1"},
                "metadata": {"signature_def": {"signature_def": {"serving_default": signature}}},
            }
        )

    async def v1_predict(self, request: Request) -> Response:
        self._check_model(request)
        body = await self._read_body(request)
        content = await run_in_threadpool(self._predict_v1, body)
        return _json_response(content)

    # -- request handling (the heavy parts run in a worker thread) ---------------------------

    def _check_model(self, request: Request) -> None:
        name = request.path_params["name"]
        if name != self.name:
            raise _HTTPError(404, f"unknown model {name!r}; this server serves {self.name!r}")

    async def _read_body(self, request: Request) -> bytes:
        """The request body; 413 from ``Content-Length`` before reading, or once too much has arrived."""
        limit = self.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                raise _HTTPError(400, f"malformed Content-Length header {declared!r}") from None
            if size > limit:
                raise _HTTPError(
                    413, f"request body of {size} bytes exceeds the limit of {limit} bytes; send fewer rows"
                )
        chunks: list[bytes] = []
        total = 0
        async for chunk in request.stream():
            total += len(chunk)
            if total > limit:
                raise _HTTPError(
                    413, f"request body exceeds the limit of {limit} bytes; send fewer rows per request"
                )
            chunks.append(chunk)
        return b"".join(chunks)

    @staticmethod
    def _parse_json(body: bytes) -> dict[str, Any]:
        try:
            payload = json.loads(body)
        except (ValueError, RecursionError) as exc:
            raise _HTTPError(400, f"malformed JSON in the request body: {exc}") from None
        if not isinstance(payload, dict):
            raise _HTTPError(400, f"the request body must be a JSON object, found {type(payload).__name__}")
        return payload

    def _infer_v2(self, body: bytes) -> dict[str, Any]:
        payload = self._parse_json(body)
        tensor_usage = f'{{"name": "input", "shape": [n, {self.d}], "datatype": "FP64", "data": [...]}}'
        usage = f'{{"inputs": [{tensor_usage}]}}'
        inputs = payload.get("inputs")
        if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
            raise _HTTPError(400, f"expected exactly one input tensor: {usage}")
        tensor = inputs[0]
        datatype = tensor.get("datatype", "FP64")
        if not isinstance(datatype, str) or datatype.upper() not in _NUMERIC_V2_TYPES:
            raise _HTTPError(400, f"unsupported datatype {datatype!r}; send FP64")
        shape = tensor.get("shape")
        expected = f"[n, {self.d}]"
        if (
            not isinstance(shape, list)
            or len(shape) != 2
            or not all(isinstance(s, int) and not isinstance(s, bool) for s in shape)
            or shape[0] < 0
            or shape[1] != self.d
        ):
            raise _HTTPError(
                400, f"wrong input shape {shape!r}: expected {expected} (this model takes {self.d} inputs)"
            )
        if "data" not in tensor:
            raise _HTTPError(400, f"the input tensor has no 'data': {usage}")
        n = shape[0]
        A = _numeric_array(tensor["data"], "input 'data'")
        if A.size != n * self.d or (A.ndim != 1 and A.shape != (n, self.d)):
            raise _HTTPError(
                400,
                f"input data of shape {list(A.shape)} does not match the declared shape {shape}: expected "
                f"{n * self.d} numbers, flat or nested as {expected}",
            )
        Y = self._evaluate(A.reshape(n, self.d))
        answer: dict[str, Any] = {
            "model_name": self.name,
            "model_version": "1",
            "outputs": [
                {"name": "output", "shape": [n, self.k], "datatype": "FP64", "data": Y.ravel().tolist()}
            ],
        }
        if isinstance(payload.get("id"), str):
            answer["id"] = payload["id"]
        return answer

    def _predict_v1(self, body: bytes) -> dict[str, Any]:
        payload = self._parse_json(body)
        key = "instances" if "instances" in payload else "inputs" if "inputs" in payload else None
        if key is None:
            raise _HTTPError(400, f'expected {{"instances": [[...{self.d} numbers...], ...]}}')
        A = _numeric_array(payload[key], f"'{key}'")
        if A.ndim == 1 and self.d == 1:
            A = A[:, None]
        if A.ndim != 2 or A.shape[1] != self.d:
            raise _HTTPError(
                400,
                f"wrong input shape {list(A.shape)}: expected [n, {self.d}] "
                f"(a list of n instances of {self.d} numbers each)",
            )
        return {"predictions": self._evaluate(A).tolist()}

    def _evaluate(self, X: FloatArray) -> FloatArray:
        """Answer ``X`` with the oracle, enforcing the row budget and counting rows."""
        n = X.shape[0]
        if not np.all(np.isfinite(X)):
            bad = int(np.count_nonzero(~np.isfinite(X)))
            raise _HTTPError(400, f"the inputs contain {bad} NaN/inf values; send finite numbers only")
        stats = self.stats
        with stats.lock:
            committed = stats.rows_served + stats.rows_in_flight
            if self.max_queries is not None and committed + n > self.max_queries:
                raise _HTTPError(
                    429,
                    f"query budget exhausted: this server answers at most {self.max_queries} rows and has "
                    f"answered {stats.rows_served}; a request of {n} rows does not fit",
                    extra={
                        "budget_exhausted": True,
                        "rows_served": stats.rows_served,
                        "max_queries": self.max_queries,
                    },
                )
            stats.rows_in_flight += n
        try:
            Y = self._query(X)
        finally:
            with stats.lock:
                stats.rows_in_flight -= n
        with stats.lock:
            stats.rows_served += n
            stats.requests_served += 1
            now = time.monotonic()
            due = now - stats.last_log >= self.log_interval
            if due:
                stats.last_log = now
            rows, requests = stats.rows_served, stats.requests_served
        if due:
            logger.info("model %r: %d rows answered in %d requests", self.name, rows, requests)
        return Y

    def _query(self, X: FloatArray) -> FloatArray:
        n = X.shape[0]
        if n == 0:
            return np.empty((0, self.k), dtype=np.float64)
        try:
            with self._oracle_lock:
                Y = np.asarray(self.oracle.query(X), dtype=np.float64)
        except InputError as exc:
            raise _HTTPError(400, str(exc)) from None
        except BudgetExhausted as exc:
            raise _HTTPError(
                429,
                f"the query budget of the model behind this server is spent: {exc}",
                extra={"budget_exhausted": True, "rows_served": exc.queries, "max_queries": exc.budget},
            ) from None
        except OracleError as exc:
            # Not 5xx: clients would retry a failure that is most likely deterministic (e.g. NaN answers).
            raise _HTTPError(422, f"the model behind this server could not answer: {exc}") from None
        except ReluxError as exc:
            raise _HTTPError(500, f"the model failed: {exc}") from None
        if Y.shape != (n, self.k):
            raise _HTTPError(500, f"the model answered with shape {list(Y.shape)}; expected [{n}, {self.k}]")
        if not np.all(np.isfinite(Y)):
            logger.warning("model %r produced NaN/inf outputs for %d rows", self.name, n)
        return Y


def create_app(
    oracle_or_model: Oracle | MLP,
    name: str = "model",
    token: str | None = None,
    max_body_bytes: int = 64 * 2**20,
    max_queries: int | None = None,
    *,
    log_interval: float = 10.0,
) -> Starlette:
    """A Starlette app serving ``oracle_or_model`` over KServe v2 and TF-Serving v1 REST.

    ``token``: if given, every request needs ``Authorization: Bearer <token>``.
    ``max_body_bytes``: larger request bodies are refused with 413.
    ``max_queries``: the most rows this server answers in total; past it, 429.
    ``log_interval``: at most one progress log line per this many seconds of activity.
    The counters are ``app.state.stats`` (a :class:`ServerStats`).
    """
    oracle: Oracle
    if isinstance(oracle_or_model, MLP):
        oracle = MLPOracle(oracle_or_model)
    elif isinstance(oracle_or_model, Oracle):
        oracle = oracle_or_model
    else:
        raise InputError(f"expected an Oracle or an MLP to serve, found {type(oracle_or_model).__name__}")
    if not isinstance(name, str) or not name or any(c in name for c in "/:?#% ") or not name.isprintable():
        raise InputError(
            f"model name must be a non-empty URL-safe string without '/', ':' or spaces, found {name!r}"
        )
    if token is not None and (not token or any(c.isspace() for c in token) or not token.isprintable()):
        raise InputError("the token must be a non-empty string of printable characters without spaces")
    if isinstance(max_body_bytes, bool) or not isinstance(max_body_bytes, int) or max_body_bytes < 1:
        raise InputError(f"max_body_bytes must be an integer >= 1, found {max_body_bytes!r}")
    if max_queries is not None and (
        isinstance(max_queries, bool) or not isinstance(max_queries, int) or max_queries < 0
    ):
        raise InputError(f"max_queries must be an integer >= 0 (or None for no limit), found {max_queries!r}")
    if not math.isfinite(log_interval) or log_interval < 0:
        raise InputError(f"log_interval must be a number of seconds >= 0, found {log_interval!r}")

    service = _Service(oracle, name, max_body_bytes, max_queries, log_interval)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        logger.info("serving model %r (%d inputs -> %d outputs)", name, service.d, service.k)
        yield
        stats = service.stats
        logger.info(
            "model %r: shutting down after answering %d rows in %d requests (%.1f s)",
            name,
            stats.rows_served,
            stats.requests_served,
            time.monotonic() - stats.started,
        )

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, _HTTPError)
        return _error_response(exc)

    async def on_starlette_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        message = exc.detail if exc.status_code != 404 else f"no such endpoint: {request.url.path}"
        return _error_response(_HTTPError(exc.status_code, message, headers=dict(exc.headers or {})))

    async def on_crash(request: Request, exc: Exception) -> Response:
        logger.error("internal error answering %s %s", request.method, request.url.path, exc_info=exc)
        return _error_response(_HTTPError(500, f"internal server error: {type(exc).__name__}"))

    app = Starlette(
        routes=service.routes(),
        exception_handlers={
            _HTTPError: on_http_error,
            HTTPException: on_starlette_error,
            Exception: on_crash,
        },
        lifespan=lifespan,
    )
    if token is not None:
        app.add_middleware(_BearerAuth, token=token)
    app.state.stats = service.stats
    app.state.model_name = name
    app.state.oracle = oracle
    app.state.has_token = token is not None
    return app


# -- running -----------------------------------------------------------------------------------


def _bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: any free port); :class:`InputError` if not."""
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise InputError(f"port must be an integer in 0..65535, found {port!r}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, _, proto, _, address = infos[0]
        # The proto from getaddrinfo (IPPROTO_TCP) lets asyncio turn off Nagle's algorithm on accepted
        # connections; with proto 0 every small answer waits for a delayed ACK (~40 ms).
        sock = socket.socket(family, socket.SOCK_STREAM, proto)
    except OSError as exc:
        raise InputError(f"cannot listen on {host!r}: {exc}; check --host") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        reason = exc.strerror or str(exc)
        raise InputError(f"cannot listen on {host}:{port}: {reason}; choose another --port") from None
    return sock


def base_url(host: str, port: int) -> str:
    """``http://host:port`` (IPv6 hosts in brackets)."""
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


def _server(app: ASGIApp, access_log: bool) -> Any:
    import uvicorn

    # log_config=None: uvicorn logs through the logging configuration of the caller.
    return uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=access_log, lifespan="on"))


def run_server(
    app: Starlette,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    announce: Callable[[str], None] | None = None,
    access_log: bool = False,
) -> None:
    """Serve ``app`` with uvicorn until interrupted. ``announce(base_url)`` is called once listening."""
    sock = _bind(host, port)
    try:
        url = base_url(host, sock.getsockname()[1])
        if not _is_loopback(host) and not getattr(app.state, "has_token", False):
            logger.warning("serving on %s without a token: anyone who can reach it can query the model", url)
        if announce is not None:
            announce(url)
        _server(app, access_log).run(sockets=[sock])
    finally:
        sock.close()


@contextlib.contextmanager
def background_server(app: ASGIApp, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Run the ASGI ``app`` with uvicorn in a background thread while the block runs; yield its base URL.

    ``port=0`` picks a free port. Used by tests and demos; binds loopback by default.
    """
    sock = _bind(host, port)
    server = _server(app, access_log=False)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="relux-serve", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30.0
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise OracleError(f"the background server on {host}:{port} did not start")
            time.sleep(0.005)
        yield base_url(host, sock.getsockname()[1])
    finally:
        server.should_exit = True
        thread.join(timeout=30.0)
        sock.close()


__all__ = ["ServerStats", "create_app", "run_server", "background_server", "base_url"]
