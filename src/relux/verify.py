"""Verify an extracted network against a known reference: weight error after alignment, output error.

:func:`verify` reports; it does not judge. It returns a :class:`VerificationReport` with

- the alignment of :mod:`relux.align` (permutation + positive scale per hidden neuron): normalised
  weight error per layer and overall (also as ``log2``), sign errors, unmatched neurons. Weights the
  reference's function does not determine (leaving a rarely active neuron toward neurons that are off
  wherever it is on, or that the outputs see only in combination: :mod:`relux.identifiability`) are left
  out of the weight errors, as the weights leaving a dead neuron are; ``undetermined_weights`` counts them;
- the functional error ``max |f - f̂| / max |f|`` (both maxima over the same inputs and all outputs)
  on three sources of inputs:

  * ``gaussian``: ``N(0, I)`` inputs;
  * ``uniform``: ``U[0, 1]^d`` inputs;
  * ``lines``: points on random lines, through a random point (``N(0, I)`` for even-numbered lines,
    ``U[0, 1]^d`` for odd ones) in a uniformly random direction. Each line spans the central
    ``line_coverage`` fraction of the parameters at which it crosses the reference's first-layer
    hyperplanes (plus a 5% margin each side), so it crosses most of them and the deeper kinks between
    them. Along a line ``f - f̂`` is piecewise linear, so its maximum over the segment is attained at a
    kink of ``f`` or ``f̂`` or at an end: each line is evaluated exactly at every first-layer kink of
    both networks within the segment, at the ends, and on a uniform grid of ``points_per_line``
    points that samples the deeper kinks.

  The overall relative error is the largest per-source one (worst case). If ``max |f| = 0`` on a
  source, its "relative" error is the absolute one.

- agreement of decisions: for ``k >= 2`` outputs, the fraction of inputs where ``argmax f`` equals
  ``argmax f̂``. For ``k == 1`` the argmax is trivially the same, so the report gives instead the
  *sign agreement* ``(f > 0) == (f̂ > 0)`` (the decision of a binary classifier with a sigmoid output);
  ``agreement_kind`` says which. The overall agreement is the smallest per-source one.

Inputs are drawn from ``rng`` (default ``numpy.random.default_rng(0)``, so that a report is
reproducible) in batches of ``batch_size`` rows to bound memory on wide inputs.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from relux.align import (
    DEFAULT_MATCH_THRESHOLD,
    Alignment,
    LayerAlignment,
    align,
    check_comparable,
    check_match_threshold,
    json_float,
    safe_log2,
)
from relux.errors import InputError
from relux.identifiability import undetermined_weights
from relux.lines import kink_parameters as kink_parameters
from relux.lines import line_parameters as line_parameters
from relux.model import MLP, FloatArray, format_arch

logger = logging.getLogger(__name__)

#: Names of the input sources, in report order.
SOURCES = ("gaussian", "uniform", "lines")


@dataclass(frozen=True)
class VerifyConfig:
    """Settings of :func:`verify` besides the sample counts.

    ``match_threshold``: see :func:`relux.align.align`. ``points_per_line``: uniform grid points per
    line (first-layer kinks come on top). ``line_coverage``: fraction in (0, 1] of the reference's
    first-layer crossings each line spans. ``batch_size``: rows per forward pass.
    ``activity_points``: ``N(0, I)`` inputs (reference only, no extracted model) on which the
    fraction of inputs each unmatched reference neuron is on is measured (0: not measured).
    ``undetermined_neurons``: per layer, how many of the reference's rarely active neurons are examined
    for outgoing weights its function does not determine, which the weight errors then leave out
    (:mod:`relux.identifiability`; 0: none examined, every weight counts).
    """

    match_threshold: float = DEFAULT_MATCH_THRESHOLD
    points_per_line: int = 256
    line_coverage: float = 0.9
    batch_size: int = 4096
    activity_points: int = 20_000
    undetermined_neurons: int = 16

    def __post_init__(self) -> None:
        check_match_threshold(self.match_threshold)
        if not isinstance(self.points_per_line, int) or self.points_per_line < 2:
            raise InputError(f"points_per_line must be an integer >= 2, found {self.points_per_line!r}")
        if not (isinstance(self.line_coverage, (int, float)) and 0.0 < self.line_coverage <= 1.0):
            raise InputError(f"line_coverage must be in (0, 1], found {self.line_coverage!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise InputError(f"batch_size must be a positive integer, found {self.batch_size!r}")
        if not isinstance(self.activity_points, int) or self.activity_points < 0:
            raise InputError(f"activity_points must be a non-negative integer, found {self.activity_points!r}")
        if (isinstance(self.undetermined_neurons, bool) or not isinstance(self.undetermined_neurons, int)
                or self.undetermined_neurons < 0):
            raise InputError("undetermined_neurons must be a non-negative integer, found "
                             f"{self.undetermined_neurons!r}")


# --------------------------------------------------------------------------- input sources
def _gaussian_batches(rng: np.random.Generator, n: int, d: int, batch: int) -> Iterator[FloatArray]:
    for s in range(0, n, batch):
        yield rng.standard_normal((min(batch, n - s), d))


def _uniform_batches(rng: np.random.Generator, n: int, d: int, batch: int) -> Iterator[FloatArray]:
    for s in range(0, n, batch):
        yield rng.random((min(batch, n - s), d))


def _line_batches(
    reference: MLP, extracted: MLP, rng: np.random.Generator, n_lines: int, config: VerifyConfig
) -> Iterator[FloatArray]:
    d = reference.input_dim
    W1, b1 = reference.layers[0]
    V1, c1 = extracted.layers[0]
    pending: list[FloatArray] = []
    size = 0
    for line in range(n_lines):
        x0 = rng.standard_normal(d) if line % 2 == 0 else rng.random(d)
        u = rng.standard_normal(d)
        u /= np.linalg.norm(u)
        t = line_parameters(
            kink_parameters(W1, b1, x0, u),
            kink_parameters(V1, c1, x0, u),
            config.points_per_line,
            config.line_coverage,
        )
        pending.append(x0[None, :] + t[:, None] * u[None, :])
        size += t.size
        if size >= config.batch_size:
            yield np.concatenate(pending)
            pending, size = [], 0
    if pending:
        yield np.concatenate(pending)


# --------------------------------------------------------------------------- results
@dataclass(frozen=True)
class SourceError:
    """Output error of the extracted network on one source of inputs."""

    name: str
    n_points: int
    max_abs_output: float
    max_abs_error: float
    max_rel_error: float
    agreement: float

    @property
    def log2_max_rel_error(self) -> float:
        return safe_log2(self.max_rel_error)

    def to_json(self) -> dict[str, Any]:
        return {
            "n_points": self.n_points,
            "max_abs_output": json_float(self.max_abs_output),
            "max_abs_error": json_float(self.max_abs_error),
            "max_rel_error": json_float(self.max_rel_error),
            "log2_max_rel_error": json_float(self.log2_max_rel_error),
            "agreement": json_float(self.agreement),
        }


def _measure(name: str, batches: Iterator[FloatArray], reference: MLP, extracted: MLP) -> SourceError:
    n = 0
    max_f = 0.0
    max_d = 0.0
    agree = 0
    for X in batches:
        F = reference.forward(X)
        G = extracted.forward(X)
        n += X.shape[0]
        max_f = max(max_f, float(np.abs(F).max()))
        max_d = max(max_d, float(np.abs(F - G).max()))
        if F.shape[1] >= 2:
            agree += int(np.count_nonzero(F.argmax(axis=1) == G.argmax(axis=1)))
        else:
            agree += int(np.count_nonzero((F[:, 0] > 0.0) == (G[:, 0] > 0.0)))
    rel = max_d / max_f if max_f > 0.0 else max_d
    return SourceError(name, n, max_f, max_d, rel, agree / n if n else math.nan)


@dataclass(frozen=True, repr=False, eq=False)
class VerificationReport:
    """Weight and output error of an extracted network against a reference (see the module doc)."""

    reference_arch: tuple[int, ...]
    extracted_arch: tuple[int, ...]
    alignment: Alignment
    functional: tuple[SourceError, ...]
    agreement_kind: str
    #: ``(layer, reference neuron, fraction of N(0, I) inputs where it is on, inputs)`` for every
    #: unmatched reference neuron: how reachable the neurons an extraction missed are
    unmatched_activity: tuple[tuple[int, int, float, int], ...] = ()

    # ----------------------------------------------------------- weights
    @property
    def layers(self) -> tuple[LayerAlignment, ...]:
        return self.alignment.layers

    @property
    def max_norm_weight_error(self) -> float:
        return self.alignment.max_norm_weight_error

    @property
    def log2_max_norm_weight_error(self) -> float:
        return self.alignment.log2_max_norm_weight_error

    @property
    def sign_errors(self) -> int:
        return self.alignment.sign_errors

    @property
    def unmatched_reference(self) -> int:
        return self.alignment.unmatched_reference

    @property
    def unmatched_extracted(self) -> int:
        return self.alignment.unmatched_candidate

    @property
    def unmatched(self) -> int:
        """Unmatched neurons on both sides together."""
        return self.unmatched_reference + self.unmatched_extracted

    @property
    def complete(self) -> bool:
        return self.alignment.complete

    # ---------------------------------------------------------- function
    @property
    def max_rel_output_error(self) -> float:
        """Largest per-source ``max|f - f̂| / max|f|``."""
        return max(s.max_rel_error for s in self.functional)

    @property
    def log2_max_rel_output_error(self) -> float:
        return safe_log2(self.max_rel_output_error)

    @property
    def argmax_agreement(self) -> float:
        """Smallest per-source agreement (argmax for k >= 2, sign for k == 1: see ``agreement_kind``)."""
        return min(s.agreement for s in self.functional)

    def source(self, name: str) -> SourceError:
        for s in self.functional:
            if s.name == name:
                return s
        raise KeyError(name)

    # ------------------------------------------------------------ output
    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (non-finite numbers become ``null``)."""
        return {
            "reference_arch": list(self.reference_arch),
            "extracted_arch": list(self.extracted_arch),
            "max_norm_weight_error": json_float(self.max_norm_weight_error),
            "log2_max_norm_weight_error": json_float(self.log2_max_norm_weight_error),
            "max_direction_error": json_float(self.alignment.max_direction_error),
            "max_rel_output_error": json_float(self.max_rel_output_error),
            "log2_max_rel_output_error": json_float(self.log2_max_rel_output_error),
            "argmax_agreement": json_float(self.argmax_agreement),
            "agreement_kind": self.agreement_kind,
            "sign_errors": self.sign_errors,
            "unmatched": self.unmatched,
            "unmatched_reference": self.unmatched_reference,
            "unmatched_extracted": self.unmatched_extracted,
            "complete": self.complete,
            "match_threshold": json_float(self.alignment.match_threshold),
            "undetermined_weights": sum(layer.undetermined for layer in self.layers),
            "layers": [layer.to_json("extracted") for layer in self.layers],
            "functional": {s.name: s.to_json() for s in self.functional},
            "unmatched_activity": [{"layer": li, "neuron": j, "on_fraction": json_float(f), "inputs": n}
                                   for li, j, f, n in self.unmatched_activity],
        }

    def to_table(self) -> str:
        """A human-readable table of the weight and output errors."""
        rows: list[list[str]] = [
            ["layer", "kind", "width ref/ext", "matched", "unmatched ref/ext", "sign errors", "max norm weight error"]
        ]
        for L in self.layers:
            hidden = L.kind == "hidden"
            rows.append(
                [
                    str(L.index),
                    L.kind,
                    f"{L.reference_width}/{L.candidate_width}",
                    str(L.matched) if hidden else "-",
                    f"{len(L.unmatched_reference)}/{len(L.unmatched_candidate)}" if hidden else "-",
                    str(L.sign_errors) if hidden else "-",
                    _fmt_err(L.max_norm_weight_error),
                ]
            )
        rows.append(
            [
                "all",
                "",
                "",
                str(sum(L.matched for L in self.layers[:-1])),
                f"{self.unmatched_reference}/{self.unmatched_extracted}",
                str(self.sign_errors),
                _fmt_err(self.max_norm_weight_error),
            ]
        )
        agree_head = "argmax agreement" if self.agreement_kind == "argmax" else "sign agreement"
        frows: list[list[str]] = [["source", "points", "max|f|", "max|f-f'|", "max rel error", agree_head]]
        for s in self.functional:
            frows.append(
                [
                    s.name,
                    str(s.n_points),
                    f"{s.max_abs_output:.3g}",
                    f"{s.max_abs_error:.3g}",
                    _fmt_err(s.max_rel_error),
                    f"{s.agreement:.4f}",
                ]
            )
        frows.append(
            [
                "all",
                str(sum(s.n_points for s in self.functional)),
                "",
                "",
                _fmt_err(self.max_rel_output_error),
                f"{self.argmax_agreement:.4f}",
            ]
        )
        lines = [
            f"reference {format_arch(self.reference_arch)} vs extracted {format_arch(self.extracted_arch)}"
            f" (match threshold {self.alignment.match_threshold:g})",
            "",
            "weights after alignment (hidden: max|d(w,b)|/||w_ref||, output: max|dW,db|/max|W_ref|)",
            *_format_rows(rows),
            "",
            "outputs (max|f - f'| / max|f|)",
            *_format_rows(frows),
        ]
        details = []
        for L in self.layers[:-1]:
            if L.unmatched_reference:
                details.append(f"layer {L.index}: unmatched reference neurons {_short(L.unmatched_reference)}")
                on = [(j, f, n) for li, j, f, n in self.unmatched_activity if li == L.index]
                if on:
                    shown = ", ".join(f"{j}: {f:.1e}" for j, f, _n in on[:12]) + (", ..." if len(on) > 12 else "")
                    details.append(f"layer {L.index}: fraction of {on[0][2]} N(0, I) inputs where each is on: {shown}")
            if L.unmatched_candidate:
                details.append(f"layer {L.index}: unmatched extracted neurons {_short(L.unmatched_candidate)}")
            if L.sign_error_neurons:
                details.append(f"layer {L.index}: sign errors at reference neurons {_short(L.sign_error_neurons)}")
            if L.rejected:
                closest = min(L.rejected, key=lambda r: r[2])
                details.append(
                    f"layer {L.index}: {len(L.rejected)} pair(s) beyond the match threshold, closest "
                    f"reference {closest[0]} ~ extracted {closest[1]} at {closest[2]:.3g}"
                )
        if details:
            lines += ["", *details]
        return "\n".join(lines)

    def __repr__(self) -> str:
        per_layer = " ".join(
            f"[{L.index}: {L.matched}/{L.reference_width} matched, {L.sign_errors} sign, "
            f"2^{L.log2_max_norm_weight_error:.1f}]"
            for L in self.layers
        )
        funcs = " ".join(f"{s.name}=2^{s.log2_max_rel_error:.1f}" for s in self.functional)
        return (
            f"VerificationReport({format_arch(self.reference_arch)} vs {format_arch(self.extracted_arch)}:\n"
            f"  weights: max norm error 2^{self.log2_max_norm_weight_error:.1f}, "
            f"sign errors {self.sign_errors}, unmatched {self.unmatched}, "
            f"undetermined {sum(L.undetermined for L in self.layers)}  {per_layer}\n"
            f"  outputs: max rel error 2^{self.log2_max_rel_output_error:.1f} ({funcs}), "
            f"{self.agreement_kind} agreement {self.argmax_agreement:.4f})"
        )


