"""scikit-learn adapter (optional extra): fitted ``MLPClassifier`` / ``MLPRegressor`` objects.

Only in-memory estimators are converted; relux never unpickles an estimator from disk.
scikit-learn stores ``coefs_[i]`` as ``(in, out)``; they are transposed to relux's ``(out, in)``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from relux.errors import InputError
from relux.formats._common import LINEAR, SIGMOID, SOFTMAX, as_float64
from relux.model import MLP

#: sklearn's ``out_activation_`` -> relux output activation.
OUT_ACTIVATIONS = {"identity": LINEAR, "softmax": SOFTMAX, "logistic": SIGMOID}


def from_sklearn(estimator: Any) -> MLP:
    """Convert a fitted ``MLPClassifier``/``MLPRegressor`` with ``activation='relu'`` into an :class:`MLP`.

    Classifiers get their ``out_activation_`` (``softmax``, or ``sigmoid`` for binary / multi-label);
    regressors are linear. Note that a binary classifier has one output unit (``predict_proba`` shows two
    columns, ``1 - p`` and ``p``).
    """
    try:
        from sklearn.neural_network import MLPClassifier, MLPRegressor
    except ImportError as exc:
        raise InputError("this needs scikit-learn, an optional extra: pip install 'relux[zoo]'") from exc
    if not isinstance(estimator, MLPClassifier | MLPRegressor):
        raise InputError(
            f"cannot convert a {type(estimator).__name__}: relux reads scikit-learn MLPClassifier or "
            "MLPRegressor"
        )
    name = type(estimator).__name__
    if not hasattr(estimator, "coefs_"):
        raise InputError(f"this {name} is not fitted yet; call fit() first")
    if estimator.activation != "relu":
        raise InputError(
            f"this {name} uses activation={estimator.activation!r}; relux reads ReLU networks "
            "(activation='relu')"
        )
    out = getattr(estimator, "out_activation_", "identity")
    if out not in OUT_ACTIVATIONS:
        raise InputError(
            f"this {name} has output activation {out!r}; expected one of {sorted(OUT_ACTIVATIONS)}"
        )
    layers = []
    for i, (coef, intercept) in enumerate(zip(estimator.coefs_, estimator.intercepts_, strict=True)):
        W = as_float64(coef, f"coefs_[{i}]")
        b = as_float64(intercept, f"intercepts_[{i}]")
        layers.append((np.ascontiguousarray(W.T), b))
    return MLP(layers, OUT_ACTIVATIONS[out])
