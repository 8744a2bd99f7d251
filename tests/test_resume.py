"""Resuming a failed deep attempt from its first incomplete layer (``ExtractionConfig.resumes``)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import relux
from relux.attack import pipeline
from relux.attack.result import LayerReport, SelfCheck
from relux.errors import InputError
from relux.model import MLP
from relux.oracle import MLPOracle
from relux.zoo import random_mlp


def _reports(recovered: list[int], width: int = 8) -> list[LayerReport]:
    return [LayerReport(index=i + 1, width=width, recovered=r, dead=width - r, witnesses=0, queries=0, seconds=0.0,
                        sign_method="") for i, r in enumerate(recovered)]


def _check(disagreeing: int, points: int = 1000) -> SelfCheck:
    return SelfCheck(points=points, max_abs_error=1.0, max_rel_error=1e-3, tolerance=1e-8, noise_floor=0.0,
                     passed=False, random_points=points, disagreeing=disagreeing)


@pytest.mark.parametrize(
    ("recovered", "disagreeing", "resumed_at", "kept"),
    [
        ([8, 8, 7], 5, 0, 2),  # the last hidden layer short: the two before it are kept
        ([8, 7, 7], 5, 0, 1),  # the first incomplete layer decides
        ([7, 8, 8], 5, 0, None),  # the first layer short: nothing to keep
        ([8, 8, 8], 5, 0, None),  # every layer complete: a wrong row, not a missing one
        ([8, 8, 7], 11, 0, None),  # wrong on more than 1% of the points: not a rare neuron
        ([8, 8, 7], 10, 0, 2),  # exactly 1%: still resumed
        ([8, 7, 7], 5, 2, 2),  # layer 2 had its aimed search: the next resume goes on at layer 3
        ([8, 7, 7], 5, 3, None),  # nothing incomplete after the layer this attempt resumed at
    ],
)
def test_resume_point(recovered: list[int], disagreeing: int, resumed_at: int, kept: int | None) -> None:
    model = random_mlp((6, 8, 8, 8, 2), np.random.default_rng(0))
    points = [np.full((2, 6), float(i)) for i in range(3)]
    got = pipeline._resume_point(model, _reports(recovered), points, _check(disagreeing), resumed_at)
    if kept is None:
        assert got is None
        return
    assert got is not None
    assert len(got.layers) == len(got.reports) == len(got.points) == kept
    for (W, b), (Wm, bm) in zip(got.layers, model.layers, strict=False):
        np.testing.assert_array_equal(W, Wm)
        np.testing.assert_array_equal(b, bm)
    assert [r.index for r in got.reports] == list(range(1, kept + 1))
    assert got.points[-1][0, 0] == kept - 1


def test_a_passed_check_is_never_resumed() -> None:
    model = random_mlp((6, 8, 8, 8, 2), np.random.default_rng(0))
    passed = SelfCheck(points=1000, max_abs_error=0.0, max_rel_error=0.0, tolerance=1e-8, noise_floor=0.0,
                       passed=True, random_points=1000)
    assert pipeline._resume_point(model, _reports([8, 8, 7]), [np.zeros((1, 6))] * 3, passed) is None


def test_resumes_is_validated() -> None:
    with pytest.raises(InputError, match="resumes"):
        relux.ExtractionConfig(resumes=-1)
    with pytest.raises(InputError, match="resumes"):
        relux.ExtractionConfig(resumes=True)  # type: ignore[arg-type]


def _with_rare_neuron(model: MLP, rng: np.random.Generator, share: float) -> MLP:
    """``model`` with one more last-hidden neuron, on at about ``share`` of N(0, I) inputs: a model that
    lacks a rarely active neuron looks like this one to the oracle."""
    X = rng.normal(size=(20000, model.input_dim))
    H = X
    for W, b in model.layers[:-2]:
        H = np.maximum(H @ W.T + b, 0.0)
    u = rng.normal(size=H.shape[1])
    s = H @ u
    c = float(np.quantile(s, 1.0 - share))
    (W_last, b_last), (W_out, b_out) = model.layers[-2], model.layers[-1]
    hidden = (np.concatenate([W_last, u[None, :]]), np.append(b_last, -c))
    out = (np.concatenate([W_out, np.ones((W_out.shape[0], 1))], axis=1), b_out)
    return MLP([*model.layers[:-2], hidden, out])


def test_a_failed_attempt_resumes_at_its_first_incomplete_layer(monkeypatch: pytest.MonkeyPatch) -> None:
    """The first attempt is made to look as if it lacked a rarely active last-hidden neuron (its model
    has a spurious one, its report one row short): the second attempt keeps its first hidden layer
    and extracts the last one again, with the resume and the failure in the notes."""
    victim = random_mlp((12, 8, 8, 3), np.random.default_rng(0))
    real = pipeline._extract_deep
    calls: list[Any] = []

    def fake(*args: Any, **kwargs: Any) -> Any:
        resume = args[7] if len(args) > 7 else kwargs.get("resume")
        calls.append(resume)
        out = real(*args, **kwargs)
        if len(calls) > 1:
            return out
        model, reports, *rest = out
        short = (*reports[:-1], reports[-1].__class__(**{**reports[-1].__dict__, "recovered": reports[-1].width - 1}))
        return (_with_rare_neuron(model, np.random.default_rng(1), 0.002), short, *rest)

    monkeypatch.setattr(pipeline, "_extract_deep", fake)
    result = relux.extract(MLPOracle(victim), victim.arch, relux.ExtractionConfig(seed=0, restarts=0))
    assert result.selfcheck.passed
    assert len(calls) == 2 and calls[0] is None
    kept = calls[1]
    assert kept is not None and len(kept.layers) == 1 and kept.reports[0].index == 1
    assert any("attempt 1 (seed 0) failed: self-check failed" in w for w in result.warnings)
    assert [s.name for s in result.stages].count("failed_attempt_1") == 1
    # the kept layer is the first attempt's; the network refinement at the end may move its exact
    # weights only by rounding (3e-14 here), far below 1e-9
    np.testing.assert_allclose(result.model.layers[0][0], kept.layers[0][0], rtol=0, atol=1e-9)


def test_no_resume_when_resumes_is_zero(monkeypatch: pytest.MonkeyPatch) -> None:
    victim = random_mlp((12, 8, 8, 3), np.random.default_rng(0))
    real = pipeline._extract_deep

    def fake(*args: Any, **kwargs: Any) -> Any:
        model, reports, *rest = real(*args, **kwargs)
        short = (*reports[:-1], reports[-1].__class__(**{**reports[-1].__dict__, "recovered": reports[-1].width - 1}))
        return (_with_rare_neuron(model, np.random.default_rng(1), 0.002), short, *rest)

    monkeypatch.setattr(pipeline, "_extract_deep", fake)
    with pytest.raises(relux.ExtractionFailed, match="self-check failed") as info:
        relux.extract(MLPOracle(victim), victim.arch, relux.ExtractionConfig(seed=0, restarts=0, resumes=0))
    assert isinstance(info.value.partial, relux.ExtractionResult)
    assert 0 < info.value.partial.selfcheck.disagreeing <= 0.01 * info.value.partial.selfcheck.points
