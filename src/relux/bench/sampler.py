"""A statistical profiler for long benchmark runs: where the wall time goes, at almost no cost.

:class:`StackSampler` wakes every ``interval`` seconds in a daemon thread and records the Python stack of
the thread that started it. A function's *self* time is the samples in which it is the innermost frame;
the *inclusive* time of a relux function the samples in which it is anywhere on the stack (counted once
per sample). Times are
samples x interval, so a figure is accurate to a few intervals. Numpy and BLAS release the GIL, so the
sampler also sees the stack while a large matrix product runs (charged to the Python line that called it).
"""

from __future__ import annotations

import sys
import threading
import time
from collections import Counter
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

#: Default seconds between two samples.
DEFAULT_INTERVAL = 0.25


def _label(frame: FrameType) -> str:
    """``relux/attack/deep.py:extract_layer`` (path from the package directory when possible)."""
    code = frame.f_code
    parts = Path(code.co_filename).parts
    for anchor in ("relux", "numpy", "scipy"):
        if anchor in parts:
            i = len(parts) - 1 - parts[::-1].index(anchor)
            return "/".join(parts[i:]) + ":" + code.co_name
    return f"{Path(code.co_filename).name}:{code.co_name}"


class StackSampler:
    """Samples the calling thread's stack in the background; use as a context manager.

    ``summary(top)`` gives the ``top`` functions by self time and the ``top`` relux functions by inclusive
    time.
    """

    def __init__(self, interval: float = DEFAULT_INTERVAL) -> None:
        if not interval > 0:
            raise ValueError(f"interval must be positive, found {interval!r}")
        self.interval = interval
        self.samples = 0
        self.self_counts: Counter[str] = Counter()
        self.inclusive_counts: Counter[str] = Counter()
        self._target = threading.get_ident()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = 0.0
        self.seconds = 0.0

    def start(self) -> StackSampler:
        self._target = threading.get_ident()
        self._t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._run, name="relux-stack-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5.0)
        self.seconds = time.perf_counter() - self._t0

    def __enter__(self) -> StackSampler:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            frame = sys._current_frames().get(self._target)
            if frame is None:
                continue
            self.record(frame)

    def record(self, frame: FrameType) -> None:
        """Count one sample whose innermost frame is ``frame``."""
        self.samples += 1
        self.self_counts[_label(frame)] += 1
        seen: set[str] = set()
        f: FrameType | None = frame
        while f is not None:
            label = _label(f)
            if label.startswith("relux/"):
                seen.add(label)
            f = f.f_back
        self.inclusive_counts.update(seen)

    def summary(self, top: int = 20) -> dict[str, Any]:
        """JSON-ready: interval, samples, and the ``top`` functions by self and inclusive seconds."""

        def table(counts: Counter[str]) -> list[dict[str, Any]]:
            return [
                {"function": name, "seconds": round(n * self.interval, 2),
                 "fraction": round(n / self.samples, 4) if self.samples else None}
                for name, n in counts.most_common(top)
            ]

        return {
            "interval": self.interval,
            "samples": self.samples,
            "seconds": round(self.seconds, 2),
            "self": table(self.self_counts),
            "inclusive": table(self.inclusive_counts),
        }
