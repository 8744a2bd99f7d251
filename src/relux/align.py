"""Align an extracted ReLU network to a reference, up to the symmetries of ReLU networks.

An extracted network can equal the reference only up to a permutation of every hidden layer and a
*positive* scale per hidden neuron (``ReLU(a z) = a ReLU(z)`` for ``a > 0``, compensated in the next
layer's columns). A negative scale is not a symmetry: a neuron recovered as its negation is a *sign
error*. Neurons that are dead on the whole input domain cannot be recovered, so the extracted network
may be narrower than the reference, and it may also hold neurons that match nothing.

:func:`align` works layer by layer from the first:

1. The candidate's layer is first expressed in the reference's input coordinates: its columns are
   permuted into the reference's neuron order of the previous layer and divided by the scales applied
   there. Inputs whose reference neuron was left unmatched get zero columns.
2. Every hidden row ``(w, b)`` of both networks is normalised by ``||w||_2``. The distance between a
   reference row ``r`` and a candidate row ``c`` is the *sign-agnostic* normalised weight error
   ``min(max|r - c|, max|r + c|)``, so a neuron recovered with the wrong sign is still matched (and
   then counted as a sign error) instead of being reported as missing.
3. :func:`scipy.optimize.linear_sum_assignment` pairs the rows. A pair farther apart than
   ``match_threshold`` is *not* a match: it is reported in ``rejected`` and both neurons count as
   unmatched. Pairs above the threshold cost more than any number of pairs below it, so the assignment
   first maximises the number of matches and only then minimises their total distance.
4. Each matched candidate row is multiplied by ``||w_reference|| / ||w_candidate|| > 0`` (never by a
   negative number: a negated neuron stays negated, and its weight error is reported as it is), and
   the inverse scale is carried into the next layer's columns.

Why a threshold rather than "match everything and report the error": a user verifying an extraction
wants to know *which* neurons were recovered, and a neuron matched to an unrelated row would report an
error of order 1 that says nothing about the precision of the neurons that *were* recovered. So the
weight errors (``max_norm_weight_error``) are maxima over matched neurons only, unmatched neurons are
listed separately, and ``rejected`` shows how close the nearest rejected pairs were (raise the
threshold to count a coarse extraction as matched). Sign-error neurons *are* matched and their (large)
error is included in ``max_norm_weight_error``: the weights really are that far off.
``max_direction_error`` gives the sign-agnostic maximum, the precision of the recovered directions.

Always-on neurons. A neuron of a hidden layer after the first whose weights are all non-negative and
whose bias is positive is active at every input (its input is a ReLU output, ``h >= 0``). Its bias only
ever appears summed with the next layer's biases, so no query can tell it apart (an extraction reports
such a neuron with bias 0, see :mod:`relux.attack.always_on`). Such a reference row is matched on its
weights alone, and when its candidate keeps it always on (same sign, bias ``>= 0``) the reference is
re-expressed in the candidate's gauge: its bias takes the candidate's value and the difference moves
into the next layer's biases, which leaves the reference's function unchanged.

Normalised weight error: for a hidden row, ``max |Δ(w, b)| / ||w_reference||_2`` after alignment; for
the output layer, ``max |ΔW, Δb| / max |W_reference|``. Columns of reference neurons that were left
unmatched in the previous layer are excluded from both the distances and the norms of the next layer:
the weights leaving a dead neuron are arbitrary and unrecoverable, and a missing neuron is already
reported as unmatched (its effect on the outputs shows in the functional error of
:mod:`relux.verify`). A zero-norm reference row (or an all-zero output matrix) is compared in absolute
terms (norm taken as 1).

Weights the function does not determine. A weight leaving a rarely active neuron acts only where that
neuron is on; when the next layer's neuron is off throughout that region, or on there only together with
others in a way the outputs cannot separate, no query can recover it (:mod:`relux.identifiability`). It is
as arbitrary as a weight leaving a dead neuron, and is left out the same way when the caller passes the
masks (``undetermined``; :func:`relux.verify.verify` does): its column is left out of the matching and the
norms of that layer, and the weight itself out of its row's error. Each layer reports how many it left out.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy.optimize import linear_sum_assignment

from relux.errors import InputError
from relux.model import MLP, FloatArray, format_arch

logger = logging.getLogger(__name__)

IntArray = NDArray[np.int64]
BoolArray = NDArray[np.bool_]

#: Default largest sign-agnostic normalised distance at which two neurons still count as the same.
DEFAULT_MATCH_THRESHOLD = 1e-2

#: What ``log2`` of an exact zero error is reported as (the exponent of the smallest float64).
LOG2_ZERO = -1074.0

#: Elements per block when computing pairwise max-abs distances (bounds temporary memory to ~32 MB).
_BLOCK_ELEMENTS = 1 << 22


# --------------------------------------------------------------------------- helpers
def safe_log2(x: float) -> float:
    """``log2(x)`` for an error ``x >= 0``; an exact zero gives :data:`LOG2_ZERO`, ``inf`` stays ``inf``."""
    if x == 0.0:
        return LOG2_ZERO
    if not math.isfinite(x):
        return x
    return math.log2(x)


def json_float(x: float) -> float | None:
    """A float for JSON: ``None`` for NaN and infinities (which strict JSON cannot hold)."""
    x = float(x)
    return x if math.isfinite(x) else None


def check_match_threshold(value: float) -> float:
    """Validate a match threshold: a positive number (``inf`` matches every assigned pair)."""
    try:
        thr = float(value)
    except (TypeError, ValueError):
        raise InputError(f"match threshold must be a positive number, found {value!r}") from None
    if math.isnan(thr) or thr <= 0.0:
        raise InputError(f"match threshold must be a positive number (e.g. {DEFAULT_MATCH_THRESHOLD}), found {value!r}")
    return thr


def _guarded_norms(W: FloatArray) -> FloatArray:
    """Row 2-norms, with 1.0 for zero rows (compared in absolute terms)."""
    norms: FloatArray = np.sqrt(np.sum(W * W, axis=1))
    return np.where(norms > 0.0, norms, 1.0)


def pairwise_maxabs(A: FloatArray, B: FloatArray) -> tuple[FloatArray, FloatArray]:
    """``(max_k |A[i,k] - B[j,k]|, max_k |A[i,k] + B[j,k]|)`` for every pair of rows, in blocks."""
    n_a, m = A.shape
    n_b = B.shape[0]
    plus = np.zeros((n_a, n_b))
    minus = np.zeros((n_a, n_b))
    if n_a == 0 or n_b == 0:
        return plus, minus
    step = max(1, _BLOCK_ELEMENTS // max(1, n_b * m))
    for s in range(0, n_a, step):
        blk = A[s : s + step, None, :]
        plus[s : s + step] = np.abs(blk - B[None, :, :]).max(axis=2)
        minus[s : s + step] = np.abs(blk + B[None, :, :]).max(axis=2)
    return plus, minus


def assign(distance: FloatArray, threshold: float) -> tuple[IntArray, IntArray]:
    """Pair rows with columns of ``distance`` (rectangular allowed), most matches within ``threshold`` first.

    Entries above a finite threshold cost more than all possible entries below it together, so the
    optimum maximises the number of pairs within the threshold, then minimises their summed distance
    (ties among rejected pairs are broken towards smaller distances). Returns ``(rows, cols)``.
    """
    if distance.size == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty.copy()
    if math.isinf(threshold):
        cost = distance
    else:
        n = min(distance.shape)
        big = n * (threshold + 1.0) + 1.0
        cost = np.where(distance <= threshold, distance, big + distance / (1.0 + distance))
    rows, cols = linear_sum_assignment(cost)
    return np.asarray(rows, dtype=np.int64), np.asarray(cols, dtype=np.int64)


def express_columns(W: FloatArray, source: IntArray, scale: FloatArray) -> FloatArray:
    """Columns of a candidate layer in the reference's input order and scale.

    ``source[j]`` is the candidate input matched to reference input ``j`` (-1: none, zero column) and
    ``scale[j] > 0`` the factor applied to it upstream, which the column divides out.
    """
    out = np.zeros((W.shape[0], source.shape[0]))
    ok = source >= 0
    out[:, ok] = W[:, source[ok]] / scale[ok]
    return out


# --------------------------------------------------------------------------- results
@dataclass(frozen=True, repr=False)
class LayerAlignment:
    """How one layer of the candidate was aligned to the reference.

    ``permutation[j]`` is the candidate neuron matched to reference neuron ``j`` (-1 if none) and
    ``scales[j] > 0`` the factor applied to it (NaN if unmatched). ``neuron_errors[j]`` is the
    normalised weight error of reference row ``j`` after alignment (NaN if unmatched). ``rejected`` lists
    ``(reference, candidate, distance)`` for pairs the assignment proposed but the threshold refused.
    The output layer is never permuted or scaled.
    """

    index: int
    kind: str
    reference_width: int
    candidate_width: int
    permutation: tuple[int, ...]
    scales: tuple[float, ...]
    unmatched_reference: tuple[int, ...]
    unmatched_candidate: tuple[int, ...]
    sign_error_neurons: tuple[int, ...]
    neuron_errors: tuple[float, ...]
    max_norm_weight_error: float
    max_direction_error: float
    rejected: tuple[tuple[int, int, float], ...]
    #: reference weights left out of the distances and errors: ones the network's function does not
    #: determine (:mod:`relux.identifiability`), when the caller passed them
    undetermined: int = 0

    @property
    def sign_errors(self) -> int:
        return len(self.sign_error_neurons)

    @property
    def matched(self) -> int:
        return sum(1 for p in self.permutation if p >= 0)

    @property
    def complete(self) -> bool:
        return not self.unmatched_reference and not self.unmatched_candidate

    @property
    def log2_max_norm_weight_error(self) -> float:
        return safe_log2(self.max_norm_weight_error)

    def to_json(self, candidate_name: str = "candidate") -> dict[str, Any]:
        """JSON-ready dict; ``candidate_name`` names the candidate side in the keys (e.g. ``extracted``)."""
        c = candidate_name
        return {
            "index": self.index,
            "kind": self.kind,
            "reference_width": self.reference_width,
            f"{c}_width": self.candidate_width,
            "matched": self.matched,
            "complete": self.complete,
            "permutation": list(self.permutation),
            "scales": [json_float(s) for s in self.scales],
            "unmatched_reference": list(self.unmatched_reference),
            f"unmatched_{c}": list(self.unmatched_candidate),
            "sign_errors": self.sign_errors,
            "sign_error_neurons": list(self.sign_error_neurons),
            "max_norm_weight_error": json_float(self.max_norm_weight_error),
            "log2_max_norm_weight_error": json_float(self.log2_max_norm_weight_error),
            "max_direction_error": json_float(self.max_direction_error),
            "neuron_errors": [json_float(e) for e in self.neuron_errors],
            "rejected": [{"reference": r, c: k, "distance": json_float(d)} for r, k, d in self.rejected],
            "undetermined_weights": self.undetermined,
        }

    def __repr__(self) -> str:
        return (
            f"LayerAlignment({self.index} {self.kind}: {self.matched}/{self.reference_width} matched, "
            f"unmatched ref={list(self.unmatched_reference)} cand={list(self.unmatched_candidate)}, "
            f"sign errors={self.sign_errors}, max norm weight error={self.max_norm_weight_error:.3g} "
            f"(2^{self.log2_max_norm_weight_error:.1f}))"
        )


@dataclass(frozen=True, repr=False, eq=False)
class Alignment:
    """A candidate network aligned to a reference (see the module documentation).

    ``aligned`` is the candidate expressed in the reference's neuron order and scale, with the
    reference's architecture: unmatched reference neurons are zero rows (and zero columns downstream);
    unmatched candidate neurons are dropped, so ``aligned`` computes the candidate's function only when
    ``complete``.
    """

    aligned: MLP
    layers: tuple[LayerAlignment, ...]
    candidate_arch: tuple[int, ...]
    match_threshold: float

    @property
    def reference_arch(self) -> tuple[int, ...]:
        return self.aligned.arch

    @property
    def sign_errors(self) -> int:
        return sum(layer.sign_errors for layer in self.layers)

    @property
    def max_norm_weight_error(self) -> float:
        """Largest normalised weight error over matched neurons of all layers (inf if a layer matched none)."""
        return max(layer.max_norm_weight_error for layer in self.layers)

    @property
    def log2_max_norm_weight_error(self) -> float:
        return safe_log2(self.max_norm_weight_error)

    @property
    def max_direction_error(self) -> float:
        """Like :attr:`max_norm_weight_error` but sign-agnostic (a negated neuron counts as exact)."""
        return max(layer.max_direction_error for layer in self.layers)

    @property
    def unmatched_reference(self) -> int:
        return sum(len(layer.unmatched_reference) for layer in self.layers)

    @property
    def unmatched_candidate(self) -> int:
        return sum(len(layer.unmatched_candidate) for layer in self.layers)

    @property
    def complete(self) -> bool:
        """No unmatched neuron on either side, in any layer."""
        return all(layer.complete for layer in self.layers)

    def to_json(self) -> dict[str, Any]:
        """JSON-ready summary and per-layer details (the aligned weights themselves are not included)."""
        return {
            "reference_arch": list(self.reference_arch),
            "candidate_arch": list(self.candidate_arch),
            "match_threshold": json_float(self.match_threshold),
            "complete": self.complete,
            "sign_errors": self.sign_errors,
            "unmatched_reference": self.unmatched_reference,
            "unmatched_candidate": self.unmatched_candidate,
            "max_norm_weight_error": json_float(self.max_norm_weight_error),
            "log2_max_norm_weight_error": json_float(self.log2_max_norm_weight_error),
            "max_direction_error": json_float(self.max_direction_error),
            "layers": [layer.to_json() for layer in self.layers],
        }

    def __repr__(self) -> str:
        per_layer = ", ".join(f"{layer.index}:{layer.matched}/{layer.reference_width}" for layer in self.layers[:-1])
        return (
            f"Alignment({format_arch(self.reference_arch)} <- {format_arch(self.candidate_arch)}, "
            f"complete={self.complete}, matched=[{per_layer}], sign_errors={self.sign_errors}, "
            f"max_norm_weight_error={self.max_norm_weight_error:.3g} "
            f"(2^{self.log2_max_norm_weight_error:.1f}))"
        )


# --------------------------------------------------------------------------- alignment
def check_comparable(reference: MLP, candidate: MLP, what: str = "candidate") -> None:
    """Raise :class:`InputError` unless both are MLPs with the same input/output sizes and depth."""
    for name, model in (("reference", reference), (what, candidate)):
        if not isinstance(model, MLP):
            raise InputError(f"expected the {name} to be a relux.MLP, found {type(model).__name__}")
    if reference.input_dim != candidate.input_dim or reference.output_dim != candidate.output_dim:
        raise InputError(
            f"the {what} network maps {candidate.input_dim} inputs to {candidate.output_dim} outputs "
            f"but the reference maps {reference.input_dim} to {reference.output_dim}; "
            f"compare networks with the same input and output sizes"
        )
    if reference.depth != candidate.depth:
        raise InputError(
            f"the {what} network has {candidate.depth} hidden layers ({format_arch(candidate.arch)}) "
            f"but the reference has {reference.depth} ({format_arch(reference.arch)}); "
            f"layer-by-layer alignment needs the same depth"
        )


def _align_hidden(
    index: int,
    Wr: FloatArray,
    br: FloatArray,
    Wc: FloatArray,
    bc: FloatArray,
    mask: BoolArray,
    threshold: float,
    always_on: BoolArray | None = None,
    skip: BoolArray | None = None,
) -> tuple[LayerAlignment, FloatArray, FloatArray, IntArray, FloatArray, FloatArray]:
    """Align one hidden layer whose candidate columns ``Wc`` are already in the reference's input order.

    ``always_on``: reference rows that are on at every input; their bias is a gauge (module docstring).
    ``skip``: reference weights the function does not determine (module docstring): their columns are
    left out of the matching and the norms, and each row's own ones out of its error.
    Also returns the shift of each reference bias into the candidate's gauge (0 for other rows), which
    the caller moves into the reference's next layer."""
    n_r, n_c = Wr.shape[0], Wc.shape[0]
    skip = np.zeros(Wr.shape, dtype=bool) if skip is None else skip & mask[None, :]
    keep = mask & ~skip.any(axis=0)
    norm_r = _guarded_norms(Wr[:, keep])
    norm_c = _guarded_norms(Wc[:, keep])
    R = np.concatenate([Wr[:, keep], br[:, None]], axis=1) / norm_r[:, None]
    C = np.concatenate([Wc[:, keep], bc[:, None]], axis=1) / norm_c[:, None]
    plus, minus = pairwise_maxabs(R, C)
    gauge = np.zeros((n_r, n_c), dtype=bool)
    tie = np.zeros((n_r, n_c))
    if always_on is not None and always_on.any():
        # weights only; the candidate's bias only has to keep the neuron on (>= 0)
        plus_w = (pairwise_maxabs(R[always_on, :-1], C[:, :-1])[0] if R.shape[1] > 1
                  else np.zeros((int(always_on.sum()), n_c)))
        # a candidate bias slightly below 0 (its precision) counts, as that distance
        keeps_on = C[:, -1] >= -threshold
        gauge[always_on] = keeps_on[None, :]
        plus_w = np.maximum(plus_w, np.maximum(-C[None, :, -1], 0.0))
        plus[always_on] = np.where(keeps_on[None, :], plus_w, plus[always_on])
        # rows equal up to their bias (parallel always-on neurons): the bias breaks the tie
        tie[always_on] = 1e-9 * np.abs(R[always_on, -1][:, None] - C[None, :, -1])
    distance = np.minimum(plus, minus)
    rows, cols = assign(distance + tie, threshold)
    accept = distance[rows, cols] <= threshold
    rej = [(int(r), int(c), float(distance[r, c])) for r, c in zip(rows[~accept], cols[~accept], strict=True)]
    rows, cols = rows[accept], cols[accept]

    perm = np.full(n_r, -1, dtype=np.int64)
    perm[rows] = cols
    scale = np.full(n_r, np.nan)
    scale[rows] = norm_r[rows] / norm_c[cols]

    Wa = np.zeros_like(Wr)
    ba = np.zeros_like(br)
    Wa[rows] = Wc[cols] * scale[rows, None]
    ba[rows] = bc[cols] * scale[rows]
    shift = np.zeros_like(br)
    moved = rows[gauge[rows, cols] & (plus[rows, cols] <= minus[rows, cols])]
    shift[moved] = ba[moved] - br[moved]
    br = br + shift

    errors = np.full(n_r, np.nan)
    if rows.size:
        dw = np.where(skip[rows][:, mask], 0.0, np.abs(Wa[rows][:, mask] - Wr[rows][:, mask]))
        dmax = dw.max(axis=1) if dw.shape[1] else np.zeros(rows.size)
        errors[rows] = np.maximum(dmax, np.abs(ba[rows] - br[rows])) / norm_r[rows]
    sign_rows = rows[plus[rows, cols] > minus[rows, cols]]

    layer = LayerAlignment(
        index=index,
        kind="hidden",
        reference_width=n_r,
        candidate_width=n_c,
        permutation=tuple(int(p) for p in perm),
        scales=tuple(float(s) for s in scale),
        unmatched_reference=tuple(int(j) for j in np.flatnonzero(perm < 0)),
        unmatched_candidate=tuple(sorted(set(range(n_c)) - {int(c) for c in cols})),
        sign_error_neurons=tuple(sorted(int(j) for j in sign_rows)),
        neuron_errors=tuple(float(e) for e in errors),
        max_norm_weight_error=float(errors[rows].max()) if rows.size else math.inf,
        max_direction_error=float(distance[rows, cols].max()) if rows.size else math.inf,
        rejected=tuple(rej),
        undetermined=int(skip.sum()),
    )
    return layer, Wa, ba, perm, scale, shift


