"""Remote oracles over HTTP: KServe v2 (Open Inference Protocol) and TF-Serving / KServe v1 REST.

Only the standard library is used (``http.client``, one kept-alive connection per thread). Floats
travel as JSON numbers written with Python's ``repr``, which round-trips float64 exactly. Big
batches are split into requests of at most ``max_batch_rows`` rows; transient failures are retried
with :func:`relux.oracle.retry.call_with_retry`; every answer is validated with
:func:`relux.oracle.check_answer` (wrong shape, NaN or inf raise :class:`OracleError`).

The metadata request made at construction is special: a refused connection, an unknown host or a
404 there is a wrong URL, so it raises :class:`InputError` at once, without retries.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import math
import random
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, NamedTuple
from urllib.parse import urlsplit

import numpy as np

from relux.errors import BudgetExhausted, InputError, OracleError
from relux.oracle.base import FloatArray, Oracle, OutputKind, ShapedOracle, as_query_batch, check_answer
from relux.oracle.retry import (
    JitterSource,
    RetryPolicy,
    TransientError,
    call_with_retry,
    describe_exception,
    is_transient_status,
    parse_retry_after,
)

logger = logging.getLogger(__name__)

#: Errors on a kept-alive connection that mean the server closed it while idle: reconnect once.
_STALE_CONNECTION = (
    http.client.RemoteDisconnected,
    ConnectionResetError,
    BrokenPipeError,
    ConnectionAbortedError,
)

#: The retry policy used when none is given (frozen, so one shared instance is safe).
DEFAULT_RETRY = RetryPolicy()

_MAX_CHARS_PER_VALUE = 25

_NUMERIC_V2_TYPES = ("FP64", "FP32", "FP16", "BF16")


class _Response(NamedTuple):
    status: int
    reason: str
    headers: http.client.HTTPMessage
    body: bytes


class _ConnectionPool:
    """One kept-alive ``http.client`` connection per thread to a single host."""

    def __init__(self, scheme: str, host: str, port: int | None) -> None:
        self._scheme = scheme
        self._host = host
        self._port = port
        self._local = threading.local()
        self._lock = threading.Lock()
        self._all: list[http.client.HTTPConnection] = []

    def _connection(self, timeout: float) -> http.client.HTTPConnection:
        conn: http.client.HTTPConnection | None = getattr(self._local, "conn", None)
        if conn is None:
            if self._scheme == "https":
                conn = http.client.HTTPSConnection(self._host, self._port, timeout=timeout)
            else:
                conn = http.client.HTTPConnection(self._host, self._port, timeout=timeout)
            self._local.conn = conn
            with self._lock:
                self._all.append(conn)
        return conn

    def request(
        self, method: str, path: str, body: bytes | None, headers: dict[str, str], timeout: float
    ) -> _Response:
        conn = self._connection(timeout)
        reused = conn.sock is not None
        try:
            return _exchange(conn, method, path, body, headers, timeout)
        except _STALE_CONNECTION:
            conn.close()
            if not reused:
                raise
            # The server closed the idle kept-alive connection: reconnect once, right away.
            try:
                return _exchange(conn, method, path, body, headers, timeout)
            except BaseException:
                conn.close()
                raise
        except BaseException:
            conn.close()
            raise

    def close(self) -> None:
        with self._lock:
            for conn in self._all:
                conn.close()
            self._all.clear()
        self._local = threading.local()


def _exchange(
    conn: http.client.HTTPConnection,
    method: str,
    path: str,
    body: bytes | None,
    headers: dict[str, str],
    timeout: float,
) -> _Response:
    conn.timeout = timeout
    if conn.sock is None:
        conn.connect()
        # http.client writes the headers and the body of a request in two sends: with Nagle's algorithm
        # the body waits for the server's (delayed, up to 40-200 ms) ACK of the headers. Send at once.
        sock = getattr(conn, "sock", None)  # set by connect(); read afresh (mypy narrowed it to None)
        if isinstance(sock, socket.socket):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    else:
        conn.sock.settimeout(timeout)
    conn.request(method, path, body=body, headers=headers)
    resp = conn.getresponse()
    data = resp.read()
    if resp.will_close:
        conn.close()
    return _Response(resp.status, resp.reason, resp.headers, data)


def _error_text(body: bytes, limit: int = 300) -> str:
    """The server's error message: ``{"error": ...}`` (or ``detail``/``message``), else the raw text."""
    text = body.decode("utf-8", errors="replace").strip()
    try:
        obj = json.loads(text)
    except ValueError:
        obj = None
    if isinstance(obj, dict):
        for key in ("error", "detail", "message"):
            if isinstance(obj.get(key), str):
                text = obj[key]
                break
    text = " ".join(text.split())
    return text[:limit] + ("..." if len(text) > limit else "") if text else "(empty body)"


