"""The shared retry policy, with a fake clock and sleep: backoff, jitter, Retry-After, give-up rules."""

from __future__ import annotations

import random
from datetime import UTC, datetime

import numpy as np
import pytest

from relux.errors import InputError, OracleError
from relux.oracle.retry import (
    RetryPolicy,
    TransientError,
    call_with_retry,
    is_transient_status,
    parse_retry_after,
)


class FakeTime:
    """A clock that only moves when ``sleep`` is called; records every sleep."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.sleeps.append(seconds)
        self.now += seconds


def failing(times: int, exc: BaseException, value: str = "ok") -> tuple[list[float], object]:
    """A request that raises ``exc`` ``times`` times, then returns ``value``; records ``remaining``."""
    seen: list[float] = []

    def request(remaining: float) -> str:
        seen.append(remaining)
        if len(seen) <= times:
            raise exc
        return value

    return seen, request


def run(request: object, policy: RetryPolicy, t: FakeTime, seed: int = 0) -> object:
    rng = random.Random(seed)
    return call_with_retry(request, policy, rng=rng, sleep=t.sleep, clock=t.clock)  # type: ignore[arg-type]


def test_backoff_doubles_and_is_capped_without_jitter() -> None:
    t = FakeTime()
    policy = RetryPolicy(max_attempts=8, base_delay=0.1, max_delay=1.0, total_timeout=100.0, jitter=0.0)
    seen, request = failing(7, TimeoutError("slow"))
    assert run(request, policy, t) == "ok"
    assert len(seen) == 8
    # Exact: with jitter 0 the waits are min(max_delay, base * 2**i) (powers of two times 0.1).
    assert t.sleeps == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0], rel=0, abs=1e-15)


@pytest.mark.parametrize("jitter", [1.0, 0.5, 0.25])
def test_jittered_waits_stay_within_bounds_and_are_deterministic(jitter: float) -> None:
    policy = RetryPolicy(max_attempts=40, base_delay=0.05, max_delay=2.0, total_timeout=1e6, jitter=jitter)
    runs = []
    for _ in range(2):
        t = FakeTime()
        _, request = failing(39, ConnectionResetError("reset"))
        run(request, policy, t, seed=7)
        runs.append(t.sleeps)
        for retry, slept in enumerate(t.sleeps, start=1):
            cap = policy.backoff_cap(retry)
            assert cap * (1 - jitter) <= slept <= cap
    assert runs[0] == runs[1]  # same seed, same waits
    assert len(set(runs[0])) > 10  # and they are actually randomised


def test_numpy_generator_is_accepted_as_jitter_source() -> None:
    t = FakeTime()
    policy = RetryPolicy(max_attempts=5, base_delay=1.0, max_delay=1.0, total_timeout=100.0)
    _, request = failing(4, ConnectionRefusedError("refused"))
    out = call_with_retry(request, policy, rng=np.random.default_rng(3), sleep=t.sleep, clock=t.clock)
    assert out == "ok"
    assert all(0 < s <= 1.0 for s in t.sleeps)


def test_retry_after_is_honoured_and_capped() -> None:
    t = FakeTime()
    policy = RetryPolicy(max_attempts=5, base_delay=0.01, max_delay=5.0, total_timeout=100.0)
    hints = iter([3.0, 60.0, 0.0])

    def request(remaining: float) -> str:
        hint = next(hints, None)
        if hint is not None:
            raise TransientError("HTTP 429", retry_after=hint)
        return "ok"

    assert run(request, policy, t) == "ok"
    assert t.sleeps == [3.0, 5.0, 0.0]  # as asked, then capped at max_delay, then none


def test_other_exceptions_propagate_at_once() -> None:
    for exc in (OracleError("HTTP 400: bad"), ValueError("x"), InputError("refused")):
        t = FakeTime()
        seen, request = failing(1, exc)
        with pytest.raises(type(exc)):
            run(request, RetryPolicy(), t)
        assert len(seen) == 1 and t.sleeps == []


def test_gives_up_after_max_attempts() -> None:
    t = FakeTime()
    seen, request = failing(100, TransientError("HTTP 503 Service Unavailable: down"))
    with pytest.raises(OracleError, match="failed 4 times.*503"):
        run(request, RetryPolicy(max_attempts=4, base_delay=0.01, max_delay=0.1), t)
    assert len(seen) == 4 and len(t.sleeps) == 3


def test_gives_up_within_total_timeout_and_never_sleeps_past_it() -> None:
    t = FakeTime()
    policy = RetryPolicy(max_attempts=10_000, base_delay=0.5, max_delay=4.0, total_timeout=30.0)
    seen, request = failing(10_000, TimeoutError("timed out"))
    with pytest.raises(OracleError, match="total timeout 30 s.*TimeoutError"):
        run(request, policy, t)
    assert sum(t.sleeps) < 30.0
    assert 5 < len(seen) < 200
    # Each attempt is told how much time is left, and that only decreases.
    assert seen[0] == 30.0 and all(b < a for a, b in zip(seen, seen[1:], strict=False))


def test_retry_after_beyond_deadline_gives_up_without_sleeping() -> None:
    t = FakeTime()
    _, request = failing(1, TransientError("HTTP 429", retry_after=50.0))
    with pytest.raises(OracleError, match="still failing"):
        run(request, RetryPolicy(max_delay=60.0, total_timeout=10.0), t)
    assert t.sleeps == []


def test_transient_statuses() -> None:
    assert all(is_transient_status(s) for s in (408, 429, 500, 502, 503, 504, 599))
    assert not any(is_transient_status(s) for s in (200, 400, 401, 403, 404, 405, 413, 422))


def test_parse_retry_after() -> None:
    assert parse_retry_after("5") == 5.0
    assert parse_retry_after(" 0.5 ") == 0.5
    assert parse_retry_after("-3") == 0.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    assert parse_retry_after("inf") is None
    now = datetime(2024, 1, 1, 12, 0, 0, tzinfo=UTC)
    assert parse_retry_after("Mon, 01 Jan 2024 12:00:30 GMT", now=now) == 30.0
    assert parse_retry_after("Mon, 01 Jan 2024 11:00:00 GMT", now=now) == 0.0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_attempts": 0},
        {"max_attempts": 2.5},
        {"base_delay": -1.0},
        {"base_delay": 2.0, "max_delay": 1.0},
        {"total_timeout": 0.0},
        {"total_timeout": float("inf")},
        {"jitter": 1.5},
    ],
)
def test_policy_validation(kwargs: dict[str, float]) -> None:
    with pytest.raises(InputError):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]
