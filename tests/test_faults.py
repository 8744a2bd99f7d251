"""Extraction through a faulty HTTP oracle: transient faults are survived exactly, permanent ones end
with a clear error in bounded time, unusable answers are rejected and never used.

The victim is served by :func:`relux.serve.create_app` behind ASGI middlewares that inject faults:
:class:`FlakyServer` fails a deterministic 20% of requests (HTTP 500, 503, 429 with
``Retry-After: 0``, connections dropped mid-answer before or after the model computed it) and
:class:`CorruptingServer` rewrites answers (NaN, inf, wrong shape, non-numbers).
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from relux.attack import ExtractionConfig, extract
from relux.cli import main
from relux.cli.extract import retry_policy
from relux.errors import ExtractionFailed, OracleError
from relux.model import MLP
from relux.oracle.http import KServeV2Oracle, RemoteOracle, TFServingOracle
from relux.oracle.retry import RetryPolicy
from relux.oracle.wrappers import CountingOracle
from relux.serve import create_app
from relux.verify import verify
from relux.zoo import random_mlp

LiveServer = Callable[[ASGIApp], str]

#: Fast retries (the task's delays) with room for long runs of bad luck: a test takes seconds.
FAST = RetryPolicy(max_attempts=1000, base_delay=0.001, max_delay=0.01, total_timeout=30.0)

#: The project's target for one hidden layer: the extraction through faults is as exact as without.
MAX_WEIGHT_ERROR = 2.0**-30

ARCH = (12, 8, 2)

CLIENTS: dict[str, tuple[type[RemoteOracle], str]] = {
    "kserve-v2": (KServeV2Oracle, "/v2/models/victim"),
    "tf-serving": (TFServingOracle, "/v1/models/victim"),
}

INFER_PATHS = ("/infer", ":predict")

FAULTS = ("500", "503", "429", "drop", "drop-after")


def victim(seed: int = 0) -> MLP:
    return random_mlp(ARCH, np.random.default_rng(seed))


# --------------------------------------------------------------------------- fault-injecting servers
async def _drain(receive: Receive) -> bytes:
    chunks: list[bytes] = []
    while True:
        message: Message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _answer(send: Send, status: int, body: bytes, extra: Sequence[tuple[bytes, bytes]] = ()) -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": [*headers, *extra]})
    await send({"type": "http.response.body", "body": body})


async def _drop(send: Send) -> None:
    """Start a 200 answer, send part of its body, then cut the connection."""
    headers = [(b"content-type", b"application/json"), (b"content-length", b"1000")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": b'{"outputs": [', "more_body": True})
    raise ConnectionAbortedError("injected: connection dropped mid-answer")


async def _call_buffered(app: ASGIApp, scope: Scope, body: bytes) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """Run ``app`` on a request whose body is already read; return its status, headers and body."""
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    status, headers, chunks = 500, [], []

    async def send(message: Message) -> None:
        nonlocal status, headers
        if message["type"] == "http.response.start":
            status, headers = message["status"], list(message.get("headers", []))
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    await app(scope, receive, send)
    return status, headers, b"".join(chunks)


def _answer_rows(body: bytes) -> int:
    """Rows in a KServe v2 or TF-Serving answer."""
    obj = json.loads(body)
    if "outputs" in obj:
        return int(obj["outputs"][0]["shape"][0])
    return len(obj["predictions"])


class FlakyServer:
    """ASGI middleware failing a deterministic fraction of requests, one in every ``period``.

    Requests are taken in blocks of ``period``; in each block one request, at a position drawn from a
    seeded generator, fails with the next fault of ``faults`` in turn (so failures sometimes come back
    to back). ``period=1`` fails every request. Only paths ending with one of ``paths`` are touched.
    Faults: ``"500"``, ``"503"``, ``"429"`` (with ``Retry-After: 0``), ``"drop"`` (the connection is cut
    mid-answer before the model sees the request) and ``"drop-after"`` (the model answers, the server
    counts the rows, then the connection is cut before the client gets them).

    ``rows_delivered`` counts the rows of inference answers sent in full: the rows the client got.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        period: int = 5,
        seed: int = 0,
        faults: Sequence[str] = FAULTS,
        paths: Sequence[str] | None = None,
    ) -> None:
        self.app = app
        self.period = period
        self.faults = list(faults)
        self.paths = tuple(paths) if paths is not None else None
        self.seen: list[str] = []
        self.rows_delivered = 0
        self._rng = random.Random(seed)
        self._slot = 0
        self._lock = threading.Lock()

    def _next(self) -> str:
        with self._lock:
            n = len(self.seen)
            if n % self.period == 0:
                self._slot = self._rng.randrange(self.period)
            fail = n % self.period == self._slot
            fault = self.faults[(n // self.period) % len(self.faults)] if fail else "ok"
            self.seen.append(fault)
            return fault

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (self.paths is not None and not scope["path"].endswith(self.paths)):
            await self.app(scope, receive, send)
            return
        fault = self._next()
        body = await _drain(receive)
        if fault in ("500", "503", "429"):
            extra = [(b"retry-after", b"0")] if fault == "429" else []
            await _answer(send, int(fault), b'{"error": "injected failure"}', extra)
            return
        if fault == "drop":
            await _drop(send)
        status, headers, answer = await _call_buffered(self.app, scope, body)
        if fault == "drop-after":
            await _drop(send)
        if status == 200 and scope["path"].endswith(INFER_PATHS):
            with self._lock:
                self.rows_delivered += _answer_rows(answer)
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": answer})

    @property
    def failures(self) -> list[str]:
        return [f for f in self.seen if f != "ok"]


def _corrupt(answer: dict[str, Any], how: str) -> dict[str, Any]:
    """A KServe v2 answer made unusable: ``nan``, ``inf``, ``short``, ``long`` or ``text`` data."""
    out = answer["outputs"][0]
    data = list(out["data"])
    if how == "nan":
        data[len(data) // 2] = float("nan")
    elif how == "inf":
        data[-1] = float("-inf")
    elif how == "short":
        data = data[:-1]
    elif how == "long":
        data = [*data, *data[:3]]
    elif how == "text":
        data[0] = "oops"
    else:
        raise ValueError(how)
    return {**answer, "outputs": [{**out, "data": data}]}


class CorruptingServer:
    """ASGI middleware passing the first ``after`` inference answers, then corrupting every one."""

    def __init__(self, app: ASGIApp, how: str, after: int) -> None:
        self.app = app
        self.how = how
        self.after = after
        self.infer_requests = 0
        self.corrupted = 0
        self._lock = threading.Lock()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].endswith("/infer"):
            await self.app(scope, receive, send)
            return
        body = await _drain(receive)
        status, _, answer = await _call_buffered(self.app, scope, body)
        with self._lock:
            self.infer_requests += 1
            bad = self.infer_requests > self.after
            self.corrupted += int(bad)
        if bad:
            # allow_nan: written as the NaN/-Infinity tokens Python's json (and TF-Serving) emit.
            answer = json.dumps(_corrupt(json.loads(answer), self.how), allow_nan=True).encode()
        await _answer(send, status, answer)


def run_cli(argv: Sequence[str]) -> int:
    try:
        return main(list(argv))
    except SystemExit as exc:
        return int(exc.code) if isinstance(exc.code, int) else 1


def read_json(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text())
    assert isinstance(data, dict)
    return data


# --------------------------------------------------------------------------- the fault schedule itself
def test_flaky_server_fails_exactly_one_request_in_five_deterministically() -> None:
    async def ok(scope: Scope, receive: Receive, send: Send) -> None:  # never called here
        raise AssertionError

    runs = []
    for _ in range(2):
        flaky = FlakyServer(ok, seed=3)
        runs.append([flaky._next() for _ in range(100)])
    assert runs[0] == runs[1]  # deterministic
    assert sum(f != "ok" for f in runs[0]) == 20  # exactly 20%
    assert {f for f in runs[0] if f != "ok"} == set(FAULTS)


# --------------------------------------------------------------------------- transient faults
@pytest.mark.parametrize("protocol", list(CLIENTS))
def test_extraction_through_transient_faults_is_exact(live_server: LiveServer, protocol: str) -> None:
    model = victim(seed=1)
    app = create_app(model, name="victim")
    flaky = FlakyServer(app, seed=2)  # every request, the metadata GET included
    client_type, path = CLIENTS[protocol]
    # Small requests: more of them, so that every kind of fault is met many times.
    with client_type(live_server(flaky) + path, retry=FAST, max_batch_rows=256) as remote:
        counter = CountingOracle(remote)
        result = extract(counter, ARCH, ExtractionConfig(seed=1))
    # Every kind of fault was met and survived.
    assert set(flaky.failures) == set(FAULTS), flaky.seen
    assert len(flaky.seen) // 5 <= len(flaky.failures) <= len(flaky.seen) // 5 + 1
    # Rows are counted once, when answered: the attack's count, the client's count and the rows the
    # server delivered in full agree. "drop-after" rows were computed but never received, so the
    # server computed more rows than were delivered.
    assert result.queries == counter.queries == flaky.rows_delivered
    assert app.state.stats.rows_served > flaky.rows_delivered
    # Exactly the extraction a fault-free server gives (retried answers are bitwise the same).
    report = verify(model, result.model, rng=np.random.default_rng(0), n_random=2000, n_lines=16)
    assert report.complete and report.sign_errors == 0, report
    assert report.max_norm_weight_error <= MAX_WEIGHT_ERROR, report
    assert result.selfcheck.passed


# --------------------------------------------------------------------------- permanent faults
@pytest.mark.parametrize("fault", ["503", "429", "drop"])
def test_permanently_failing_oracle_raises_within_total_timeout(live_server: LiveServer, fault: str) -> None:
    flaky = FlakyServer(create_app(victim(), name="victim"), period=1, faults=[fault], paths=INFER_PATHS)
    policy = RetryPolicy(max_attempts=1_000_000, base_delay=0.001, max_delay=0.01, total_timeout=0.5)
    remote = KServeV2Oracle(live_server(flaky) + "/v2/models/victim", retry=policy)
    start = time.monotonic()
    with pytest.raises(OracleError, match="still failing.*total timeout 0.5 s"):
        extract(remote, ARCH, ExtractionConfig(seed=0))
    # 0.5 s of retries; the slack covers one request in flight and thread scheduling.
    assert time.monotonic() - start < 2.0
    assert len(flaky.seen) > 5  # it did retry


def test_cli_permanent_failure_exits_1_within_oracle_timeout(
    live_server: LiveServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    flaky = FlakyServer(create_app(victim(), name="victim"), period=1, faults=["503"], paths=INFER_PATHS)
    url = live_server(flaky) + "/v2/models/victim"
    out, rep = tmp_path / "x.npz", tmp_path / "r.json"
    argv = ["extract", "--url", url, "--arch", "12-8-2", "--out", str(out), "--report", str(rep)]
    start = time.monotonic()
    assert run_cli([*argv, "--oracle-timeout", "1"]) == 1
    # The default backoff starts at 0.1 s: a 1 s timeout ends the run in about a second.
    assert time.monotonic() - start < 4.0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "503" in err and "--oracle-timeout" in err
    assert not out.exists()
    report = read_json(rep)
    assert report["failed"] is True and report["error_type"] == "OracleError"


def test_cli_bounds_a_server_asking_for_immediate_retries_forever(
    live_server: LiveServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """429 with ``Retry-After: 0`` on every request: waits are honoured (none), attempts are bounded."""
    flaky = FlakyServer(create_app(victim(), name="victim"), period=1, faults=["429"], paths=INFER_PATHS)
    url = live_server(flaky) + "/v2/models/victim"
    argv = ["extract", "--url", url, "--arch", "12-8-2", "--out", str(tmp_path / "x.npz"), "--oracle-timeout", "1"]
    start = time.monotonic()
    assert run_cli(argv) == 1
    assert time.monotonic() - start < 3.0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    # At most one attempt per base delay (0.1 s) of the timeout, and never fewer than the default 30:
    # the run ends at that limit, or at the timeout if the requests themselves are slow.
    assert retry_policy(1.0).max_attempts == 30
    assert 1 < len(flaky.seen) <= 30
    assert ("30 times in a row" in err) == (len(flaky.seen) == 30)


def test_retry_policy_of_oracle_timeout() -> None:
    for seconds in (0.5, 120.0, 3600.0):
        policy = retry_policy(seconds)
        assert policy.total_timeout == seconds
        assert policy.max_attempts >= max(30, seconds / policy.base_delay)
    assert retry_policy(120.0).base_delay == RetryPolicy().base_delay  # the default backoff


def test_cli_failing_metadata_exits_1_within_oracle_timeout(
    live_server: LiveServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A server that is up but keeps answering 503 is a failing oracle (exit 1), not a wrong URL."""
    flaky = FlakyServer(create_app(victim(), name="victim"), period=1, faults=["503"])
    url = live_server(flaky) + "/v2/models/victim"
    out, rep = tmp_path / "x.npz", tmp_path / "r.json"
    argv = ["extract", "--url", url, "--arch", "12-8-2", "--out", str(out), "--report", str(rep)]
    start = time.monotonic()
    assert run_cli([*argv, "--oracle-timeout", "0.5"]) == 1
    assert time.monotonic() - start < 3.0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--oracle-timeout" in err
    assert len(flaky.seen) > 1 and not out.exists()
    report = read_json(rep)
    assert report["failed"] is True and report["error_type"] == "OracleError" and report["queries"] == 0


def test_cli_survives_transient_faults(live_server: LiveServer, tmp_path: Path) -> None:
    """The CLI's default retry policy (0.1 s first backoff) gets through a 20%-flaky server."""
    model = victim(seed=4)
    flaky = FlakyServer(create_app(model, name="victim"), seed=5)
    url = live_server(flaky) + "/v2/models/victim"
    out = tmp_path / "x.npz"
    assert run_cli(["extract", "--url", url, "--arch", "12-8-2", "--out", str(out), "--oracle-timeout", "30"]) == 0
    assert flaky.failures
    from relux.formats import load_model

    report = verify(model, load_model(out), rng=np.random.default_rng(0), n_random=2000, n_lines=16)
    assert report.complete and report.max_norm_weight_error <= MAX_WEIGHT_ERROR, report


# --------------------------------------------------------------------------- wrong URLs: exit 2 at once
def test_cli_refused_connection_exits_2_at_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import socket

    with socket.socket() as s:  # a loopback port with nothing listening on it
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "x.npz"
    start = time.monotonic()
    argv = ["extract", "--url", f"http://127.0.0.1:{port}/v2/models/m", "--arch", "12-8-2", "--out", str(out)]
    assert run_cli(argv) == 2
    assert time.monotonic() - start < 3.0  # no retries (the default timeout is 120 s)
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "connection refused" in err


@pytest.mark.parametrize("protocol", list(CLIENTS))
def test_cli_unknown_model_exits_2_at_once(
    live_server: LiveServer, protocol: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    flaky = FlakyServer(create_app(victim(), name="victim"), period=10**9)  # counts requests, never fails
    url = live_server(flaky) + CLIENTS[protocol][1].replace("victim", "nobody")
    start = time.monotonic()
    assert run_cli(["extract", "--url", url, "--arch", "12-8-2", "--out", str(tmp_path / "x.npz")]) == 2
    assert time.monotonic() - start < 3.0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "404" in err
    assert len(flaky.seen) == 1  # one GET, no retries


# --------------------------------------------------------------------------- unusable answers
@pytest.mark.parametrize("how", ["nan", "inf", "short", "long", "text"])
@pytest.mark.parametrize("after", [0, 12])
def test_unusable_answers_are_oracle_errors_never_used(live_server: LiveServer, how: str, after: int) -> None:
    corrupting = CorruptingServer(create_app(victim(), name="victim"), how, after)
    remote = KServeV2Oracle(live_server(corrupting) + "/v2/models/victim", retry=FAST)
    with pytest.raises(OracleError) as info:
        extract(remote, ARCH, ExtractionConfig(seed=0))
    assert not isinstance(info.value, ExtractionFailed)
    # The first unusable answer ends the run: it is neither retried nor passed on to the attack.
    assert corrupting.corrupted == 1
    assert corrupting.infer_requests == after + 1


def test_cli_unusable_answer_exits_1_without_a_model(
    live_server: LiveServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    corrupting = CorruptingServer(create_app(victim(), name="victim"), "nan", after=3)
    url = live_server(corrupting) + "/v2/models/victim"
    out, rep = tmp_path / "x.npz", tmp_path / "r.json"
    argv = ["extract", "--url", url, "--arch", "12-8-2", "--out", str(out), "--report", str(rep)]
    assert run_cli(argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "NaN/inf" in err
    assert not out.exists()
    report = read_json(rep)
    assert report["failed"] is True and report["error_type"] == "OracleError"
    assert corrupting.corrupted == 1