def _json_object(body: bytes, what: str) -> dict[str, Any]:
    try:
        obj = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise OracleError(f"{what} is not valid JSON ({exc}); found {body[:120]!r}") from None
    if not isinstance(obj, dict):
        raise OracleError(f"{what} should be a JSON object, found {type(obj).__name__}")
    return obj


def _positive_int(value: Any) -> int | None:
    """``value`` as a positive int (a JSON integer, integral float or digit string), else ``None``."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value > 0 else None
    if isinstance(value, float) and value.is_integer() and value > 0:
        return int(value)
    if isinstance(value, str) and value.strip().isdigit():
        number = int(value)
        return number if number > 0 else None
    return None


def _feature_size(shape: Any) -> tuple[int | None, list[int] | None]:
    """Per-row size and per-row shape from a tensor shape whose first dimension is the batch."""
    if not isinstance(shape, list) or len(shape) < 2:
        return None, None
    tail = [_positive_int(s) for s in shape[1:]]
    if any(t is None for t in tail):
        return None, None
    dims = [int(t) for t in tail if t is not None]
    return math.prod(dims), dims


class RemoteOracle(ShapedOracle):
    """Shared machinery of the HTTP oracles; use :class:`KServeV2Oracle` or :class:`TFServingOracle`."""

    #: Path segment that identifies the protocol in a URL, e.g. ``/v2/``.
    protocol_segment = ""
    protocol_name = ""

    def __init__(
        self,
        url: str,
        *,
        input_dim: int | None = None,
        output_dim: int | None = None,
        max_batch_rows: int = 4096,
        max_request_bytes: int = 16 * 2**20,
        timeout: float = 30.0,
        retry: RetryPolicy = DEFAULT_RETRY,
        token: str | None = None,
        output_kind: OutputKind | None = None,
        rng: JitterSource | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        checks = (
            ("input_dim", input_dim),
            ("output_dim", output_dim),
            ("max_batch_rows", max_batch_rows),
            ("max_request_bytes", max_request_bytes),
        )
        for field, value in checks:
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise InputError(f"{field} must be an integer >= 1, found {value!r}")
        if not math.isfinite(timeout) or timeout <= 0:
            raise InputError(f"timeout must be a positive number of seconds, found {timeout!r}")
        self._url = self._normalise_url(url)
        parts = urlsplit(self._url)
        try:
            port = parts.port
        except ValueError:
            raise InputError(f"{url!r} has a malformed port; expected http://HOST:PORT/...") from None
        assert parts.hostname is not None  # checked by _normalise_url
        self._path = parts.path.rstrip("/")
        self._pool = _ConnectionPool(parts.scheme, parts.hostname, port)
        self._timeout = float(timeout)
        self._retry = retry
        self._rng: JitterSource = rng if rng is not None else random.Random()
        self._sleep = sleep
        self._clock = clock
        self._headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if token:
            self._headers["Authorization"] = f"Bearer {token}"
        self._d = 0
        self._k = 0
        self._kind = OutputKind.LOGITS
        meta = self._first_get(self._path)
        d, k, kind = self._read_metadata(meta)
        self._d = self._reconcile("input", input_dim, d)
        self._k = self._reconcile("output", output_dim, k)
        self._kind = output_kind or kind or OutputKind.LOGITS
        # Rows per request: at most max_batch_rows, and few enough that the JSON body stays
        # under max_request_bytes (a float64 written with repr takes at most 24 characters + a comma).
        self._max_rows = max(1, min(max_batch_rows, max_request_bytes // (_MAX_CHARS_PER_VALUE * self._d)))

    # -- subclass hooks ----------------------------------------------------------------------

    def _read_metadata(self, meta: dict[str, Any]) -> tuple[int | None, int | None, OutputKind | None]:
        raise NotImplementedError

    def _encode(self, X: FloatArray) -> bytes:
        raise NotImplementedError

    def _decode(self, body: bytes, n: int) -> Any:
        raise NotImplementedError

    def _infer_path(self) -> str:
        raise NotImplementedError

    # -- Oracle protocol ---------------------------------------------------------------------

    @property
    def url(self) -> str:
        return self._url

    @property
    def rows_per_request(self) -> int:
        """The most rows one HTTP request carries."""
        return self._max_rows

    def query(self, X: FloatArray) -> FloatArray:
        A = as_query_batch(X, self._d)
        n = A.shape[0]
        if n == 0:
            return np.empty((0, self._k), dtype=np.float64)
        parts = [self._query_chunk(A[i : i + self._max_rows]) for i in range(0, n, self._max_rows)]
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)

    def close(self) -> None:
        """Close the kept-alive connections (they are reopened if the oracle is queried again)."""
        self._pool.close()

    def __enter__(self) -> RemoteOracle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._url!r}, {self._d}->{self._k})"

    # -- internals ---------------------------------------------------------------------------

    def _normalise_url(self, url: str) -> str:
        if not isinstance(url, str) or not url.strip():
            raise InputError(f"expected a {self.protocol_name} URL, found {url!r}")
        url = url.strip().rstrip("/")
        parts = urlsplit(url)
        example = f"http://127.0.0.1:8000{self.protocol_segment}models/NAME"
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise InputError(f"expected a {self.protocol_name} URL such as {example}, found {url!r}")
        if parts.query or parts.fragment:
            raise InputError(f"{url!r} has a query or fragment; expected a URL such as {example}")
        if f"{self.protocol_segment}models/" not in parts.path + "/":
            raise InputError(
                f"{url!r} is not a {self.protocol_name} model URL: its path should contain "
                f"'{self.protocol_segment}models/NAME' (e.g. {example})"
            )
        return url

    def _reconcile(self, which: str, given: int | None, served: int | None) -> int:
        if given is not None and served is not None and given != served:
            raise InputError(
                f"expected a model with {given} {which}s, but {self._url} serves one with {served}. "
                "Check --arch and the URL."
            )
        size = given if given is not None else served
        if size is None:
            raise InputError(
                f"{self._url} does not say how many {which}s its model has; pass the architecture "
                f"(--arch) so that relux knows the {which} size"
            )
        return size

    def _first_get(self, path: str) -> dict[str, Any]:
        """The metadata GET at construction: a wrong URL is an :class:`InputError`, at once."""
        url = self._url_for(path)

        def attempt(remaining: float) -> bytes:
            try:
                resp = self._pool.request("GET", path, None, self._headers, min(self._timeout, remaining))
            except ConnectionRefusedError:
                raise InputError(
                    f"cannot connect to {url}: connection refused. Check that the server is running and "
                    "that the host and port are right (serve a model with 'relux serve MODEL')."
                ) from None
            except socket.gaierror as exc:
                raise InputError(f"cannot resolve the host of {url} ({exc}); check the URL") from None
            except OSError as exc:
                if isinstance(exc, TimeoutError | ConnectionError):
                    raise
                raise InputError(f"cannot reach {url}: {describe_exception(exc)}; check the URL") from None
            if resp.status == 404:
                raise InputError(
                    f"{url} answered 404 Not Found ({_error_text(resp.body)}). Check the model name "
                    f"and the path: it should look like http://HOST:PORT{self.protocol_segment}models/NAME."
                )
            if resp.status in (401, 403):
                raise InputError(
                    f"{url} answered {resp.status} {resp.reason} ({_error_text(resp.body)}); "
                    "check the bearer token (--token)."
                )
            self._raise_for_status(resp, url)
            return resp.body

        body = self._call(attempt, f"GET {url}")
        try:
            return _json_object(body, f"the metadata at {url}")
        except OracleError as exc:
            raise InputError(f"{exc}; is {url} a {self.protocol_name} model endpoint?") from None

    def _optional_get(self, path: str) -> dict[str, Any] | None:
        """A GET whose 404 (or other 4xx) just means "not available"."""
        url = self._url_for(path)

        def attempt(remaining: float) -> _Response:
            resp = self._pool.request("GET", path, None, self._headers, min(self._timeout, remaining))
            if is_transient_status(resp.status):
                self._raise_for_status(resp, url)
            return resp

        resp = self._call(attempt, f"GET {url}")
        if not 200 <= resp.status < 300:
            return None
        try:
            return _json_object(resp.body, f"the answer of {url}")
        except OracleError:
            return None

    def _query_chunk(self, A: FloatArray) -> FloatArray:
        n = A.shape[0]
        body = self._encode(A)
        path = self._infer_path()
        url = self._url_for(path)

        def attempt(remaining: float) -> bytes:
            resp = self._pool.request("POST", path, body, self._headers, min(self._timeout, remaining))
            self._raise_for_status(resp, url)
            return resp.body

        raw = self._call(attempt, f"POST {url} ({n} rows)")
        return check_answer(self._decode(raw, n), n, self._k, f"the oracle at {self._url}")

    def _call(self, attempt: Callable[[float], Any], what: str) -> Any:
        try:
            return call_with_retry(
                attempt, self._retry, rng=self._rng, sleep=self._sleep, clock=self._clock, what=what
            )
        except (http.client.HTTPException, OSError) as exc:  # not transient: e.g. a malformed reply
            raise OracleError(f"{what} failed: {describe_exception(exc)}") from exc

    def _raise_for_status(self, resp: _Response, url: str) -> None:
        if 200 <= resp.status < 300:
            return
        text = _error_text(resp.body)
        if resp.status == 429:
            self._raise_if_budget_exhausted(resp.body, url, text)
        message = f"{url} answered HTTP {resp.status} {resp.reason}: {text}"
        if is_transient_status(resp.status):
            raise TransientError(message, parse_retry_after(resp.headers.get("Retry-After")))
        raise OracleError(message)

    @staticmethod
    def _raise_if_budget_exhausted(body: bytes, url: str, text: str) -> None:
        """A relux server's 429 for a spent row budget is final, not a reason to retry."""
        try:
            obj = json.loads(body)
        except ValueError:
            return
        if isinstance(obj, dict) and obj.get("budget_exhausted") is True:
            served = obj.get("rows_served")
            budget = obj.get("max_queries")
            raise BudgetExhausted(
                f"{url} refused the query: {text}",
                queries=served if isinstance(served, int) else -1,
                budget=budget if isinstance(budget, int) else -1,
            )

    def _url_for(self, path: str) -> str:
        parts = urlsplit(self._url)
        return f"{parts.scheme}://{parts.netloc}{path}"


