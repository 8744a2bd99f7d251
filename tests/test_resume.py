"""Resuming a failed deep attempt from its first incomplete layer (``ExtractionConfig.resumes``)."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest
from resume_helpers import spoil_first_attempt

import relux
from relux.attack import pipeline
from relux.attack import prefix as pfx
from relux.attack.checks import self_check
from relux.attack.result import LayerReport, SelfCheck
from relux.attack.resume import (
    Resume,
    _distinct_new,
    _seen_before,
    boundary_points,
    last_rows_at_hints,
    rare_rows,
    recovered_rows,
    resume_point,
    suspect_rows,
)
from relux.attack.unify import NeuronRow
from relux.errors import InputError
from relux.model import MLP
from relux.oracle import MLPOracle
from relux.verify import verify
from relux.zoo import random_mlp


def _reports(recovered: list[int], width: int = 8) -> list[LayerReport]:
    return [LayerReport(index=i + 1, width=width, recovered=r, dead=width - r, witnesses=0, queries=0, seconds=0.0,
                        sign_method="") for i, r in enumerate(recovered)]


def _check(disagreeing: int, points: int = 1000) -> SelfCheck:
    worst = tuple(tuple(float(i + k) for k in range(6)) for i in range(min(disagreeing, 16)))
    return SelfCheck(points=points, max_abs_error=1.0, max_rel_error=1e-3, tolerance=1e-8, noise_floor=0.0,
                     passed=False, random_points=points, disagreeing=disagreeing, disagreements=worst)


@pytest.mark.parametrize(
    ("recovered", "disagreeing", "resumed_at", "kept"),
    [
        ([8, 8, 7], 5, 0, 2),  # the last hidden layer short: the two before it are kept
        ([8, 7, 7], 5, 0, 2),  # the last hidden layer, incomplete, goes first
        ([8, 7, 7, 8], 5, 0, 1),  # else the first incomplete layer decides
        ([7, 8, 8], 5, 0, None),  # the first layer short: nothing to keep
        ([8, 8, 8], 5, 0, None),  # every layer complete: a wrong row, not a missing one
        ([8, 8, 7], 11, 0, None),  # wrong on more than 1% of the points: not a rare neuron
        ([8, 8, 7], 10, 0, 2),  # exactly 1%: still resumed
        ([8, 7, 7], 5, 2, 2),  # layer 2 had its aimed search: the next resume goes on at layer 3
        ([8, 7, 7], 5, 3, 1),  # the last hidden layer, resumed at, gained nothing: back to layer 2
        ([8, 8, 7], 5, 3, None),  # the same, with no earlier layer short
        ([8, 7, 8], 5, 3, 1),  # layer 3, resumed at, complete now: layer 2's missing neuron is left
    ],
)
def test_resume_point(recovered: list[int], disagreeing: int, resumed_at: int, kept: int | None) -> None:
    _resume_point_case(recovered, disagreeing, resumed_at, False, kept)


@pytest.mark.parametrize(
    ("recovered", "resumed_at", "kept"),
    [
        ([8, 7, 7], 3, 2),  # its search found rows in layer 3, still short: layer 3 again
        ([8, 7, 8], 3, 1),  # layer 3 complete now: back to layer 2, the only one short
        ([8, 8, 8], 3, None),  # every layer complete: a wrong row, not a missing one
        ([8, 7, 7], 2, 2),  # a later incomplete layer comes first
    ],
)
def test_resume_point_after_a_gain(recovered: list[int], resumed_at: int, kept: int | None) -> None:
    _resume_point_case(recovered, 5, resumed_at, True, kept)


def _resume_point_case(recovered: list[int], disagreeing: int, resumed_at: int, gained: bool,
                       kept: int | None) -> None:
    model = random_mlp((6, 8, 8, 8, 2), np.random.default_rng(0))
    points = [np.full((2, 6), float(i)) for i in range(3)]
    got = resume_point(model, _reports(recovered), points, _check(disagreeing), resumed_at, gained)
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
    assert got.layer == kept + 1
    # the incomplete layer's rows, which the resumed attempt keeps
    np.testing.assert_array_equal(got.rows[0], model.layers[kept][0])
    np.testing.assert_array_equal(got.rows[1], model.layers[kept][1])
    # the inputs where the model disagreed, where the resumed attempt aims
    assert got.hints.shape == (min(disagreeing, 16), 6) and got.hints[1, 0] == 1.0


def _resume_at(layer: int, rows: int, recovered: list[int]) -> Resume:
    """A resume point at hidden ``layer`` holding ``rows`` rows there, behind layers whose reports
    say ``recovered``."""
    reps = tuple(_reports(recovered)[: layer - 1])
    return Resume(layers=tuple((np.zeros((8, 6)), np.zeros(8)) for _ in reps), reports=reps,
                  points=tuple(np.zeros((1, 6)) for _ in reps), rows=(np.zeros((rows, 8)), np.zeros(rows)),
                  hints=np.zeros((1, 6)))


@pytest.mark.parametrize(
    ("before", "after", "progress"),
    [
        ((3, 6, [8, 8]), (3, 7, [8, 8]), True),  # layer 3 again, one row more
        ((3, 6, [8, 8]), (3, 6, [8, 8]), False),  # layer 3 again, nothing gained
        ((3, 6, [8, 8]), (4, 5, [8, 8, 7]), True),  # on to layer 4, layer 3 ended with 7 of the 6 kept
        ((3, 6, [8, 8]), (4, 5, [8, 8, 6]), False),  # on to layer 4, layer 3 as it was kept
        ((3, 6, [8, 8]), (2, 7, [8]), True),  # back to an earlier layer: layer 3 is complete now
    ],
)
def test_a_resume_that_recovered_rows_is_progress(before: tuple[int, int, list[int]],
                                                  after: tuple[int, int, list[int]], progress: bool) -> None:
    assert recovered_rows(_resume_at(*before), _resume_at(*after)) is progress


def test_a_passed_check_is_never_resumed() -> None:
    model = random_mlp((6, 8, 8, 8, 2), np.random.default_rng(0))
    passed = SelfCheck(points=1000, max_abs_error=0.0, max_rel_error=0.0, tolerance=1e-8, noise_floor=0.0,
                       passed=True, random_points=1000)
    assert resume_point(model, _reports([8, 8, 7]), [np.zeros((1, 6))] * 3, passed) is None


def test_resumes_is_validated() -> None:
    with pytest.raises(InputError, match="resumes"):
        relux.ExtractionConfig(resumes=-1)
    with pytest.raises(InputError, match="resumes"):
        relux.ExtractionConfig(resumes=True)  # type: ignore[arg-type]


def _rare_victim(share: float) -> MLP:
    """Random 12-8-8-3 whose last hidden neuron 0 is on at about ``share`` of N(0, I) inputs."""
    victim = random_mlp((12, 8, 8, 3), np.random.default_rng(1))
    (W1, b1), (W2, b2), out = victim.layers
    H = np.maximum(np.random.default_rng(5).normal(size=(50000, 12)) @ W1.T + b1, 0.0)
    b2 = b2.copy()
    b2[0] -= float(np.quantile(H @ W2[0] + b2[0], 1.0 - share))
    return MLP([(W1, b1), (W2, b2), out])


def _without_rarest(model: MLP) -> MLP:
    """``model`` without the last-hidden neuron that is on least often (as if no line had found it)."""
    H = np.random.default_rng(6).normal(size=(50000, model.input_dim))
    for W, b in model.layers[:-2]:
        H = np.maximum(H @ W.T + b, 0.0)
    (W, b), (Wo, bo) = model.layers[-2], model.layers[-1]
    j = int(np.argmin(np.mean(H @ W.T + b > 0, axis=0)))
    keep = np.arange(W.shape[0]) != j
    return MLP([*model.layers[:-2], (W[keep], b[keep]), (Wo[:, keep], bo)])


def _last_one_short(reports: tuple[LayerReport, ...]) -> tuple[LayerReport, ...]:
    """The reports with the last hidden layer one row short (as if a line had missed a neuron)."""
    last = reports[-1]
    return (*reports[:-1], dataclasses.replace(last, recovered=last.width - 1))


def test_a_failed_attempt_resumes_at_its_first_incomplete_layer(monkeypatch: pytest.MonkeyPatch,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    """The first attempt is made to miss a last-hidden neuron on at 0.5% of inputs (its model lacks it,
    its report is one row short). The second attempt keeps the first hidden layer and the seven rows
    found, finds the eighth on lines through the inputs where the first model was wrong, and passes."""
    victim = _rare_victim(0.005)
    calls = spoil_first_attempt(monkeypatch, lambda model, reports: (_without_rarest(model),
                                                                     _last_one_short(reports)))
    with caplog.at_level("INFO", logger="relux.attack"):
        result = relux.extract(MLPOracle(victim), victim.arch, relux.ExtractionConfig(seed=0, restarts=0))
    assert result.selfcheck.passed
    # the last hidden layer's missing row comes from the witness groups on lines through the hints
    assert "7 row(s) kept from the attempt resumed, 1 from witness groups at its disagreements" in caplog.text
    assert len(calls) == 2 and calls[0] is None
    kept = calls[1]
    assert kept is not None and len(kept.layers) == 1 and kept.reports[0].index == 1
    assert kept.rows[0].shape == (7, 8)
    assert any("attempt 1 (seed 0) failed: self-check failed" in w for w in result.warnings)
    assert [s.name for s in result.stages].count("failed_attempt_1") == 1
    # the kept layer is the first attempt's; the network refinement at the end may move its exact
    # weights only by rounding (3e-14 here), far below 1e-9
    np.testing.assert_allclose(result.model.layers[0][0], kept.layers[0][0], rtol=0, atol=1e-9)
    last = result.layers[1]
    assert last.recovered == 8
    assert sum(n["rows_from"].startswith("kept from the attempt resumed") for n in last.neurons) == 8
    report = verify(victim, result.model).to_json()
    assert report["unmatched"] == 0 and report["sign_errors"] == 0
    # issue 4's bounds, as for every deep extraction in tests/test_extract_deep.py
    assert report["max_norm_weight_error"] <= 2.0**-25 and report["max_rel_output_error"] <= 1e-8


def test_boundary_points_lie_on_the_row() -> None:
    model = random_mlp((6, 8, 8, 2), np.random.default_rng(3))
    rng = np.random.default_rng(4)
    w, b = model.layers[1][0][2], float(model.layers[1][1][2])
    P = boundary_points(model.layers[:1], w, b, rng.normal(size=(500, 6)), 8, rng)
    assert P.shape == (8, 6)
    H = np.maximum(P @ model.layers[0][0].T + model.layers[0][1], 0.0)
    # 60 halvings of a unit segment leave the point within 2^-60 of the boundary: |z| at rounding
    # level of the inputs' scale
    assert np.max(np.abs(H @ w + b)) <= 1e-12 * (np.abs(w) @ np.abs(H).max(axis=0) + abs(b))
    # a row on nowhere among the samples: points pushed onto its boundary from the samples nearest it
    far = boundary_points(model.layers[:1], w, b - 20.0, rng.normal(size=(50, 6)), 8, rng)
    assert 1 <= far.shape[0] <= 8
    Hf = np.maximum(far @ model.layers[0][0].T + model.layers[0][1], 0.0)
    assert np.max(np.abs(Hf @ w + b - 20.0)) <= 1e-12 * (np.abs(w) @ np.abs(Hf).max(axis=0) + abs(b - 20.0))
    # a row that no input switches (w = 0, b > 0) has none
    assert boundary_points(model.layers[:1], 0.0 * w, 1.0, rng.normal(size=(50, 6)), 8, rng).shape == (0, 6)


def test_no_resume_when_resumes_is_zero(monkeypatch: pytest.MonkeyPatch) -> None:
    real = pipeline._extract_deep

    def fake(*args: Any, **kwargs: Any) -> Any:
        model, reports, *rest = real(*args, **kwargs)
        return (_without_rarest(model), _last_one_short(reports), *rest)

    monkeypatch.setattr(pipeline, "_extract_deep", fake)
    victim = _rare_victim(0.005)
    with pytest.raises(relux.ExtractionFailed, match="self-check failed") as info:
        relux.extract(MLPOracle(victim), victim.arch, relux.ExtractionConfig(seed=0, restarts=0, resumes=0))
    assert isinstance(info.value.partial, relux.ExtractionResult)
    assert 0 < info.value.partial.selfcheck.disagreeing <= 0.01 * info.value.partial.selfcheck.points


def test_a_resumed_attempt_that_fails_otherwise_resumes_from_the_same_point(monkeypatch: pytest.MonkeyPatch) -> None:
    """The resumed attempt's model is broken everywhere (no resume point of its own): the third attempt
    resumes from the first attempt's point again and passes."""
    victim = _rare_victim(0.005)
    real = pipeline._extract_deep
    calls: list[Any] = []

    def fake(*args: Any, **kwargs: Any) -> Any:
        resume = args[7] if len(args) > 7 else kwargs.get("resume")
        calls.append(resume)
        model, reports, *rest = real(*args, **kwargs)
        if len(calls) == 1:
            return (_without_rarest(model), _last_one_short(reports), *rest)
        if len(calls) == 2:
            (Wo, bo) = model.layers[-1]
            return (MLP([*model.layers[:-1], (-Wo, bo)]), reports, *rest)  # wrong at nearly every input
        return (model, reports, *rest)

    monkeypatch.setattr(pipeline, "_extract_deep", fake)
    result = relux.extract(MLPOracle(victim), victim.arch, relux.ExtractionConfig(seed=0, restarts=0))
    assert result.selfcheck.passed
    assert len(calls) == 3 and calls[0] is None and calls[1] is not None and calls[2] is calls[1]
    assert any("attempt 2 (seed 1, resumed at layer 2) failed" in w for w in result.warnings)


