"""The retry policy shared by every remote oracle: capped exponential backoff with full jitter.

A request is retried when its failure is *transient*: HTTP 5xx, 408 and 429 (its ``Retry-After`` is
honoured, capped at ``max_delay``), timeouts, and connections refused, reset or dropped mid-run.
Anything else (a 4xx, an answer that cannot be used) fails at once. The whole call gives up with
:class:`~relux.errors.OracleError` after ``total_timeout`` seconds or ``max_attempts`` attempts.

Randomness, sleeping and the clock are explicit arguments so that tests are fast and deterministic.
"""

from __future__ import annotations

import email.utils
import http.client
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TypeVar

import numpy as np

from relux.errors import InputError, OracleError

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Draws uniform floats in [0, 1) for the jitter.
JitterSource = random.Random | np.random.Generator


@dataclass(frozen=True)
class RetryPolicy:
    """How to retry transient failures of a remote oracle.

    ``max_attempts``: attempts per request, the first included (>= 1).
    ``base_delay``: the backoff before the first retry, doubled at each further retry (seconds, >= 0).
    ``max_delay``: the cap on any single wait, backoff or ``Retry-After`` (seconds, >= base_delay).
    ``total_timeout``: give up once a request has been failing for this long (seconds, > 0); this
    is what ``--oracle-timeout`` sets.
    ``jitter``: fraction of each backoff that is randomised, in [0, 1]. 1 is "full jitter" (wait a
    uniform time in (0, cap]); 0 waits exactly the capped exponential backoff.
    """

    max_attempts: int = 30
    base_delay: float = 0.1
    max_delay: float = 10.0
    total_timeout: float = 120.0
    jitter: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.max_attempts, bool) or not isinstance(self.max_attempts, int):
            raise InputError(f"max_attempts must be an integer >= 1, found {self.max_attempts!r}")
        if self.max_attempts < 1:
            raise InputError(f"max_attempts must be >= 1, found {self.max_attempts}")
        for field, value in (("base_delay", self.base_delay), ("max_delay", self.max_delay)):
            if not math.isfinite(value) or value < 0:
                raise InputError(f"{field} must be a finite number of seconds >= 0, found {value!r}")
        if self.max_delay < self.base_delay:
            raise InputError(f"max_delay ({self.max_delay}) must be >= base_delay ({self.base_delay})")
        if not math.isfinite(self.total_timeout) or self.total_timeout <= 0:
            raise InputError(
                f"total_timeout must be a finite number of seconds > 0, found {self.total_timeout!r}"
            )
        if not 0.0 <= self.jitter <= 1.0:
            raise InputError(f"jitter must be in [0, 1], found {self.jitter!r}")

    def backoff_cap(self, retry: int) -> float:
        """The un-jittered wait before retry number ``retry`` (1 for the first retry)."""
        if retry < 1:
            raise ValueError(f"retry numbers start at 1, found {retry}")
        return min(self.max_delay, self.base_delay * 2.0 ** min(retry - 1, 64))

    def backoff(self, retry: int, u: float) -> float:
        """The wait before retry number ``retry`` given a uniform draw ``u`` in [0, 1).

        The wait lies in ``(cap * (1 - jitter), cap]`` where ``cap = backoff_cap(retry)``.
        """
        return self.backoff_cap(retry) * (1.0 - self.jitter * u)

    def retry_after_delay(self, retry_after: float) -> float:
        """The wait a server asked for with ``Retry-After``, capped at ``max_delay``."""
        return min(max(retry_after, 0.0), self.max_delay)


class TransientError(Exception):
    """A failure worth retrying (an HTTP 5xx, 408 or 429). ``retry_after`` is the server's hint, if any."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


#: Exceptions that :func:`call_with_retry` retries. ``ConnectionError`` covers refused, reset and
#: aborted connections and broken pipes; ``http.client.RemoteDisconnected`` is one too.
TRANSIENT_EXCEPTIONS: tuple[type[BaseException], ...] = (
    TransientError,
    TimeoutError,
    ConnectionError,
    http.client.IncompleteRead,
    http.client.BadStatusLine,
    http.client.ImproperConnectionState,
)


def is_transient_status(status: int) -> bool:
    """True for the HTTP statuses worth retrying: 408, 429 and every 5xx."""
    return status in (408, 429) or 500 <= status <= 599


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or an HTTP date), or ``None``."""
    if value is None or not value.strip():
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - (now or datetime.now(UTC))).total_seconds()
    if not math.isfinite(seconds):
        return None
    return max(seconds, 0.0)


def describe_exception(exc: BaseException) -> str:
    """A one-line description of a failure, for error messages."""
    text = " ".join(str(exc).split())
    if isinstance(exc, TransientError):
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def call_with_retry(
    request: Callable[[float], T],
    policy: RetryPolicy,
    *,
    rng: JitterSource,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    what: str = "request",
) -> T:
    """Run ``request(remaining_seconds)`` until it succeeds, retrying transient failures.

    ``request`` receives the seconds left before ``policy.total_timeout`` so that it can bound its
    own socket timeout. Exceptions in :data:`TRANSIENT_EXCEPTIONS` are retried after a capped,
    jittered exponential backoff (or the server's ``Retry-After``, capped); any other exception
    propagates at once. Raises :class:`OracleError` when the attempts or the time run out, never
    sleeping past the deadline.
    """
    start = clock()
    deadline = start + policy.total_timeout
    attempt = 0
    while True:
        attempt += 1
        remaining = deadline - clock()
        if remaining <= 0:
            raise OracleError(_give_up_message(what, policy, attempt - 1, clock() - start, None))
        try:
            return request(remaining)
        except TRANSIENT_EXCEPTIONS as exc:
            failure: BaseException = exc
        if attempt >= policy.max_attempts:
            raise OracleError(
                f"{what} failed {attempt} times in a row (the limit); last error: "
                f"{describe_exception(failure)}. Check that the server is healthy."
            ) from failure
        hint = failure.retry_after if isinstance(failure, TransientError) else None
        if hint is not None:
            delay = policy.retry_after_delay(hint)
        else:
            delay = policy.backoff(attempt, float(rng.random()))
        if clock() + delay >= deadline:
            raise OracleError(
                _give_up_message(what, policy, attempt, clock() - start, failure)
            ) from failure
        logger.debug(
            "%s failed (attempt %d: %s); retrying in %.3f s",
            what,
            attempt,
            describe_exception(failure),
            delay,
        )
        sleep(delay)


def _give_up_message(
    what: str, policy: RetryPolicy, attempts: int, elapsed: float, failure: BaseException | None
) -> str:
    last = f"; last error: {describe_exception(failure)}" if failure is not None else ""
    return (
        f"{what} still failing after {elapsed:.1f} s and {attempts} attempt(s) "
        f"(total timeout {policy.total_timeout:g} s){last}. "
        "Check that the server is up, or allow more time with --oracle-timeout."
    )


__all__ = [
    "RetryPolicy",
    "TransientError",
    "TRANSIENT_EXCEPTIONS",
    "is_transient_status",
    "parse_retry_after",
    "describe_exception",
    "call_with_retry",
]