class KServeV2Oracle(RemoteOracle):
    """An oracle served with the KServe v2 Open Inference Protocol.

    ``url`` is ``http://HOST:PORT/v2/models/NAME``: metadata is read from a GET of ``url`` (sizes
    from the first input's and output's shapes ``[-1, d]``), queries POST to ``url/infer``.
    """

    protocol_segment = "/v2/"
    protocol_name = "KServe v2"

    def __init__(self, url: str, **kwargs: Any) -> None:
        self._input_name = "input"
        self._input_tail: list[int] | None = None
        self._datatype = "FP64"
        self._output_name: str | None = None
        url = url.strip().rstrip("/") if isinstance(url, str) else url
        if isinstance(url, str) and url.endswith("/infer"):
            url = url[: -len("/infer")]
        super().__init__(url, **kwargs)

    def _read_metadata(self, meta: dict[str, Any]) -> tuple[int | None, int | None, OutputKind | None]:
        inputs, outputs = meta.get("inputs"), meta.get("outputs")
        if not isinstance(inputs, list) or not isinstance(outputs, list) or not inputs or not outputs:
            raise InputError(
                f"the metadata at {self._url} has no 'inputs'/'outputs' lists; is this a KServe v2 model URL?"
            )
        if len(inputs) > 1:
            raise InputError(
                f"{self._url} has {len(inputs)} input tensors; relux needs a model with one input"
            )
        first_in, first_out = inputs[0], outputs[0]
        if not isinstance(first_in, dict) or not isinstance(first_out, dict):
            raise InputError(f"the metadata at {self._url} has malformed 'inputs'/'outputs' entries")
        if isinstance(first_in.get("name"), str):
            self._input_name = first_in["name"]
        if isinstance(first_out.get("name"), str):
            self._output_name = first_out["name"]
        datatype = first_in.get("datatype")
        if isinstance(datatype, str) and datatype.upper() in _NUMERIC_V2_TYPES:
            self._datatype = datatype.upper()
            if self._datatype != "FP64":
                logger.warning(
                    "%s takes %s inputs: the server rounds the float64 queries, so answers are inexact",
                    self._url,
                    self._datatype,
                )
        d, self._input_tail = _feature_size(first_in.get("shape"))
        k, _ = _feature_size(first_out.get("shape"))
        return d, k, _output_kind(meta)

    def _infer_path(self) -> str:
        return f"{self._path}/infer"

    def _encode(self, X: FloatArray) -> bytes:
        n = X.shape[0]
        tail = self._input_tail if self._input_tail and math.prod(self._input_tail) == self._d else [self._d]
        request = {
            "inputs": [
                {
                    "name": self._input_name,
                    "shape": [n, *tail],
                    "datatype": self._datatype,
                    "data": X.ravel().tolist(),
                }
            ]
        }
        return json.dumps(request, separators=(",", ":"), allow_nan=False).encode()

    def _decode(self, body: bytes, n: int) -> Any:
        what = f"the answer of {self._url}/infer"
        obj = _json_object(body, what)
        outputs = obj.get("outputs")
        if not isinstance(outputs, list) or not outputs or not all(isinstance(o, dict) for o in outputs):
            raise OracleError(f"{what} has no 'outputs' list of tensors; found keys {sorted(obj)}")
        chosen = outputs[0]
        if self._output_name is not None:
            chosen = next((o for o in outputs if o.get("name") == self._output_name), outputs[0])
        if "data" not in chosen:
            raise OracleError(
                f"{what}: output tensor {chosen.get('name')!r} has no 'data' (binary data is not supported)"
            )
        return _as_rows(chosen["data"], n, self._k, what)


