"""The relux exception hierarchy.

Every error relux raises on purpose derives from :class:`ReluxError`. Messages say what was
expected, what was found, and what to do about it.
"""

from __future__ import annotations

from typing import Any


class ReluxError(Exception):
    """Base class of every error relux raises deliberately."""


class InputError(ReluxError, ValueError):
    """Bad input from the user: a missing, corrupt or unsupported file, or a malformed argument."""


class OracleError(ReluxError):
    """The oracle failed, or answered with something that cannot be used (wrong shape, NaN, inf)."""


class BudgetExhausted(OracleError):
    """The query budget is spent. ``queries`` says how many were made before the limit."""

    def __init__(self, message: str, *, queries: int, budget: int) -> None:
        super().__init__(message)
        self.queries = queries
        self.budget = budget


class ExtractionFailed(ReluxError):
    """An attack stage could not produce a result that fresh queries confirm.

    ``partial`` holds whatever was recovered before the failure (may be ``None``). ``restartable``:
    whether a deep extraction may start a new attempt from new random lines (a failed check: yes; a
    caller's deadline: no, every new attempt would stop at once).
    """

    restartable: bool = True

    def __init__(self, message: str, *, partial: Any = None) -> None:
        super().__init__(message)
        self.partial = partial
