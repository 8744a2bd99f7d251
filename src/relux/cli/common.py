"""Helpers shared by the ``relux`` subcommands."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import numpy as np

from relux.errors import InputError, OracleError, ReluxError
from relux.oracle.base import FloatArray


class GuardedCallable:
    """A user's oracle callable ``fn(X) -> Y`` made to fail like the rest of the CLI.

    Until ``fn`` has answered once, a failure means that it does not fit the architecture the user
    gave (``--arch``): an exception raised by ``fn``, or an answer whose shape is not ``(n, k)``, is an
    :class:`InputError` (exit status 2) saying so. Afterwards, an exception raised by ``fn`` is an
    :class:`OracleError` (the oracle broke mid-run, exit status 1). Answers are passed on unchanged;
    :class:`~relux.oracle.local.CallableOracle` validates them (NaN, inf, shape).
    """

    def __init__(self, fn: Callable[[FloatArray], Any], name: str, input_dim: int, output_dim: int) -> None:
        self._fn = fn
        self._name = name
        self._d = input_dim
        self._k = output_dim
        self._answered = False

    def __call__(self, X: FloatArray) -> Any:
        try:
            Y = self._fn(X)
        except ReluxError:
            raise
        except Exception as exc:
            what = f"oracle {self._name} raised {type(exc).__name__}: {exc} on a batch of shape {X.shape}"
            if not self._answered:
                raise InputError(f"{what}; check that it takes {self._d} inputs ({self._arch_hint()})") from exc
            raise OracleError(what) from exc
        if not self._answered:
            self._check_first_shape(Y, X.shape[0])
            self._answered = True
        return Y

    def _arch_hint(self) -> str:
        return f"--arch says {self._d} inputs and {self._k} outputs"

    def _check_first_shape(self, Y: Any, n: int) -> None:
        try:
            shape: tuple[int, ...] | None = tuple(np.shape(Y))
        except ValueError:  # ragged nested lists
            shape = None
        if shape == (n, self._k) or (self._k == 1 and shape == (n,)):
            return
        found = "a ragged or non-array answer" if shape is None else f"shape {shape}"
        raise InputError(
            f"oracle {self._name} answered a batch of {n} rows with {found}; expected ({n}, {self._k}). "
            f"Check the architecture: {self._arch_hint()}"
        )


__all__ = ["GuardedCallable"]


def _int_at_least(text: str, minimum: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, found {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"expected {what}, found {text!r}")
    return value


def nonneg_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    return _int_at_least(text, 0, "a non-negative integer")


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return _int_at_least(text, 1, "a positive integer")


def add_parallel_options(parser: argparse.ArgumentParser) -> None:
    """``--jobs``, ``--backend`` and ``--address`` (:mod:`relux.parallel`), shared by ``extract`` and ``bench``."""
    # the oracle stays in this process; results do not depend on --jobs
    parser.add_argument(
        "--jobs",
        type=positive_int,
        default=1,
        metavar="N",
        help="workers for the per-neuron work; the victim is still queried from this process only, and the "
        "result is the same for every N (default 1)",
    )
    parser.add_argument(
        "--backend",
        choices=("loky", "ray"),
        default="loky",
        help="where the workers run: loky (processes on this machine) or ray (a local Ray instance on "
        "127.0.0.1, or the cluster at --address; needs pip install 'relux[ray]') (default loky)",
    )
    parser.add_argument(
        "--address",
        metavar="ADDR",
        default=None,
        help="with --backend ray: address of a running Ray cluster (e.g. ray://HOST:10001 or auto); "
        "without it a local instance is started and stopped",
    )


def parallel_options(args: argparse.Namespace) -> dict[str, Any]:
    """``jobs``, ``backend`` and ``ray_address`` of the config, checked before anything starts."""
    import importlib.util

    jobs = int(getattr(args, "jobs", 1))
    backend = str(getattr(args, "backend", "loky"))
    address = getattr(args, "address", None)
    if address is not None and backend != "ray":
        raise InputError(f"--address {address} is the address of a Ray cluster: it needs --backend ray")
    if address is not None and not str(address).strip():
        raise InputError("--address is empty: expected a Ray cluster address such as ray://HOST:10001 or auto")
    if backend == "ray" and importlib.util.find_spec("ray") is None:
        from relux.parallel import RAY_INSTALL_HINT

        raise InputError(f"--backend ray needs the ray package, which is not installed; {RAY_INSTALL_HINT}")
    return {"jobs": jobs, "backend": backend, "ray_address": address}