class TFServingOracle(RemoteOracle):
    """An oracle served with the TF-Serving / KServe v1 REST protocol.

    ``url`` is ``http://HOST:PORT/v1/models/NAME``: queries POST ``{"instances": [...]}`` to
    ``url:predict``. Sizes come from a GET of ``url`` when the server includes them (a relux server
    does), else from TF-Serving's ``url/metadata`` signature, else from ``input_dim``/``output_dim``.
    """

    protocol_segment = "/v1/"
    protocol_name = "TF-Serving v1"

    def __init__(self, url: str, **kwargs: Any) -> None:
        url = url.strip().rstrip("/") if isinstance(url, str) else url
        if isinstance(url, str) and url.endswith(":predict"):
            url = url[: -len(":predict")]
        super().__init__(url, **kwargs)

    def _read_metadata(self, meta: dict[str, Any]) -> tuple[int | None, int | None, OutputKind | None]:
        d = _positive_int(meta.get("input_dim"))
        k = _positive_int(meta.get("output_dim"))
        if d is None or k is None:
            signature = self._optional_get(f"{self._path}/metadata")
            if signature is not None:
                sd, sk = _tf_signature_sizes(signature)
                d = d if d is not None else sd
                k = k if k is not None else sk
        return d, k, _output_kind(meta)

    def _infer_path(self) -> str:
        return f"{self._path}:predict"

    def _encode(self, X: FloatArray) -> bytes:
        return json.dumps({"instances": X.tolist()}, separators=(",", ":"), allow_nan=False).encode()

    def _decode(self, body: bytes, n: int) -> Any:
        what = f"the answer of {self._url}:predict"
        obj = _json_object(body, what)
        if "predictions" in obj:
            return _as_rows(obj["predictions"], n, self._k, what)
        if "outputs" in obj:
            return _as_rows(obj["outputs"], n, self._k, what)
        raise OracleError(f"{what} has no 'predictions'; found keys {sorted(obj)}")