def always_on_rows(W: FloatArray, b: FloatArray) -> BoolArray:
    """Rows of a hidden layer after the first that are on at every input: non-negative weights and a
    positive bias on a ReLU output (``h >= 0``)."""
    return np.asarray(np.all(W >= 0, axis=1) & (b > 0), dtype=bool)


def _align_output(
    index: int, Wr: FloatArray, br: FloatArray, Wc: FloatArray, bc: FloatArray, mask: BoolArray,
    skip: BoolArray | None = None,
) -> LayerAlignment:
    k = Wr.shape[0]
    skip = np.zeros(Wr.shape, dtype=bool) if skip is None else skip & mask[None, :]
    denom = float(np.abs(np.where(skip, 0.0, Wr)[:, mask]).max()) if mask.any() else 0.0
    denom = denom if denom > 0.0 else 1.0
    dw = np.where(skip[:, mask], 0.0, np.abs(Wc[:, mask] - Wr[:, mask]))
    dmax = dw.max(axis=1) if dw.shape[1] else np.zeros(k)
    errors = np.maximum(dmax, np.abs(bc - br)) / denom
    worst = float(errors.max())
    return LayerAlignment(
        index=index,
        kind="output",
        reference_width=k,
        candidate_width=k,
        permutation=tuple(range(k)),
        scales=(1.0,) * k,
        unmatched_reference=(),
        unmatched_candidate=(),
        sign_error_neurons=(),
        neuron_errors=tuple(float(e) for e in errors),
        max_norm_weight_error=worst,
        max_direction_error=worst,
        rejected=(),
        undetermined=int(skip.sum()),
    )