def test_resumes_go_on_while_they_cost_less_than_a_restart(monkeypatch: pytest.MonkeyPatch) -> None:
    """With one counted resume and no restart, three attempts in a row miss the rarest neuron: the third is
    resumed too, and the fourth, since the resumes spent less than the fresh attempt (a restart would cost
    about as much again); with ``resumes=0``, none is."""
    victim = _rare_victim(0.005)
    real = pipeline._extract_deep
    calls: list[Any] = []

    def fake(*args: Any, **kwargs: Any) -> Any:
        calls.append(args[7] if len(args) > 7 else kwargs.get("resume"))
        model, reports, *rest = real(*args, **kwargs)
        if len(calls) <= 3:
            return (_without_rarest(model), _last_one_short(reports), *rest)
        return (model, reports, *rest)

    monkeypatch.setattr(pipeline, "_extract_deep", fake)
    result = relux.extract(MLPOracle(victim), victim.arch, relux.ExtractionConfig(seed=0, restarts=0, resumes=1))
    assert result.selfcheck.passed and len(calls) == 4
    assert calls[0] is None and all(c is not None for c in calls[1:])
    fresh, *resumed = [s.queries for s in result.stages if s.name.startswith("failed_attempt")]
    assert len(resumed) == 2 and sum(resumed) < fresh  # what let the fourth attempt resume too
    calls.clear()
    with pytest.raises(relux.ExtractionFailed):
        relux.extract(MLPOracle(victim), victim.arch, relux.ExtractionConfig(seed=0, restarts=0, resumes=0))
    assert calls == [None]