def _as_rows(data: Any, n: int, k: int, what: str) -> Any:
    """Flat or nested answer data as an ``(n, k)`` array when the sizes agree (else as found)."""
    try:
        A = np.asarray(data, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise OracleError(f"{what} has non-numeric or ragged data: {exc}") from None
    if A.size == n * k and A.shape != (n, k):
        A = A.reshape(n, k)
    return A


def _output_kind(meta: dict[str, Any]) -> OutputKind | None:
    value = meta.get("output_kind")
    params = meta.get("parameters")
    if value is None and isinstance(params, dict):
        value = params.get("output_kind")
    try:
        return OutputKind(value) if isinstance(value, str) else None
    except ValueError:
        return None


def _tf_signature_sizes(meta: dict[str, Any]) -> tuple[int | None, int | None]:
    """Input and output sizes from TF-Serving's ``/metadata`` (the ``serving_default`` signature)."""
    try:
        defs = meta["metadata"]["signature_def"]["signature_def"]
        sig = defs.get("serving_default") or next(iter(defs.values()))
        sizes: list[int | None] = []
        for key in ("inputs", "outputs"):
            tensors = sig[key]
            if not isinstance(tensors, dict) or len(tensors) != 1:
                sizes.append(None)
                continue
            dims = next(iter(tensors.values()))["tensor_shape"]["dim"]
            size, _ = _feature_size([d.get("size") for d in dims])
            sizes.append(size)
        return sizes[0], sizes[1]
    except (KeyError, TypeError, AttributeError, StopIteration):
        return None, None


def oracle_from_url(
    url: str, *, input_dim: int | None = None, output_dim: int | None = None, **kwargs: Any
) -> Oracle:
    """An HTTP oracle for ``url``: KServe v2 when its path has ``/v2/``, TF-Serving when ``/v1/``."""
    path = urlsplit(url.strip()).path if isinstance(url, str) else ""
    if "/v2/" in path + "/":
        return KServeV2Oracle(url, input_dim=input_dim, output_dim=output_dim, **kwargs)
    if "/v1/" in path + "/":
        return TFServingOracle(url, input_dim=input_dim, output_dim=output_dim, **kwargs)
    raise InputError(
        f"cannot tell the protocol of {url!r}: expected http://HOST:PORT/v2/models/NAME (KServe v2) "
        "or http://HOST:PORT/v1/models/NAME (TF-Serving)"
    )


__all__ = ["DEFAULT_RETRY", "RemoteOracle", "KServeV2Oracle", "TFServingOracle", "oracle_from_url"]