def _fmt_err(x: float) -> str:
    if x == 0.0:
        return "0 (2^-1074)"
    if not math.isfinite(x):
        return str(x)
    return f"{x:.3g} (2^{safe_log2(x):.1f})"


def _short(items: tuple[int, ...], limit: int = 12) -> str:
    shown = ", ".join(str(i) for i in items[:limit])
    return f"[{shown}{', ...' if len(items) > limit else ''}] ({len(items)})"


def _format_rows(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows]


# --------------------------------------------------------------------------- entry point
def unmatched_activity(
    reference: MLP, alignment: Alignment, rng: np.random.Generator, n: int, batch_size: int = 4096
) -> tuple[tuple[int, int, float, int], ...]:
    """For each unmatched reference neuron, ``(layer, neuron, fraction of n N(0, I) inputs where it
    is on, n)``: a neuron on at one input in 10^5 is out of reach of any search that samples like
    that, and says more about the victim than about the extraction. Empty when ``n`` is 0 or every
    reference neuron was matched."""
    todo = [(L.index, tuple(int(j) for j in L.unmatched_reference)) for L in alignment.layers[:-1]
            if len(L.unmatched_reference)]
    if n == 0 or not todo:
        return ()
    counts = {li: np.zeros(len(js)) for li, js in todo}
    cols = {li: list(js) for li, js in todo}
    done = 0
    while done < n:
        m = min(batch_size, n - done)
        H = rng.normal(size=(m, reference.input_dim))
        for li, (W, b) in enumerate(reference.layers[:-1]):  # numbered as the alignment's layers
            Z = H @ W.T + b
            if li in counts:
                counts[li] += np.count_nonzero(Z[:, cols[li]] > 0.0, axis=0)
            H = np.maximum(Z, 0.0)
        done += m
    return tuple((li, j, float(counts[li][k]) / n, n) for li, js in todo for k, j in enumerate(js))


