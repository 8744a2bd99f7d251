"""First-layer signatures: hyperplanes from the jump of the gradient across a kink.

CJM20 §4.3 recovers a first-layer row from second differences at a witness; relux follows
attack-notes §3 instead: the gradients of the two affine pieces on either side of a kink differ by
``c ⊗ w`` (outputs × inputs), so the leading singular pair of the difference gives ``w`` up to one
real factor, with the relative signs of its entries, and ``c`` (the jump seen by each output).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from relux.attack.linalg import svd
from relux.oracle.base import FloatArray


@dataclass(frozen=True)
class Signature:
    """One measured hyperplane ``{x : w·x + b = 0}`` with ``||w|| = 1``.

    ``jump`` is the output-side factor ``c`` (the gradient jump is ``c ⊗ w``); ``rank_ratio`` is
    the second singular value of the jump over the first (0 for a clean single-neuron kink with one
    output); ``point`` is the witness the signature was measured at.
    """

    w: FloatArray
    b: float
    jump: FloatArray
    rank_ratio: float
    point: FloatArray

    @property
    def key(self) -> FloatArray:
        """The hyperplane as a unit vector of ``R^{d+1}`` (defined up to sign)."""
        v = np.append(self.w, self.b)
        out: FloatArray = v / np.linalg.norm(v)
        return out


def signature_from_jump(delta: FloatArray, point: FloatArray) -> Signature:
    """Signature from a gradient jump ``delta`` (``(k, d)``) measured across a kink at ``point``."""
    U, S, Vt = svd(np.atleast_2d(delta), full_matrices=False)
    w = Vt[0]
    # Fix the arbitrary SVD sign so that the largest entry is positive (a convention only: the
    # sign of a neuron is decided by the sign-recovery stage).
    if w[np.argmax(np.abs(w))] < 0:
        w = -w
        U = -U
    ratio = float(S[1] / S[0]) if S.size > 1 and S[0] > 0 else 0.0
    jump = U[:, 0] * S[0]
    return Signature(w=w, b=float(-(w @ point)), jump=jump, rank_ratio=ratio, point=point)


def stack_signatures(sigs: Sequence[Signature]) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Rows ``W``, biases ``b`` and witness points of ``sigs`` as arrays."""
    return np.stack([s.w for s in sigs]), np.array([s.b for s in sigs]), np.stack([s.point for s in sigs])


def hyperplane_distance(a: FloatArray, b: FloatArray) -> FloatArray:
    """Sign-blind distance between unit hyperplane keys: ``min(|a - b|, |a + b|)``, row-wise on ``b``."""
    b2 = np.atleast_2d(b)
    dm = np.linalg.norm(b2 - a[None, :], axis=1)
    dp = np.linalg.norm(b2 + a[None, :], axis=1)
    out: FloatArray = np.minimum(dm, dp)
    return out


def cluster_signatures(keys: FloatArray, tol: float) -> list[list[int]]:
    """Group signatures whose hyperplane keys agree within ``tol`` (greedy, order-stable)."""
    groups: list[list[int]] = []
    reps: list[FloatArray] = []
    for i, k in enumerate(keys):
        if reps:
            dist = hyperplane_distance(k, np.asarray(reps))
            j = int(np.argmin(dist))
            if dist[j] <= tol:
                groups[j].append(i)
                continue
        groups.append([i])
        reps.append(k)
    return groups