def align(reference: MLP, candidate: MLP, *, match_threshold: float = DEFAULT_MATCH_THRESHOLD,
          undetermined: Sequence[BoolArray] | None = None) -> Alignment:
    """Align ``candidate`` to ``reference`` layer by layer (permutation + positive scale per neuron).

    ``match_threshold`` is the largest sign-agnostic normalised distance at which a candidate neuron
    still counts as a reference neuron (``math.inf``: every pair the assignment proposes counts).
    ``undetermined``: per layer, a mask (the layer's shape) of reference weights the function does not
    determine (:func:`relux.identifiability.undetermined_weights`), left out of the distances and errors.
    Raises :class:`InputError` if the networks differ in input size, output size or depth.
    """
    if undetermined is not None and [m.shape for m in undetermined] != [W.shape for W, _ in reference.layers]:
        raise InputError(f"undetermined must hold one mask per layer with the layer's shape "
                         f"{[W.shape for W, _ in reference.layers]}, found {[np.shape(m) for m in undetermined]}")
    check_comparable(reference, candidate)
    threshold = check_match_threshold(match_threshold)
    d0 = reference.input_dim
    source: IntArray = np.arange(d0, dtype=np.int64)
    scale: FloatArray = np.ones(d0)
    mask: BoolArray = np.ones(d0, dtype=bool)
    layers: list[LayerAlignment] = []
    aligned: list[tuple[FloatArray, FloatArray]] = []
    last = reference.depth
    shift: FloatArray | None = None  # bias moved out of the previous layer's always-on neurons
    for i, ((Wr, br), (Wc_raw, bc)) in enumerate(zip(reference.layers, candidate.layers, strict=True)):
        Wc = express_columns(Wc_raw, source, scale)
        if shift is not None and shift.any():
            br = br - Wr @ shift
        if i < last:
            on = always_on_rows(Wr, br) if i > 0 else None
            layer, Wa, ba, source, scale, shift = _align_hidden(
                i, Wr, br, Wc, bc, mask, threshold, on, None if undetermined is None else undetermined[i])
            mask = source >= 0
            aligned.append((Wa, ba))
        else:
            layer = _align_output(i, Wr, br, Wc, bc, mask, None if undetermined is None else undetermined[i])
            aligned.append((Wc, bc.copy()))
        logger.debug("%r", layer)
        layers.append(layer)
    return Alignment(
        aligned=reference.with_layers(aligned),
        layers=tuple(layers),
        candidate_arch=candidate.arch,
        match_threshold=threshold,
    )