def verify(
    reference: MLP,
    extracted: MLP,
    *,
    rng: np.random.Generator | None = None,
    n_random: int = 10000,
    n_lines: int = 64,
    config: VerifyConfig | None = None,
) -> VerificationReport:
    """Compare ``extracted`` with ``reference``: aligned weight error and output error.

    ``n_random`` inputs are drawn from each of ``N(0, I)`` and ``U[0, 1]^d``, and ``n_lines`` random
    lines are sampled (a count of 0 leaves that source out). Raises :class:`InputError` when the
    networks differ in input size, output size or depth, or for bad arguments.
    """
    check_comparable(reference, extracted, "extracted")
    cfg = config if config is not None else VerifyConfig()
    for name, value in (("n_random", n_random), ("n_lines", n_lines)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise InputError(f"{name} must be a non-negative integer, found {value!r}")
    if n_random == 0 and n_lines == 0:
        raise InputError("n_random and n_lines are both 0: no inputs to compare the outputs on")
    gen = rng if rng is not None else np.random.default_rng(0)

    # its own generator: the input streams below stay those of earlier versions
    skip = (undetermined_weights(reference, np.random.default_rng(0), max_neurons=cfg.undetermined_neurons)
            if cfg.undetermined_neurons else None)
    alignment = align(reference, extracted, match_threshold=cfg.match_threshold, undetermined=skip)
    d = reference.input_dim
    functional: list[SourceError] = []
    if n_random:
        functional.append(
            _measure("gaussian", _gaussian_batches(gen, int(n_random), d, cfg.batch_size), reference, extracted)
        )
        functional.append(
            _measure("uniform", _uniform_batches(gen, int(n_random), d, cfg.batch_size), reference, extracted)
        )
    if n_lines:
        functional.append(
            _measure("lines", _line_batches(reference, extracted, gen, int(n_lines), cfg), reference, extracted)
        )
    report = VerificationReport(
        reference_arch=reference.arch,
        extracted_arch=extracted.arch,
        alignment=alignment,
        functional=tuple(functional),
        agreement_kind="argmax" if reference.output_dim >= 2 else "sign",
        unmatched_activity=unmatched_activity(reference, alignment, gen, cfg.activity_points, cfg.batch_size),
    )
    logger.debug("%r", report)
    return report
