"""A first attempt made to miss a neuron, for the tests of resumed attempts (``test_resume``, ``test_carry``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from relux.attack import pipeline


def spoil_first_attempt(monkeypatch: pytest.MonkeyPatch, spoil: Callable[[Any, Any], tuple[Any, Any]]) -> list[Any]:
    """Patch ``pipeline._extract_deep`` so that the first attempt's ``(model, reports)`` pass through ``spoil``
    (the later attempts run as they are). Returns the list that collects each attempt's ``resume`` argument."""
    real = pipeline._extract_deep
    calls: list[Any] = []

    def fake(*args: Any, **kwargs: Any) -> Any:
        calls.append(args[7] if len(args) > 7 else kwargs.get("resume"))
        out = real(*args, **kwargs)
        if len(calls) > 1:
            return out
        model, reports, *rest = out
        return (*spoil(model, reports), *rest)

    monkeypatch.setattr(pipeline, "_extract_deep", fake)
    return calls
