"""Parallel execution of pure per-item work: serially, on joblib (loky processes) or on Ray.

The attack keeps the oracle in the parent process. Work is split as *plan* (pure, per item) ->
the parent queries everything in one batched call -> *solve* (pure, per item); only the pure steps go
through an :class:`Executor`. Tasks receive every random draw they need from the parent (drawn from
the run's generator in item order), never from worker identity, so a run's result does not depend
on the backend or on the number of workers.

Usage::

    with make_executor("loky", jobs=4) as ex:
        squares = ex.map(square, range(10))   # order preserved
        ex.parallel_seconds                   # wall time spent inside map

Task functions and items must be picklable (module-level functions, arrays, dataclasses).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Iterable, Sequence
from types import TracebackType
from typing import Any, Generic, Protocol, TypeVar

from relux.errors import InputError

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

#: Backends accepted by :func:`make_executor` (``serial`` is what ``loky`` with one job becomes).
BACKENDS = ("serial", "loky", "ray")

RAY_INSTALL_HINT = "install it with: pip install 'relux[ray]' (or pip install ray)"


class Executor(Protocol):
    """Runs a pure function over items, returning the results in item order."""

    @property
    def backend(self) -> str: ...

    @property
    def jobs(self) -> int: ...

    @property
    def parallel_seconds(self) -> float:
        """Wall time spent inside :meth:`map` so far."""
        ...

    def map(self, fn: Callable[[T], R], items: Iterable[T]) -> list[R]: ...


class OneBlasThread(Generic[T, R]):
    """``fn`` run with a single BLAS thread, wherever it runs.

    OpenBLAS can round differently with different numbers of threads (it splits some products
    along the summed dimension), and workers run with fewer threads than the parent. Pinning every
    task to one thread makes its result the same in the parent, in a loky worker and in a Ray worker
    (on the same CPU type and numpy build).
    """

    def __init__(self, fn: Callable[[T], R], controller: Any = None) -> None:
        self.fn = fn
        # In the parent: a ThreadpoolController found once per executor (finding the BLAS libraries
        # costs ~0.3 ms, limiting with a known controller ~5 us). Never shipped to workers.
        self._controller = controller

    def __getstate__(self) -> dict[str, Any]:
        return {"fn": self.fn, "_controller": None}

    def __call__(self, item: T) -> R:
        if self._controller is not None:
            with self._controller.limit(limits=1, user_api="blas"):
                return self.fn(item)
        from threadpoolctl import threadpool_limits

        with threadpool_limits(limits=1, user_api="blas"):
            return self.fn(item)


class BaseExecutor:
    """Times :meth:`map`, and is a context manager that releases the executor's resources."""

    backend = "base"

    def __init__(self, jobs: int) -> None:
        if not isinstance(jobs, int) or isinstance(jobs, bool) or jobs < 1:
            raise InputError(f"jobs: expected an integer >= 1, found {jobs!r}")
        self._jobs = jobs
        self._seconds = 0.0
        self._startup = 0.0

    @property
    def jobs(self) -> int:
        return self._jobs

    @property
    def parallel_seconds(self) -> float:
        return self._seconds

    @property
    def startup_seconds(self) -> float:
        """Wall time spent starting or connecting to workers before the first task (Ray only)."""
        return self._startup

    def map(self, fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
        """``[fn(x) for x in items]``, possibly in other processes; an exception in a task propagates."""
        seq = list(items)
        t0 = time.perf_counter()
        try:
            return self._map(OneBlasThread(fn, self._local_controller()), seq) if seq else []
        finally:
            self._seconds += time.perf_counter() - t0

    def _map(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
        raise NotImplementedError

    def _local_controller(self) -> Any:
        """A thread-pool controller for tasks run in this process (None: each task finds its own)."""
        return None

    def close(self) -> None:
        """Release workers this executor started (idempotent)."""

    def __enter__(self) -> BaseExecutor:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(jobs={self.jobs}, parallel_seconds={self.parallel_seconds:.3f})"


class SerialExecutor(BaseExecutor):
    """Runs every task in this process, in order."""

    backend = "serial"

    def __init__(self) -> None:
        super().__init__(1)
        self._controller: Any = None

    def _local_controller(self) -> Any:
        if self._controller is None:
            from threadpoolctl import ThreadpoolController

            self._controller = ThreadpoolController()
        return self._controller

    def _map(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
        return [fn(x) for x in items]


class JoblibExecutor(BaseExecutor):
    """joblib with the loky backend: ``jobs`` worker processes on this machine.

    One ``joblib.Parallel`` session serves every :meth:`map` until :meth:`close`, which ends it and
    removes its temporary files. The worker processes belong to loky's reusable pool: they stay
    warm for the next session in this process and exit after loky's idle timeout or with it.
    """

    backend = "loky"

    def __init__(self, jobs: int) -> None:
        super().__init__(jobs)
        self._parallel: Any = None

    def _map(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
        from joblib import Parallel, delayed

        if self._parallel is None:
            self._parallel = Parallel(n_jobs=self.jobs, backend="loky").__enter__()
        return list(self._parallel(delayed(fn)(x) for x in items))

    def close(self) -> None:
        parallel, self._parallel = self._parallel, None
        if parallel is not None:
            parallel.__exit__(None, None, None)


class RayExecutor(BaseExecutor):
    """Ray tasks, on a local instance or on a cluster.

    ``address=None`` starts a local instance with ``jobs`` CPUs whose services all listen on
    127.0.0.1 only, with no dashboard and usage statistics off, and shuts it down on :meth:`close`.
    With an ``address`` (e.g. ``ray://head:10001`` or ``auto``) relux connects to that cluster (whose
    workers must be able to import relux) and disconnects on :meth:`close`, leaving the cluster
    running. A Ray instance this process already runs is reused and left alone.
    """

    backend = "ray"

    def __init__(self, jobs: int, address: str | None = None) -> None:
        super().__init__(jobs)
        t0 = time.perf_counter()
        self._address = address
        self._initialised_here = False
        self._remote: Any = None  # the Ray task that applies a function to an item
        self._restore: Callable[[], None] = _nothing
        if address is None:
            # Before ray is imported (it reads these once): Ray's single-machine mode, which puts
            # every service on the loopback address, and no usage statistics.
            self._restore = _set_env({"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"})
        ray = _import_ray()
        if ray.is_initialized():
            log.info("ray: reusing the instance this process already runs")
            self._restore()
            return
        if address is not None:
            _check_reachable(address)  # ray itself retries an unreachable address for minutes
        try:
            if address is None:
                self._restore = _chain(self._restore, _loopback_constant(ray))
                ctx = ray.init(
                    num_cpus=jobs,
                    include_dashboard=False,
                    log_to_driver=False,
                    configure_logging=False,
                    _node_ip_address="127.0.0.1",
                )
            else:
                ctx = ray.init(address=address, log_to_driver=False, configure_logging=False)
        except (ConnectionError, ValueError, RuntimeError, TimeoutError) as exc:
            self.close()
            where = "start a local Ray instance" if address is None else f"connect to the Ray cluster at {address}"
            raise InputError(f"could not {where}: {type(exc).__name__}: {exc}") from exc
        self._initialised_here = True
        self._startup = time.perf_counter() - t0
        if address is not None:
            log.info("ray: connected to %s", address)
            return
        ip = str(getattr(ctx, "address_info", {}).get("node_ip_address", ""))
        if ip not in ("127.0.0.1", "localhost", "::1"):
            self.close()
            raise InputError(f"the local Ray instance came up on {ip!r}, not on 127.0.0.1; relux stopped it")
        log.info("ray: started a local instance on 127.0.0.1 with %d CPUs", jobs)

    @property
    def address(self) -> str | None:
        return self._address

    def _map(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
        ray = _import_ray()
        if self._remote is None:
            self._remote = ray.remote(_apply)
        refs = [self._remote.remote(fn, x) for x in items]
        return list(ray.get(refs))

    def close(self) -> None:
        """Shut down the local instance started here (or disconnect from the cluster); idempotent."""
        self._remote = None
        if self._initialised_here:
            self._initialised_here = False
            _import_ray().shutdown()
            log.info("ray: %s", "shut down the local instance" if self._address is None else "disconnected")
        restore, self._restore = self._restore, _nothing
        restore()


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """An :class:`InputError` unless ``[ray://]HOST:PORT`` accepts a TCP connection (``auto`` is not checked)."""
    rest = address.split("://", 1)[1] if "://" in address else address
    if rest == "auto":
        return
    host, sep, port = rest.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise InputError(f"Ray cluster address {address!r}: expected HOST:PORT, ray://HOST:PORT or auto")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        raise InputError(
            f"could not reach the Ray cluster at {address}: {exc}; check --address (is the cluster running?)"
        ) from exc


def _nothing() -> None:
    return None


def _chain(first: Callable[[], None], second: Callable[[], None]) -> Callable[[], None]:
    def both() -> None:
        second()
        first()

    return both


def _set_env(values: dict[str, str]) -> Callable[[], None]:
    """Set environment variables; returns the function that restores their previous values."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)

    def restore() -> None:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

    return restore


def _loopback_constant(ray: Any) -> Callable[[], None]:
    """Single-machine mode for a ray module imported before :func:`_set_env` could take effect."""
    consts = getattr(getattr(ray, "_private", None), "ray_constants", None)
    old = getattr(consts, "ENABLE_RAY_CLUSTER", None)
    if consts is None or old is None:
        return _nothing
    consts.ENABLE_RAY_CLUSTER = False

    def restore() -> None:
        consts.ENABLE_RAY_CLUSTER = old

    return restore


def _apply(fn: Callable[[T], R], item: T) -> R:
    """The one Ray task: ``fn(item)`` (a module-level function, as ``ray.remote`` requires)."""
    return fn(item)


def _import_ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise InputError(f"the ray backend needs the ray package, which is not installed; {RAY_INSTALL_HINT}") from exc
    return ray


def make_executor(backend: str = "loky", jobs: int = 1, address: str | None = None) -> BaseExecutor:
    """The executor for ``backend`` (``serial``, ``loky`` or ``ray``) with ``jobs`` workers.

    ``loky`` with one job runs serially (no worker pool). ``address`` is for ``ray`` only. Use the
    result as a context manager so that the workers it started are released. Bad values raise
    :class:`~relux.errors.InputError`.
    """
    if backend not in BACKENDS:
        raise InputError(f"backend: expected one of {', '.join(BACKENDS)}, found {backend!r}")
    if not isinstance(jobs, int) or isinstance(jobs, bool) or jobs < 1:
        raise InputError(f"jobs: expected an integer >= 1, found {jobs!r}")
    if address is not None and backend != "ray":
        raise InputError(f"a cluster address ({address!r}) needs the ray backend; found backend {backend!r}")
    if backend == "ray":
        return RayExecutor(jobs, address)
    if backend == "serial" or jobs == 1:
        return SerialExecutor()
    return JoblibExecutor(jobs)


def execution_report(executor: Executor, stages: Sequence[tuple[str, int | None, float]]) -> dict[str, Any]:
    """The ``execution`` entry of a report: how the work ran, and the parallel seconds per stage.

    ``stages`` holds ``(name, layer, seconds spent inside executor.map)`` per pipeline stage.
    ``startup_seconds`` (starting or joining a Ray instance) precedes the run and is not part of its
    ``seconds``; loky starts its workers inside the first ``map``, which counts as parallel time.
    """
    return {
        "jobs": executor.jobs,
        "backend": executor.backend,
        "parallel_seconds": round(executor.parallel_seconds, 4),
        "startup_seconds": round(float(getattr(executor, "startup_seconds", 0.0)), 4),
        "stages": [{"name": name, "layer": layer, "parallel_seconds": round(sec, 4)} for name, layer, sec in stages],
    }


def split_evenly(n: int, parts: int) -> list[range]:
    """``range(n)`` cut into at most ``parts`` consecutive, non-empty, near-equal ranges."""
    parts = max(1, min(parts, n))
    edges = [(n * i) // parts for i in range(parts + 1)]
    return [range(edges[i], edges[i + 1]) for i in range(parts) if edges[i + 1] > edges[i]]


def map_rows(executor: Executor | None, fn: Callable[[Any], list[R]], rows: Any, *shared: Any) -> list[R]:
    """``fn((*shared, block))`` over consecutive blocks of ``rows`` (:func:`split_evenly`, one per
    worker), the results joined in row order: one call in this process without an executor or with one
    job. For pure per-row work whose arrays ``shared`` every block needs."""
    blocks = split_evenly(len(rows), executor.jobs if executor is not None else 1)
    if executor is None or len(blocks) < 2:
        return fn((*shared, rows))
    return [r for rs in executor.map(fn, [(*shared, rows[b.start : b.stop]) for b in blocks]) for r in rs]


__all__ = [
    "BACKENDS",
    "BaseExecutor",
    "Executor",
    "JoblibExecutor",
    "OneBlasThread",
    "RayExecutor",
    "SerialExecutor",
    "execution_report",
    "make_executor",
    "map_rows",
    "split_evenly",
]
