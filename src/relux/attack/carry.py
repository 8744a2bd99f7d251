"""The last hidden layer of a failed deep attempt, kept across a resume at the layer before it
(:mod:`relux.attack.resume`; attack-notes §3 on rarely active neurons).

A resumed attempt looks again for the rows of layer ``r`` that the failed one lacked. When layer
``r + 1`` is the last hidden layer, its rows stay right: the failed model agreed with ``f`` wherever the
missing neurons were off, which is almost everywhere. Extracting it again costs as much as the first time
(digits 64-40x4-10: about a million queries for layer 4) and may come out worse. Kept, each row needs only
the relabelling of its inputs, since the layer-``r`` rows of the resumed attempt are the old ones (matched by
direction, each rescaled by its own positive factor) plus the new ones. The weights on a new neuron no
witness of the kept layer saw on are left unseen, and the pipeline reads them where the new neuron is on
(:func:`relux.attack.deep.complete_unseen`, :mod:`relux.attack.unseen_columns`). A kept layer still short
of rows stays short: the next resume looks for them there, now behind the completed layer ``r`` (a neuron
on only where a missing layer-``r`` neuron is cannot be found before).

A neuron found only now was off wherever the failed model agreed with ``f``, so it is oriented to be off on
most inputs (the other orientation, on almost everywhere, would have made that model wrong almost
everywhere: its affine contribution is not a combination of the other rows' outputs).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from relux.attack import prefix as pfx
from relux.attack.result import LayerReport
from relux.oracle.base import FloatArray

if TYPE_CHECKING:
    from relux.attack.deep import LayerOutcome

log = logging.getLogger(__name__)

#: a kept row of layer ``r`` matches an old one when their unit keys ``(w, b)`` agree to this cosine; a
#: refined row moves by far less (its relative error is at the float64 noise of its kinks), two neurons'
#: rows differ by far more (their hyperplanes would coincide otherwise)
MATCH_COS = 1.0 - 1e-6


@dataclass(frozen=True)
class CarriedLayer:
    """A failed attempt's last hidden layer: its rows ``(W, b)`` over the failed attempt's rows of the
    layer before (:attr:`relux.attack.resume.Resume.rows`), its report and its exact points (input coordinates)."""

    W: FloatArray
    b: FloatArray
    report: LayerReport
    points: FloatArray


@dataclass(frozen=True)
class Relabelling:
    """How the resumed layer's rows relate to the old ones: ``source[j]`` is the old row that new row ``j``
    is (``-1`` for a new neuron), ``scale[j]`` the positive factor between them (new = scale x old)."""

    source: np.ndarray
    scale: FloatArray
    reason: str = ""

    @property
    def ok(self) -> bool:
        return not self.reason


def relabel(old: tuple[FloatArray, FloatArray], new: tuple[FloatArray, FloatArray]) -> Relabelling:
    """Match every old row of layer ``r`` to one new row with the same direction and orientation. Fails (a
    ``reason``) when an old row has no such match or two old rows match one new row: the kept layer's rows
    weigh that neuron, so they do not carry over."""
    def keys(W: FloatArray, b: FloatArray) -> tuple[FloatArray, FloatArray]:
        K = np.concatenate([W, b[:, None]], axis=1)
        n = np.linalg.norm(K, axis=1)
        return K / np.where(n > 0.0, n, 1.0)[:, None], n

    Ko, no = keys(*old)
    Kn, nn = keys(*new)
    source = np.full(Kn.shape[0], -1)
    scale = np.ones(Kn.shape[0])
    C = Kn @ Ko.T
    for m in range(Ko.shape[0]):
        j = int(np.argmax(np.abs(C[:, m]))) if Kn.shape[0] else -1
        if j < 0 or abs(C[j, m]) < MATCH_COS:
            return Relabelling(source, scale, f"old neuron {m} has no row in the resumed layer")
        if C[j, m] < 0.0:
            return Relabelling(source, scale, f"old neuron {m} is the resumed layer's neuron {j} with its sign flipped")
        if source[j] >= 0:
            return Relabelling(source, scale, f"old neurons {source[j]} and {m} both match neuron {j}")
        source[j] = m
        scale[j] = nn[j] / no[m]
    return Relabelling(source, scale)


def orient_new(prefix: Sequence[pfx.Layer], W: FloatArray, b: FloatArray, new: np.ndarray, X: FloatArray
               ) -> tuple[FloatArray, FloatArray, list[int]]:
    """Rows ``new`` of the layer ``(W, b)`` behind ``prefix`` negated where they are on at most of the
    sample inputs ``X`` (no query). Returns the rows and the indices flipped."""
    _, H = pfx.forward(prefix, X)
    W, b = W.copy(), b.copy()
    flipped = []
    for j in (int(i) for i in np.flatnonzero(new)):
        if float(np.mean(H @ W[j] + b[j] > 0.0)) > 0.5:
            W[j], b[j] = -W[j], -b[j]
            flipped.append(j)
    return W, b, flipped


def carried_outcome(
    carried: CarriedLayer,
    old_rows: tuple[FloatArray, FloatArray],
    layers: Sequence[pfx.Layer],
    rng: np.random.Generator,
    input_scale: float,
) -> tuple[list[pfx.Layer], LayerOutcome] | None:
    """The kept last hidden layer behind ``layers`` (whose last layer is the resumed one, in input coordinates
    for the first): its columns relabelled to the resumed layer's rows, weights on new neurons unseen (coverage
    false), and the new neurons oriented off on most inputs (``layers`` returned with them). None, with a log
    line, when the old rows do not all carry over (:func:`relabel`)."""
    from relux.attack.deep import LayerOutcome

    W_r, b_r = layers[-1]
    lab = relabel(old_rows, (W_r, b_r))
    if not lab.ok:
        log.info("layer %d: the attempt resumed keeps no layer-%d rows: %s", len(layers) + 1, len(layers), lab.reason)
        return None
    new = lab.source < 0
    X = rng.normal(0.0, input_scale, size=(4096, layers[0][0].shape[1]))
    W_r, b_r, flipped = orient_new(layers[:-1], W_r, b_r, new, X)
    if flipped:
        log.info("layer %d: new neuron(s) %s oriented off at most inputs", len(layers), flipped)
    n_out = carried.W.shape[0]
    W = np.zeros((n_out, W_r.shape[0]))
    W[:, ~new] = carried.W[:, lab.source[~new]] / lab.scale[~new]
    coverage = np.ones(W.shape, dtype=bool)
    coverage[:, new] = False
    rep = carried.report
    conf = np.array([float(nr.get("sign_confidence", 0.0)) for nr in rep.neurons]) if rep.neurons else np.ones(n_out)
    method = (f"{rep.sign_method}; kept from the attempt resumed, weights on {int(new.sum())} new layer-"
              f"{len(layers)} neuron(s) read afresh")
    log.info("layer %d: %d rows kept from the attempt resumed; %d new layer-%d neuron(s) to read weights on",
             len(layers) + 1, n_out, int(new.sum()), len(layers))
    out = LayerOutcome(W=W, b=carried.b.copy(), witnesses=rep.witnesses, lines=0, sign_method=method,
                       neurons=rep.neurons, dead=rep.dead, witness_points=carried.points.copy(), confidence=conf,
                       coverage=coverage, residual=rep.residual)
    return [*layers[:-1], (W_r, b_r)], out
