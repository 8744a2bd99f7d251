"""Immutable results of an extraction run."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from relux.model import MLP, format_arch


@dataclass(frozen=True)
class StageStats:
    """Queries and wall time one stage of the pipeline spent."""

    name: str
    queries: int
    seconds: float
    layer: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "queries": self.queries, "seconds": round(self.seconds, 4), "layer": self.layer}


@dataclass(frozen=True)
class SelfCheck:
    """The ground-truth-free verdict: the extracted model against fresh oracle queries."""

    points: int
    max_abs_error: float
    #: max |f - f_hat| / max |f| over the check points; on the random lines, each against its own max |f|
    max_rel_error: float
    tolerance: float
    noise_floor: float
    passed: bool
    #: the fresh Gaussian points among ``points`` (the others are probes, lie on lines through witnesses, are
    #: earlier disagreements queried again, or lie on random lines across the first-layer hyperplanes)
    random_points: int = 0
    #: how many of the ``random_points`` disagreed beyond the tolerance (a model wrong on a small share
    #: of the inputs lacks a rarely active neuron; a wrong layer disagrees almost everywhere)
    disagreeing: int = 0
    #: fresh probes among ``points`` besides the random ones (:mod:`relux.attack.probes`: inputs where a
    #: hidden layer's output is extreme, or where a row and an input coordinate seldom on together are both
    #: on; not a sample of the input distribution)
    probe_points: int = 0
    #: inputs where the model disagreed with the oracle beyond the tolerance (at most 16): those of the
    #: random points, witness lines and earlier disagreements worst first, then the random lines' worst
    #: two each; a restarted attempt aims search lines there (not in ``to_json``)
    disagreements: tuple[tuple[float, ...], ...] = field(default=(), repr=False, compare=False)

    @property
    def disagreement_bound(self) -> float:
        """When the check passed on ``random_points`` fresh random inputs, the probability (under the
        check's input distribution) of an input where the model is wrong is below this, at 95%
        confidence (the rule of three); 1 when no random point was checked or the check failed."""
        return min(1.0, 3.0 / self.random_points) if self.random_points and self.passed else 1.0

    def to_json(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k != "disagreements"}
        out["disagreement_bound"] = self.disagreement_bound if self.passed else None
        return out


@dataclass(frozen=True)
class LayerReport:
    """Per hidden layer: how it was recovered."""

    index: int
    width: int
    recovered: int
    dead: int
    witnesses: int
    queries: int
    seconds: float
    sign_method: str
    neurons: tuple[dict[str, Any], ...] = field(default_factory=tuple)
    #: The layer's own check: the largest relative misfit of a row to exact points of its boundary
    #: (for the first layer of a deep network, the disagreement of two refinements). NaN when unmeasured.
    residual: float = float("nan")

    def to_json(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["neurons"] = list(self.neurons)
        d["residual"] = None if self.residual != self.residual else self.residual  # NaN is not JSON
        return d


@dataclass(frozen=True)
class ExtractionResult:
    """What :func:`relux.extract` returns: the model, its cost, and its self-check."""

    model: MLP
    arch: tuple[int, ...]
    queries: int
    seconds: float
    stages: tuple[StageStats, ...]
    layers: tuple[LayerReport, ...]
    selfcheck: SelfCheck
    noise_floor: float
    config: dict[str, Any]
    warnings: tuple[str, ...] = ()
    #: How the pure per-neuron work ran: ``jobs``, ``backend`` and seconds spent in parallel work,
    #: in total and per stage (see :mod:`relux.parallel`).
    execution: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.selfcheck.passed

    def __repr__(self) -> str:
        return (
            f"ExtractionResult(arch={format_arch(self.arch)}, recovered={format_arch(self.model.arch)}, "
            f"queries={self.queries} (2^{_log2(self.queries):.1f}), seconds={self.seconds:.2f}, "
            f"selfcheck={'passed' if self.ok else 'FAILED'} rel_err={self.selfcheck.max_rel_error:.2e})"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "arch": list(self.arch),
            "recovered_arch": list(self.model.arch),
            "queries": self.queries,
            "log2_queries": round(_log2(self.queries), 3),
            "seconds": round(self.seconds, 3),
            "ok": self.ok,
            "stages": [s.to_json() for s in self.stages],
            "layers": [layer.to_json() for layer in self.layers],
            "selfcheck": self.selfcheck.to_json(),
            "noise_floor": self.noise_floor,
            "config": self.config,
            "warnings": list(self.warnings),
            "execution": self.execution,
        }

    def to_json_str(self) -> str:
        return json.dumps(self.to_json(), indent=2, default=_json_default)


@dataclass(frozen=True)
class PartialResult:
    """What a run that stopped before the self-check got: the layers it finished and where it broke.

    Carried by :class:`~relux.errors.ExtractionFailed` as ``partial``.
    """

    arch: tuple[int, ...]
    queries: int
    seconds: float
    stages: tuple[StageStats, ...]
    layers: tuple[LayerReport, ...]
    noise_floor: float
    failed_layer: int
    reason: str
    config: dict[str, Any]

    def __repr__(self) -> str:
        return (
            f"PartialResult(arch={format_arch(self.arch)}, layers_done={len(self.layers)}, "
            f"failed_layer={self.failed_layer}, queries={self.queries} (2^{_log2(self.queries):.1f}), "
            f"seconds={self.seconds:.2f})"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "arch": list(self.arch),
            "queries": self.queries,
            "log2_queries": round(_log2(self.queries), 3),
            "seconds": round(self.seconds, 3),
            "ok": False,
            "stages": [s.to_json() for s in self.stages],
            "layers": [layer.to_json() for layer in self.layers],
            "noise_floor": self.noise_floor,
            "failed_layer": self.failed_layer,
            "reason": self.reason,
            "config": self.config,
        }


def _log2(n: int) -> float:
    import math

    return math.log2(n) if n > 0 else 0.0


def _json_default(o: object) -> Any:
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
