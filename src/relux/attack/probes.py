"""Probe inputs for the self-check, computed on the model alone: where a hidden layer's output is extreme,
and where a row and one of its input coordinates are on together.

A neuron of layer ``k + 1`` that is rarely on is on where ``w . h_k(x) + b > 0``: a cap that the image
of ``h_k`` barely pokes into. Random inputs reach the cap with its (tiny) probability. Inputs that
maximise a random linear functional ``c . h_k(x)`` over a sphere lie on the far boundary of that image,
and land in the cap whenever ``c`` falls in the normal cone of its vertices, a set of directions that
does not shrink with the cap's volume (attack-notes §3: a deep neuron is found only where it is on).
On digits 64-40x4-10 (session 27) such maximisers turn the three rarest neurons (on at 2.5e-6 to 7e-5 of
Gaussian inputs) on 3 to 15 times as often as Gaussian inputs. They cost no query: the ascent runs on
the model's own layers, so a neuron the model lacks changes nothing here, only the oracle's answer there
(attack-notes §5 on the self-check).

A weight ``W[j, m]`` of layer ``k`` acts only where row ``j`` is near its boundary or on and coordinate ``m``
(neuron ``m`` of layer ``k - 1``) is on. A row found where ``m`` was always off has that weight unseen, and
Gaussian inputs that turn both on can be as rare as one in a million. :func:`pair_points` takes the pairs
``(j, m)`` least often on together among Gaussian inputs and climbs ``min(z_j, z_m)`` (each over its spread)
to inputs where both are on. On digits 64-40x4-10 (session 27) a model whose layer-4 row 32 had its weight
on layer-3 neuron 28 unseen (left at 0, the truth 0.16; the two are on together at no input in 400,000)
passed 100,000 Gaussian points and failed at 2 of 2,000 pair probes; the rarest neurons were on at about
2% of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from relux.attack.prefix import forward
from relux.oracle.base import FloatArray

#: ascent steps of :func:`pair_points` (step sizes falling linearly from 33/32 :data:`STEP` to about STEP/32)
PAIR_ITERATIONS = 100

#: Gaussian inputs on which the pairs' co-activation is measured
PAIR_SAMPLE = 4096

#: pairs on together at more than this share of the sample get no probe (the 1,000 Gaussian points of a check
#: of 2,000 at a probe share of 0.5 see them 10 times)
RARE_PAIR = 0.01

#: probes per rare pair at most (each from the pair's best sample input, moved at random)
PAIR_REPEATS = 4

#: a cap on the probes' arithmetic: probes x :data:`PAIR_ITERATIONS` x the model's weights (about ten seconds of
#: numpy at most; extreme probes take fewer steps); fewer probes are made for a wide model (CM24 100-200x3-10:
#: 19,607; CIFAR 3072-256x8-10: about 1,600)
WORK = 2e11

#: gradient-ascent steps of :func:`extreme_points`; 20 steps reach the rates of 150 on digits 64-40x4-10
#: (session 27)
ITERATIONS = 20

#: the ascents' step, as a share of the point's radius along the sphere (about 3.6 degrees)
STEP = 0.0625


@dataclass(frozen=True)
class Probes:
    """Probe inputs and, for each, the hidden layer it aims at (1-based): ``c . h_k`` maximised, or for pair
    probes the layer of the row (its input coordinate is in the layer before)."""

    points: FloatArray
    layer: np.ndarray


def extreme_points(
    layers: Sequence[tuple[FloatArray, FloatArray]],
    n: int,
    scale: float,
    rng: np.random.Generator,
    iterations: int = ITERATIONS,
) -> Probes:
    """``n`` inputs, each :data:`ITERATIONS` steps of ascent towards a local maximiser of ``c . h_k(x)`` over
    the sphere ``|x| = r``: ``k`` uniform
    over the hidden layers, ``c ~ N(0, I)``, and ``r`` and the starting point those of an ``N(0, scale^2 I)``
    draw (so the radii are the random points' radii). Projected gradient ascent with normalised steps.

    ``layers``: the model's ``(W, b)`` pairs, the output layer last (it is not used).
    """
    hidden = list(layers[:-1])
    d = layers[0][0].shape[1]
    if n <= 0 or not hidden:
        return _none(d)
    X = rng.normal(0.0, scale, size=(n, d))
    which = rng.integers(1, len(hidden) + 1, size=n)
    for k in range(1, len(hidden) + 1):
        sel = np.flatnonzero(which == k)
        if sel.size:
            X[sel] = _ascend(hidden[:k], X[sel], rng, iterations)
    return Probes(X, which)


def _ascend(prefix: Sequence[tuple[FloatArray, FloatArray]], X: FloatArray, rng: np.random.Generator,
            iterations: int) -> FloatArray:
    C = rng.normal(size=(X.shape[0], prefix[-1][0].shape[0]))
    r = np.linalg.norm(X, axis=1, keepdims=True)
    r = np.where(r > 0, r, 1.0)
    for _ in range(iterations):
        masks = [z > 0 for z in forward(prefix, X)[0]]
        g = C
        for (W, _b), on in zip(prefix[::-1], masks[::-1], strict=True):
            g = (g * on) @ W
        X = _sphere_step(X, g, r, STEP)
    return X


def pair_points(
    layers: Sequence[tuple[FloatArray, FloatArray]],
    n: int,
    scale: float,
    rng: np.random.Generator,
    iterations: int = PAIR_ITERATIONS,
    first: int = 1,
) -> Probes:
    """Up to ``n`` inputs at which a row ``j`` of a hidden layer ``k >= 2`` and its input coordinate ``m`` are on
    together, for the pairs least often on together among :data:`PAIR_SAMPLE` ``N(0, scale^2 I)`` inputs, at
    most :data:`RARE_PAIR` of them (ties in random order; the pairs repeat in that order, up to
    :data:`PAIR_REPEATS` times, when ``n`` exceeds them). Each climbs ``min(z_j / s_j,
    z_m / s_m)`` (``s``: the pre-activations' spreads on the sample) along the sphere of its start, the
    sample input where that minimum is largest, moved by a tenth of ``scale`` per coordinate: a subgradient
    step of falling size along the lesser term. A pair that is never on together ends near where it comes
    closest.

    ``layers``: the model's ``(W, b)`` pairs, the output layer last (it is not used). Fewer than two hidden
    layers have no pairs: no probe. Attack-notes §3: a row's weights show only on the coordinates active
    where it is measured. ``first``: rows of hidden layers ``first + 1`` on only (0-based ``k >=
    first``).
    """
    hidden = list(layers[:-1])
    d = layers[0][0].shape[1]
    if n <= 0 or len(hidden) < 2:
        return _none(d)
    X = rng.normal(0.0, scale, size=(PAIR_SAMPLE, d))
    Z = forward(hidden, X)[0]
    spread = [np.std(z, axis=0) for z in Z]
    keys, co = [np.zeros((0, 3), dtype=int)], [np.zeros(0)]
    for k in range(max(first, 1), len(hidden)):
        on_k, on_m = (Z[k] > 0).astype(float), (Z[k - 1] > 0).astype(float)
        share = (on_k.T @ on_m).ravel() / X.shape[0]
        j, m = np.divmod(np.arange(share.size), Z[k - 1].shape[1])
        # a pre-activation constant on the sample (a zero row) has no direction to climb: no probe
        live = (spread[k][j] > 0) & (spread[k - 1][m] > 0)
        keys.append(np.stack([np.full(int(live.sum()), k), j[live], m[live]], axis=1))
        co.append(share[live])
    key = np.concatenate(keys)
    share = np.concatenate(co)
    shuffled = rng.permutation(key.shape[0])
    order = shuffled[np.argsort(share[shuffled], kind="stable")]
    order = order[share[order] <= RARE_PAIR]
    n = min(n, PAIR_REPEATS * order.size)
    if n == 0:
        return _none(d)
    chosen = key[order[np.arange(n) % order.size]]
    out = np.zeros((n, d))
    for k in np.unique(chosen[:, 0]):
        sel = np.flatnonzero(chosen[:, 0] == k)
        J, M = chosen[sel, 1], chosen[sel, 2]
        sj, sm = spread[k][J], spread[k - 1][M]
        start = np.argmax(np.minimum(Z[k][:, J] / sj, Z[k - 1][:, M] / sm), axis=0)
        out[sel] = _climb_pairs(hidden[: k + 1], X[start] + 0.1 * scale * rng.normal(size=(sel.size, d)),
                                J, M, sj, sm, iterations)
    return Probes(out, chosen[:, 0] + 1)


def probe_points(
    layers: Sequence[tuple[FloatArray, FloatArray]],
    n: int,
    scale: float,
    rng: np.random.Generator,
) -> Probes:
    """The self-check's probes, in random order: :func:`pair_points` for half of them at most (fewer when the
    model has few rare pairs; none for a model of one hidden layer), :func:`extreme_points` for the rest, and
    at most as many as :data:`WORK` allows for the model's size (each probe is :data:`PAIR_ITERATIONS` forward
    and backward passes)."""
    d = layers[0][0].shape[1]
    weights = sum(W.size for W, _ in layers)
    n = min(n, int(WORK / (PAIR_ITERATIONS * max(weights, 1))))
    if n <= 0:
        return _none(d)
    pairs = pair_points(layers, n // 2, scale, rng)
    rest = extreme_points(layers, n - pairs.points.shape[0], scale, rng)
    mixed = rng.permutation(pairs.points.shape[0] + rest.points.shape[0])  # the kinds mixed, any share holds both
    return Probes(np.concatenate([pairs.points, rest.points])[mixed], np.concatenate([pairs.layer, rest.layer])[mixed])


def _none(d: int) -> Probes:
    return Probes(np.zeros((0, d)), np.zeros(0, dtype=int))


def _climb_pairs(prefix: Sequence[tuple[FloatArray, FloatArray]], X: FloatArray, J: np.ndarray, M: np.ndarray,
                 sj: FloatArray, sm: FloatArray, iterations: int) -> FloatArray:
    """Subgradient ascent of ``min(z_j / sj, z_m / sm)`` (``z_j`` of the last layer of ``prefix``, ``z_m`` of
    the one before, per point) along the sphere of each start."""
    k = len(prefix) - 1
    rows = np.arange(X.shape[0])
    r = np.linalg.norm(X, axis=1, keepdims=True)
    r = np.where(r > 0, r, 1.0)
    for t in range(iterations):
        Z = forward(prefix, X)[0]
        masks = [z > 0 for z in Z]
        low_j = Z[k][rows, J] / sj < Z[k - 1][rows, M] / sm
        # the lesser term's gradient: row j of layer k, or row m of layer k - 1, back through the masks
        g = np.where(low_j[:, None], prefix[k][0][J] / sj[:, None] * masks[k - 1], 0.0)
        g = g @ prefix[k - 1][0] + np.where(low_j[:, None], 0.0, prefix[k - 1][0][M] / sm[:, None])
        for layer in range(k - 2, -1, -1):
            g = (g * masks[layer]) @ prefix[layer][0]
        X = _sphere_step(X, g, r, STEP * (1.0 - t / iterations) + STEP / 32)
    return X


def _sphere_step(X: FloatArray, g: FloatArray, r: FloatArray, step: float) -> FloatArray:
    """Each row of ``X`` moved by ``step`` of its radius ``r`` along the part of ``g`` tangent to its sphere
    (normalised; a zero tangent leaves it), then put back on that sphere."""
    g = g - (np.sum(g * X, axis=1, keepdims=True) / r**2) * X
    norm = np.linalg.norm(g, axis=1, keepdims=True)
    X = X + step * r * np.where(norm > 0, g / np.where(norm > 0, norm, 1.0), 0.0)
    out: FloatArray = X * (r / np.linalg.norm(X, axis=1, keepdims=True))
    return out
