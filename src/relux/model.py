"""The fully connected ReLU network that relux extracts, verifies and serves."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from relux.errors import InputError

FloatArray = NDArray[np.float64]

#: Output activations a model file may declare. Oracles built from files return logits regardless.
OUTPUT_ACTIVATIONS = ("linear", "softmax", "sigmoid")


def parse_arch(text: str) -> tuple[int, ...]:
    """Parse an architecture written the way the field writes it: ``784-128-10`` or ``3072-256x8-10``.

    ``WxN`` repeats width W N times. At least an input and an output size are required.
    """
    if not isinstance(text, str) or not text.strip():
        raise InputError(f"expected an architecture such as '784-128-10', found {text!r}")
    sizes: list[int] = []
    for part in text.strip().split("-"):
        part = part.strip().lower()
        try:
            if "x" in part:
                width_s, rep_s = part.split("x", 1)
                width, rep = int(width_s), int(rep_s)
                if rep < 1:
                    raise ValueError
                sizes.extend([width] * rep)
            else:
                sizes.append(int(part))
        except ValueError:
            raise InputError(
                f"malformed architecture {text!r}: expected widths separated by '-', "
                f"optionally 'WxN' for N layers of width W (e.g. '3072-256x8-10'); bad part {part!r}"
            ) from None
    if len(sizes) < 2 or any(s < 1 for s in sizes):
        raise InputError(
            f"malformed architecture {text!r}: expected at least an input and an output size, all >= 1"
        )
    return tuple(sizes)


def format_arch(arch: Sequence[int]) -> str:
    """Write an architecture compactly, e.g. ``(3072, 256, ..., 10) -> '3072-256x8-10'``."""
    out: list[str] = [str(arch[0])]
    hidden = list(arch[1:-1])
    i = 0
    while i < len(hidden):
        j = i
        while j < len(hidden) and hidden[j] == hidden[i]:
            j += 1
        out.append(f"{hidden[i]}x{j - i}" if j - i > 1 else str(hidden[i]))
        i = j
    out.append(str(arch[-1]))
    return "-".join(out)


class MLP:
    """A ReLU network ``f(x) = W_{L+1} σ(... σ(W_1 x + b_1) ...) + b_{L+1}`` in float64.

    ``layers`` holds ``(W, b)`` pairs with ``W`` of shape ``(out, in)``; every layer but the last is
    followed by a ReLU. The arrays are copied and made read-only, so an ``MLP`` is immutable.
    ``output_activation`` records what the source file declared; :meth:`forward` always returns the
    pre-activation logits.
    """

    __slots__ = ("_layers", "output_activation")

    def __init__(
        self,
        layers: Sequence[tuple[ArrayLike, ArrayLike]],
        output_activation: str = "linear",
    ) -> None:
        if len(layers) < 1:
            raise InputError("an MLP needs at least one (W, b) layer, found none")
        if output_activation not in OUTPUT_ACTIVATIONS:
            raise InputError(
                f"unsupported output activation {output_activation!r}; expected one of {OUTPUT_ACTIVATIONS}"
            )
        frozen: list[tuple[FloatArray, FloatArray]] = []
        prev_out: int | None = None
        for i, (w, b) in enumerate(layers):
            W = np.array(w, dtype=np.float64, copy=True, order="C")
            B = np.array(b, dtype=np.float64, copy=True).reshape(-1)
            if W.ndim != 2:
                raise InputError(f"layer {i}: expected a 2-D weight matrix (out, in), found shape {W.shape}")
            if B.shape != (W.shape[0],):
                raise InputError(
                    f"layer {i}: bias shape {B.shape} does not match weight rows {W.shape[0]}"
                )
            if prev_out is not None and W.shape[1] != prev_out:
                raise InputError(
                    f"layer {i}: expects {W.shape[1]} inputs but layer {i - 1} has {prev_out} outputs"
                )
            if not (np.all(np.isfinite(W)) and np.all(np.isfinite(B))):
                raise InputError(f"layer {i}: weights contain NaN or inf")
            W.setflags(write=False)
            B.setflags(write=False)
            frozen.append((W, B))
            prev_out = W.shape[0]
        self._layers = tuple(frozen)
        self.output_activation = output_activation

    # ------------------------------------------------------------------ shape
    @property
    def layers(self) -> tuple[tuple[FloatArray, FloatArray], ...]:
        return self._layers

    @property
    def arch(self) -> tuple[int, ...]:
        return (self._layers[0][0].shape[1],) + tuple(W.shape[0] for W, _ in self._layers)

    @property
    def input_dim(self) -> int:
        return int(self._layers[0][0].shape[1])

    @property
    def output_dim(self) -> int:
        return int(self._layers[-1][0].shape[0])

    @property
    def hidden_widths(self) -> tuple[int, ...]:
        return self.arch[1:-1]

    @property
    def depth(self) -> int:
        """Number of hidden layers."""
        return len(self._layers) - 1

    @property
    def n_params(self) -> int:
        return int(sum(W.size + b.size for W, b in self._layers))

    # --------------------------------------------------------------- forward
    def _as_batch(self, X: ArrayLike) -> FloatArray:
        A = np.asarray(X, dtype=np.float64)
        if A.ndim == 1:
            A = A[None, :]
        if A.ndim != 2 or A.shape[1] != self.input_dim:
            raise InputError(f"expected inputs of shape (n, {self.input_dim}), found {np.shape(X)}")
        return A

    def forward(self, X: ArrayLike) -> FloatArray:
        """Batched forward pass: ``(n, d0) -> (n, k)`` logits (a 1-D input gives ``(1, k)``)."""
        H = self._as_batch(X)
        for W, b in self._layers[:-1]:
            H = np.maximum(H @ W.T + b, 0.0)
        W, b = self._layers[-1]
        out: FloatArray = H @ W.T + b
        return out

    __call__ = forward

    def preactivations(self, X: ArrayLike) -> list[FloatArray]:
        """Pre-activations of every hidden layer, each of shape ``(n, d_i)``."""
        H = self._as_batch(X)
        pres: list[FloatArray] = []
        for W, b in self._layers[:-1]:
            Z = H @ W.T + b
            pres.append(Z)
            H = np.maximum(Z, 0.0)
        return pres

    def activation_patterns(self, X: ArrayLike) -> list[NDArray[np.bool_]]:
        """Boolean on/off pattern of every hidden layer at each input, each ``(n, d_i)``."""
        return [Z > 0 for Z in self.preactivations(X)]

    # ------------------------------------------------------------ symmetries
    def equivalent(self, other: MLP, rtol: float = 1e-9) -> bool:
        """True when ``other`` equals this network up to a permutation and a positive scale per neuron.

        ``rtol`` bounds the normalised weight error after alignment (see :mod:`relux.align`).
        """
        from relux.align import align

        if self.arch != other.arch:
            return False
        result = align(self, other)
        return bool(result.complete and result.sign_errors == 0 and result.max_norm_weight_error <= rtol)

    def with_layers(self, layers: Sequence[tuple[ArrayLike, ArrayLike]]) -> MLP:
        """A copy with new layers and the same output activation."""
        return MLP(layers, self.output_activation)

    # ---------------------------------------------------------------- dunder
    def __repr__(self) -> str:
        return f"MLP(arch={format_arch(self.arch)}, params={self.n_params}, output={self.output_activation})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, MLP):
            return NotImplemented
        return self.arch == other.arch and all(
            np.array_equal(a, c) and np.array_equal(b, d)
            for (a, b), (c, d) in zip(self._layers, other._layers, strict=True)
        )

    __hash__ = None  # type: ignore[assignment]

    def to_dict(self) -> dict[str, Any]:
        """Plain nested lists, for JSON."""
        return {
            "arch": list(self.arch),
            "output_activation": self.output_activation,
            "layers": [{"weight": W.tolist(), "bias": b.tolist()} for W, b in self._layers],
        }