def test_self_check_counts_the_random_points_that_disagree() -> None:
    """``disagreeing`` counts the random points beyond the tolerance (what the resume rule reads); the
    points near witnesses and the suspects are checked but not counted."""
    base = random_mlp((6, 8, 2), np.random.default_rng(0))
    (W, b), (Wo, bo) = base.layers
    X = np.random.default_rng(1).normal(size=(20000, 6))
    b_rare = b.copy()
    b_rare[0] -= float(np.quantile(X @ W[0] + b[0], 0.99))  # neuron 0 on at 1% of N(0, I) inputs
    victim = MLP([(W, b_rare), (Wo, bo)])
    Wo_without = Wo.copy()
    Wo_without[:, 0] = 0.0
    lacking = MLP([(W, b_rare), (Wo_without, bo)])  # right wherever neuron 0 is off
    oracle = MLPOracle(victim)
    wit, normals, radii = np.zeros((3, 6)), np.eye(6)[:3], np.full(3, 0.1)
    # 4,000 points at a 1% share: 40 expected, standard deviation 6.3; the bounds are 3 of them away
    for model, lo, hi in ((victim, 0, 0), (lacking, 20, 60)):
        check = self_check(oracle.query, model, wit, normals, radii, 4000, 1.0, 1e-8, 0.0,
                           np.random.default_rng(2), suspects=np.zeros((2, 6)))
        assert check.points == 4000 + 6 * 3 + 2 and check.random_points == 4000
        assert lo <= check.disagreeing <= hi


