"""Shared HTTP fixtures: a real uvicorn server on a free loopback port, in a background thread."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import pytest
from starlette.types import ASGIApp

from relux.serve import background_server


@pytest.fixture
def live_server() -> Iterator[Callable[[ASGIApp], str]]:
    """``live_server(app)`` starts ``app`` on 127.0.0.1 and returns its base URL; stopped after the test."""
    with contextlib.ExitStack() as stack:
        yield lambda app: stack.enter_context(background_server(app, host="127.0.0.1", port=0))
