"""Resuming a failed deep attempt (``ExtractionConfig.resumes``; attack-notes §3 on rarely active neurons).

A deep attempt whose self-check disagreed with ``f`` on a small share of its points has a model right
nearly everywhere: it lacks a neuron that is on only there (a wrong sign or a wrong row of an often
active neuron disagrees almost everywhere). Its complete hidden layers before the first incomplete one
are kept; so are the rows it found in that layer, which its model confirmed wherever it agreed with
``f``. The resumed attempt looks for the missing rows on search lines through the inputs where the
model disagreed first (:func:`relux.attack.more_rows.more_rows` with ``hints``), then extracts the
layers after it again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from relux.attack import prefix as pfx
from relux.attack.result import LayerReport, SelfCheck
from relux.model import MLP
from relux.oracle.base import FloatArray

#: a self-check that disagreed on at most this share of its points may be resumed
RESUME_MAX_SHARE = 0.01


@dataclass(frozen=True)
class Resume:
    """What an attempt that resumes a failed one keeps: the hidden layers before the failed attempt's
    first incomplete one (or, for a later resume, the first incomplete one after the layer it resumed
    at; input coordinates), their reports, the exact points found while extracting
    them (for the refinement's and the self-check's samples), and the rows the failed attempt found in
    the incomplete layer (over the kept layers' outputs), and the inputs where the failed attempt's
    model disagreed with ``f`` (worst first), where the resumed attempt aims its search lines; a resumed
    attempt that fails otherwise is resumed again from the same point, with the same inputs."""

    layers: tuple[tuple[FloatArray, FloatArray], ...]
    reports: tuple[LayerReport, ...]
    points: tuple[FloatArray, ...]
    rows: tuple[FloatArray, FloatArray]
    hints: FloatArray

    @property
    def layer(self) -> int:
        """The hidden layer (1-based) the resumed attempt starts at."""
        return len(self.layers) + 1


def resume_point(model: MLP, reports: Sequence[LayerReport], points: Sequence[FloatArray], check: SelfCheck,
                 resumed_at: int = 0, gained: bool = False) -> Resume | None:
    """Where the next attempt may resume a failed deep attempt: at its first incomplete hidden layer
    after ``resumed_at`` (the layer this attempt itself resumed at, which had its aimed search already;
    0 for a fresh attempt); when there is none, at ``resumed_at`` again if its aimed search ``gained``
    rows there and it is still incomplete (another rare neuron of that layer, on where this attempt's
    model is wrong). None when the check passed or disagreed on more than
    :data:`RESUME_MAX_SHARE` of its random points (the others, near witnesses and suspects, are
    where a model is likeliest wrong), when no such layer exists, or when it is the first layer
    (nothing to keep)."""
    if check.passed or check.disagreeing > RESUME_MAX_SHARE * check.random_points:
        return None
    short = [r.index for r in reports if r.recovered < r.width and r.index > resumed_at]
    if not short and gained:
        short = [r.index for r in reports if r.recovered < r.width and r.index == resumed_at]
    if not short or short[0] <= 1:
        return None
    keep = short[0] - 1
    W, b = model.layers[keep]
    return Resume(tuple((W_.copy(), b_.copy()) for W_, b_ in model.layers[:keep]), tuple(reports[:keep]),
                  tuple(points[:keep]), (W.copy(), b.copy()),
                  np.array(check.disagreements, dtype=float).reshape(-1, model.input_dim))


def boundary_points(layers: Sequence[pfx.Layer], w: FloatArray, b: float, X: FloatArray, n: int,
                    rng: np.random.Generator) -> FloatArray:
    """Up to ``n`` points where the row ``(w, b)`` behind the known ``layers`` vanishes, found without a
    query: bisection (60 halvings) between sample inputs of ``X`` on either side of its boundary. The
    pre-activation is continuous along a segment, so each bisection ends on the boundary."""
    _, H = pfx.forward(layers, X)
    z = H @ w + b
    pos, neg = np.flatnonzero(z > 0), np.flatnonzero(z < 0)
    if not pos.size or not neg.size:
        return np.zeros((0, X.shape[1]))
    m = min(n, max(pos.size, neg.size))
    A, B = X[rng.choice(pos, size=m)], X[rng.choice(neg, size=m)]
    lo, hi = np.zeros(m), np.ones(m)  # z > 0 at lo, z < 0 at hi
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        _, Hm = pfx.forward(layers, A + mid[:, None] * (B - A))
        up = Hm @ w + b > 0
        lo, hi = np.where(up, mid, lo), np.where(up, hi, mid)
    t = 0.5 * (lo + hi)
    out: FloatArray = A + t[:, None] * (B - A)
    return out