def test_later_self_checks_query_earlier_disagreements_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every attempt's self-check queries again the inputs where earlier attempts were seen wrong: a
    model lacking the same rarely active neuron cannot pass by its random points missing it."""
    victim = _rare_victim(0.005)
    real_deep, real_check = pipeline._extract_deep, pipeline.self_check
    checks: list[tuple[Any, SelfCheck]] = []

    def fake(*args: Any, **kwargs: Any) -> Any:
        model, reports, *rest = real_deep(*args, **kwargs)
        return (_without_rarest(model), reports, *rest)  # reports complete: restarts, never resumes

    def spy(*args: Any, **kwargs: Any) -> SelfCheck:
        out = real_check(*args, **kwargs)
        checks.append((args[10] if len(args) > 10 else kwargs.get("suspects"), out))
        return out

    monkeypatch.setattr(pipeline, "_extract_deep", fake)
    monkeypatch.setattr(pipeline, "self_check", spy)
    with pytest.raises(relux.ExtractionFailed):
        relux.extract(MLPOracle(victim), victim.arch, relux.ExtractionConfig(seed=0, restarts=2))
    assert len(checks) == 3
    for k in (1, 2):
        earlier = np.concatenate([np.array(c.disagreements) for _, c in checks[:k]])
        suspects = checks[k][0]
        assert suspects is not None and earlier.size
        assert all(np.any(np.all(suspects == x, axis=1)) for x in earlier)


def test_a_neuron_dropped_as_dead_makes_the_self_check_larger(monkeypatch: pytest.MonkeyPatch) -> None:
    """A model whose last hidden layer lacks a neuron on at 1e-4 of inputs, reported dead: its
    self-check uses selfcheck_dead_points random points (here 30,000, against about 2,000 otherwise),
    enough to see that neuron on (e^-3 to miss it), so the model is not returned."""
    victim = _rare_victim(1e-4)
    real_deep, real_check = pipeline._extract_deep, pipeline.self_check
    sizes: list[int] = []

    def fake(*args: Any, **kwargs: Any) -> Any:
        model, reports, *rest = real_deep(*args, **kwargs)
        short = _last_one_short(reports)
        short = (*short[:-1], dataclasses.replace(short[-1], dead=1))
        return (_without_rarest(model), short, *rest)

    def spy(*args: Any, **kwargs: Any) -> SelfCheck:
        sizes.append(int(args[5]))
        return real_check(*args, **kwargs)

    monkeypatch.setattr(pipeline, "_extract_deep", fake)
    monkeypatch.setattr(pipeline, "self_check", spy)
    cfg = relux.ExtractionConfig(seed=0, restarts=0, resumes=0, selfcheck_dead_points=30_000)
    with pytest.raises(relux.ExtractionFailed):
        relux.extract(MLPOracle(victim), victim.arch, cfg)
    assert sizes == [30_000]


def test_a_complete_last_hidden_layer_is_carried() -> None:
    """Resumed at layer 2 with layer 3 (the last hidden one) after it: layer 3's rows, report and points go
    with the resume point (relux.attack.carry); resumed at layer 3 itself, nothing is carried."""
    model = random_mlp((6, 8, 8, 8, 2), np.random.default_rng(0))
    points = [np.full((2, 6), float(i)) for i in range(3)]
    got = resume_point(model, _reports([8, 7, 8]), points, _check(5))
    assert got is not None and got.layer == 2 and got.carried is not None
    np.testing.assert_array_equal(got.carried.W, model.layers[2][0])
    np.testing.assert_array_equal(got.carried.b, model.layers[2][1])
    assert got.carried.report.index == 3 and got.carried.points[0, 0] == 2.0
    got = resume_point(model, _reports([8, 7, 8]), points, _check(5), resumed_at=3)
    assert got is not None and got.layer == 2 and got.carried is not None  # back from layer 3, complete now
    got = resume_point(model, _reports([8, 7, 7]), points, _check(5), resumed_at=3, gained=True)
    assert got is not None and got.layer == 3 and got.carried is None
    # the last hidden layer stuck short: back to layer 2, carried along short (not progress: no free resume)
    back = resume_point(model, _reports([8, 7, 7]), points, _check(5), resumed_at=3)
    assert back is not None and back.layer == 2 and back.carried is not None and back.carried.report.recovered == 7
    assert not recovered_rows(got, back)


def test_a_gain_that_left_the_aimed_inputs_wrong_goes_back_a_layer() -> None:
    """The last hidden layer, resumed at, gained rows, and the layer before is short: when its check is
    still wrong only at the inputs its search was aimed at, and none of the rows it added is on there, what
    is missing there is the layer before's (digits 64-40x4-10: a rare layer-4 row found at one hint, layer-3
    neuron 18 on at the other); a new disagreement, or a new row on at one, keeps the resume at the last
    hidden layer."""
    model = random_mlp((6, 8, 8, 8, 2), np.random.default_rng(0))
    points = [np.full((2, 6), float(i)) for i in range(3)]
    check = dataclasses.replace(_check(2), disagreeing=0)  # wrong at two earlier inputs, at no random one
    D = np.array(check.disagreements)
    aimed = np.concatenate([D, np.full((1, 6), 9.0)])
    W3, b3 = model.layers[2]
    _, H = pfx.forward(model.layers[:2], D)
    on = np.flatnonzero(np.any(H @ W3.T + b3 > 0, axis=0))
    assert on.size and on.size < W3.shape[0]  # some rows on at the disagreements, some not
    off = np.setdiff1d(np.arange(W3.shape[0]), on)
    layers = tuple(model.layers[:2])

    def before(hints: np.ndarray, kept: np.ndarray) -> Resume:
        return Resume(layers, tuple(_reports([8, 7])), tuple(points[:2]), (W3[kept], b3[kept]), hints)

    # the rows added (those not kept) are all off at the disagreements: back to layer 2
    got = resume_point(model, _reports([8, 7, 7]), points, check, 3, True, None, before(aimed, on))
    assert got is not None and got.layer == 2 and got.carried is not None
    # a row added is on at one of them: found there, but wrong there; layer 3 again
    got = resume_point(model, _reports([8, 7, 7]), points, check, 3, True, None, before(aimed, off))
    assert got is not None and got.layer == 3
    # one input it was not aimed at: another rare last-layer row may be on there
    got = resume_point(model, _reports([8, 7, 7]), points, check, 3, True, None, before(aimed[1:], on))
    assert got is not None and got.layer == 3
    # the layer before complete: nowhere else to look
    got = resume_point(model, _reports([8, 8, 7]), points, check, 3, True, None, before(aimed, on))
    assert got is not None and got.layer == 3
    # a random point disagrees too (among the sixteen worst or not): it was not aimed at
    got = resume_point(model, _reports([8, 7, 7]), points, _check(2), 3, True, None, before(aimed, on))
    assert got is not None and got.layer == 3


def test_no_free_resume_back_past_a_complete_layer() -> None:
    """Resumed at the last hidden layer (4), still short and nothing gained, with layer 3 complete and layer 2
    short: the next resume does not jump back to layer 2 (layer 4 could not be carried from there)."""
    model = random_mlp((6, 8, 8, 8, 8, 2), np.random.default_rng(0))
    points = [np.full((2, 6), float(i)) for i in range(4)]
    assert resume_point(model, _reports([8, 7, 8, 7]), points, _check(5), resumed_at=4) is None


def test_rare_rows_tells_a_missing_neuron_from_a_false_row() -> None:
    # A resumed attempt adds rows for neurons its failed model lacked; that model agreed with f at all but
    # a few inputs, so a real missing neuron is on (or off) at few of them. A row on at about half of them
    # (witnesses of an unknown earlier-layer neuron unified into one, digits 64-40x4-10) is no such neuron.
    model = random_mlp((6, 8, 3), np.random.default_rng(5))
    X = np.random.default_rng(6).normal(size=(4000, 6))
    H = np.maximum(X @ model.layers[0][0].T + model.layers[0][1], 0.0)
    w = np.random.default_rng(7).normal(size=8)
    z = H @ w
    rare_b = -float(np.quantile(z, 0.995))  # on at 0.5% of the sample
    often_b = -float(np.quantile(z, 0.5))  # on at half
    W = np.stack([w, w, -w])
    b = np.array([rare_b, often_b, -rare_b])  # the third: off at 0.5% (the first, oriented the other way)
    assert rare_rows(model.layers[:1], W, b, X).tolist() == [True, False, True]
    assert rare_rows(model.layers[:1], np.zeros((0, 8)), np.zeros(0), X).shape == (0,)


def test_a_partly_seen_row_is_known_by_the_weights_it_saw() -> None:
    # A rarely active neuron's witnesses see some of its weights; the unified row's other weights are
    # arbitrary. It is the known row when the two agree on what it saw, and a new one otherwise.
    rng = np.random.default_rng(8)
    W, b = rng.normal(size=(3, 10)), rng.normal(size=3)
    cov = np.ones(W.shape, dtype=bool)
    seen = np.arange(10) < 6
    w = np.where(seen, 2.0 * W[1], rng.normal(size=10))  # row 1 at twice the scale, 4 weights unseen
    r = NeuronRow(w=w, b=2.0 * float(b[1]), members=(0, 1), coverage=seen, residual=0.0, gap=1e6)
    assert _seen_before(r, W, b, cov)
    other = NeuronRow(w=rng.normal(size=10), b=0.3, members=(0, 1), coverage=seen, residual=0.0, gap=1e6)
    assert not _seen_before(other, W, b, cov)
    # three coordinates seen are too few to tell
    few = NeuronRow(w=w, b=2.0 * float(b[1]), members=(0, 1), coverage=np.arange(10) < 3, residual=0.0, gap=1e6)
    assert not _seen_before(few, W, b, cov)


def test_a_complete_model_resumes_without_the_rare_rows_on_where_it_is_wrong() -> None:
    # Every layer complete, yet wrong at a few inputs: a rarely active row is wrong. The resume goes to the
    # last hidden layer without the rare rows on at those inputs (found again there); a common row on
    # there is kept (a wrong common row would disagree almost everywhere).
    model = random_mlp((6, 8, 8, 8, 2), np.random.default_rng(0))
    W, b = model.layers[2]
    sample = np.random.default_rng(1).normal(size=(4000, 6))
    H = pfx.forward(model.layers[:2], sample)[1]
    z = H @ W[3]
    b = b.copy()
    b[3] = -float(np.quantile(z, 0.995))  # row 3 on at 0.5% of inputs
    model = MLP([*model.layers[:2], (W, b), model.layers[3]])
    Z = pfx.forward(model.layers[:3], sample)[0][-1]
    at = sample[Z[:, 3] > 0][:3]
    check = dataclasses.replace(_check(2), disagreements=tuple(tuple(float(v) for v in x) for x in at))
    assert suspect_rows(model, 3, sample, at).tolist() == [3]
    points = [np.full((2, 6), float(i)) for i in range(3)]
    got = resume_point(model, _reports([8, 8, 8]), points, check, 0, False, sample)
    assert got is not None and got.layer == 3 and got.carried is None
    np.testing.assert_array_equal(got.rows[0], np.delete(W, 3, axis=0))
    # without a sample (or with no rare row), no such resume
    assert resume_point(model, _reports([8, 8, 8]), points, check) is None
    assert suspect_rows(model, 3, sample, np.zeros((0, 6))).size == 0


def test_a_last_layer_row_with_no_effect_on_the_output_is_dropped() -> None:
    model = random_mlp((6, 8, 5, 3), np.random.default_rng(2))
    (W1, b1), (W2, b2), (Wo, bo) = model.layers
    Wo = Wo.copy()
    Wo[:, 1] *= 1e-12
    reports = _reports([8, 5], width=8)
    reports[1] = dataclasses.replace(reports[1], width=5, dead=0, neurons=tuple({"row": i} for i in range(5)))
    full, reps, dropped = pipeline._drop_idle_rows([(W1, b1), (W2, b2), (Wo, bo)], reports)
    assert dropped == [1]
    assert full[1][0].shape == (4, 8) and full[2][0].shape == (3, 4)
    assert reps[1].recovered == 4 and reps[1].dead == 1
    assert [n["row"] for n in reps[1].neurons] == [0, 2, 3, 4]
    # a model whose rows all act is left as it is
    same, reps2, none = pipeline._drop_idle_rows(list(model.layers), reports)
    assert none == [] and same[1][0] is model.layers[1][0] and reps2 is reports


def test_made_worse_compares_shares_and_the_largest_miss() -> None:
    model = random_mlp((6, 8, 8, 8, 2), np.random.default_rng(0))
    points = [np.full((2, 6), float(i)) for i in range(3)]
    before = resume_point(model, _reports([8, 8, 7]), points, _check(5))  # 5 of 1000 random points, 1e-3
    assert before is not None and before.disagreeing == 0.005 and before.max_rel_error == 1e-3
    # four times the share (and more than 16 points): worse; as many on a check ten times larger: not
    assert before.made_worse(dataclasses.replace(_check(0), disagreeing=21, random_points=1000))
    assert not before.made_worse(dataclasses.replace(_check(0), disagreeing=50, random_points=10000))
    # a largest miss ten times larger and above 1e-2: worse; ten times larger below it: not
    assert before.made_worse(dataclasses.replace(_check(0), max_rel_error=0.2))
    assert not before.made_worse(dataclasses.replace(_check(0), max_rel_error=9e-3))


def test_extraction_config_validates_the_new_switches() -> None:
    with pytest.raises(InputError):
        relux.ExtractionConfig(selfcheck_lines=-1)
    with pytest.raises(InputError):
        relux.ExtractionConfig(reread_rare_rows=1)  # type: ignore[arg-type]
    with pytest.raises(InputError):
        relux.ExtractionConfig(selfcheck_stop_early=0)  # type: ignore[arg-type]
    assert relux.ExtractionConfig().selfcheck_stop_early is True
    assert relux.ExtractionConfig(selfcheck_lines=0, reread_rare_rows=False).to_json()["selfcheck_lines"] == 0


def test_a_neuron_found_twice_by_a_resume_is_kept_once() -> None:
    # Two new rows of one neuron, the second off on a weight its witnesses did not see, and a third neuron:
    # the copy goes (the row that saw more coordinates stays), the other neuron stays.
    rng = np.random.default_rng(0)
    w, other = rng.normal(size=6), rng.normal(size=6)
    bent = w.copy()
    bent[5] += 0.5
    W = np.stack([bent, w, other])
    b = np.array([0.3, 0.3, -0.2])
    cov = np.ones((3, 6), dtype=bool)
    cov[0, 5] = False  # the bent copy never saw coordinate 5
    keep = _distinct_new(W, b, cov, np.zeros(3), np.arange(3), 3)
    assert keep.tolist() == [1, 2]
    # distinct neurons all stay, and only the indices asked are considered
    assert _distinct_new(W, b, cov, np.zeros(3), np.array([0, 2]), 3).tolist() == [0, 2]


@pytest.mark.parametrize(("n_hints", "n_lines"), [(1, 8), (3, 8), (8, 8), (12, 12), (20, 16)])
def test_last_layer_rows_at_few_hints_take_several_lines_through_each(
        monkeypatch: pytest.MonkeyPatch, n_hints: int, n_lines: int) -> None:
    """A rarely active last-layer neuron seen at one input needs lines in several directions through it
    (one line crosses its small on-region in one or two activation patterns): at least eight lines in
    all, cycling over the hints; eight hints or more keep one line each (the first 16), as before."""
    import relux.attack.witnesses as witnesses

    seen: list[np.ndarray] = []

    def collect(*args: Any, lines_given: tuple[np.ndarray, np.ndarray], **kwargs: Any) -> tuple[list[Any], Any]:
        seen.append(lines_given[0])
        return [], None

    monkeypatch.setattr(witnesses, "collect_witnesses", collect)
    d0 = 5
    hints = np.random.default_rng(0).normal(size=(n_hints, d0))
    W, b = np.eye(4, d0), np.zeros(4)
    last_rows_at_hints(lambda X: X[:, :1], [(W, b)], np.zeros((0, 4)), np.zeros(0), np.zeros((0, 4), dtype=bool),
                       np.zeros(0), [], 2, d0, relux.ExtractionConfig(), np.random.default_rng(0), 1e-9, hints)
    (x0,) = seen
    assert x0.shape == (n_lines, d0)
    assert {tuple(x) for x in x0} == {tuple(x) for x in hints[:16]}
