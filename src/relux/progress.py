"""Progress of an attack on stderr: a tqdm counter of the queries that pass through an oracle.

The attack itself knows nothing about progress bars; the command line wraps the victim's oracle in
:class:`QueryProgress`, which counts rows as they are answered. Logging lines are kept apart from
the bar with :func:`tqdm.contrib.logging.logging_redirect_tqdm` (see :func:`progress_logging`).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from types import TracebackType
from typing import TextIO

from tqdm import tqdm

from relux.oracle.base import FloatArray, Oracle, as_query_batch
from relux.oracle.wrappers import OracleWrapper


class QueryProgress(OracleWrapper):
    """Forwards queries to ``inner`` and advances a tqdm counter (unit: query row) on ``stream``.

    ``total``: the expected number of queries (e.g. a budget), or ``None`` for an open-ended counter.
    ``disable``: ``True`` for no bar (``relux -q``), ``None`` for a bar only when ``stream`` is a
    terminal. Close it with :meth:`close` or use it as a context manager.
    """

    def __init__(
        self,
        inner: Oracle,
        *,
        desc: str = "queries",
        total: int | None = None,
        disable: bool | None = False,
        stream: TextIO | None = None,
    ) -> None:
        super().__init__(inner)
        self._bar = tqdm(
            total=total,
            desc=desc,
            unit="q",
            unit_scale=True,
            file=stream if stream is not None else sys.stderr,
            disable=disable,
            dynamic_ncols=True,
            leave=False,
        )

    def query(self, X: FloatArray) -> FloatArray:
        A = as_query_batch(X, self.input_dim)
        Y = self.inner.query(A)
        self._bar.update(A.shape[0])
        return Y

    def close(self) -> None:
        self._bar.close()

    def __enter__(self) -> QueryProgress:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


@contextlib.contextmanager
def progress_logging(enabled: bool) -> Iterator[None]:
    """While the block runs, route logging through ``tqdm.write`` so log lines do not break the bar."""
    if not enabled:
        yield
        return
    from tqdm.contrib.logging import logging_redirect_tqdm

    with logging_redirect_tqdm():
        yield


__all__ = ["QueryProgress", "progress_logging"]
