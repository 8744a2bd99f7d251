"""The pipeline's walked layer: after its walks recover a neuron of the layer before, the layer is walked
again behind the completed layer, with no second round of sign-checking walks when the first decided every
sign (the stages are replaced by fakes: what is tested is which of them run, and on what)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import relux.attack.deep as deep
import relux.attack.missing as missing
import relux.attack.walk as walk
import relux.attack.walk_rows as walk_rows
from relux.attack import pipeline
from relux.attack.config import ExtractionConfig
from relux.attack.missing import MissingRow
from relux.attack.result import LayerReport
from relux.attack.signs import SignSolution
from relux.attack.walk import WalkOutcome
from relux.attack.walk_rows import WalkedRows


def _outcome(n_prev: int, decided: bool, missing: int = 1) -> WalkOutcome:
    sol = SignSolution(flips=np.zeros(n_prev, dtype=bool), relevant=np.ones(n_prev, dtype=bool), residual=0.0,
                       free_bits=0, solutions=1, method="fake", ok=True, reason="", confidence=np.ones(n_prev))
    return WalkOutcome(flips=np.zeros(n_prev, dtype=bool), confidence=np.ones(n_prev) * decided,
                       decided=np.full(n_prev, decided), W_next=np.zeros((0, n_prev)), b_next=np.zeros(0), points=(),
                       row_residual=np.zeros(0), walks=3, complete_walks=0, solution=sol, reason="",
                       missing=np.zeros((n_prev, missing)))


def _short_layer(rng: np.random.Generator, d0: int, n_prev: int, short: int,
                 confidence: float) -> tuple[list[tuple[np.ndarray, np.ndarray]], LayerReport]:
    """A layer of ``n_prev`` neurons with ``short`` of them missing, and its report (every wiggle verdict
    at ``confidence``)."""
    n = n_prev - short
    report = LayerReport(index=1, width=n_prev, recovered=n, dead=short, witnesses=0, queries=0, seconds=0.0,
                         sign_method="wiggle", neurons=tuple({"index": j, "sign_confidence": confidence}
                                                             for j in range(n)))
    return [(rng.normal(size=(n, d0)), rng.normal(size=n))], report


def _walked_rows(rng: np.random.Generator, width: int, n_in: int, d0: int) -> WalkedRows:
    """What fake signed walks return: ``width`` complete rows over ``n_in`` inputs."""
    return WalkedRows(W=rng.normal(size=(width, n_in)), b=rng.normal(size=width),
                      points=tuple(np.zeros((3, d0)) for _ in range(width)), residual=np.zeros(width), walks=width,
                      complete=width, reason="")


def _missing_row(rng: np.random.Generator, d0: int) -> MissingRow:
    """A neuron of the layer before, recovered by the walks."""
    return MissingRow(w=rng.normal(size=d0), b=0.3, points=np.zeros((8, d0)), residual=0.0, ok=True, reason="",
                      lines=1)


def test_the_signs_applied_are_the_ones_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    """An expansive layer: the few check walks decide every sign, but the full sign-free walks after them
    (whose flips are the ones applied) leave them open; behind the recovered neuron the signs are then
    walked again, not taken as checked."""
    rng = np.random.default_rng(0)
    d0, n_prev, width = 6, 5, 8
    layers, report = _short_layer(rng, d0, n_prev, 1, 0.5)
    walked: list[tuple[int, int]] = []  # (rows of the layer before, rows wanted) at each sign-free walk

    def fake_walk_layer(q: Any, lay: Any, width: int, *a: Any, rows_wanted: int = 0, **k: Any) -> WalkOutcome:
        walked.append((lay[-1][0].shape[0], rows_wanted))
        return _outcome(lay[-1][0].shape[0], rows_wanted == 3)

    new = _missing_row(rng, d0)
    monkeypatch.setattr(walk, "walk_layer", fake_walk_layer)

    def fake_walk_rows(q: Any, lay: Any, width: int, *a: Any, **k: Any) -> WalkedRows:
        walked.append((lay[-1][0].shape[0], -1))  # -1: signed walks
        return _walked_rows(rng, width, lay[-1][0].shape[0], d0)

    monkeypatch.setattr(walk_rows, "walk_rows", fake_walk_rows)
    monkeypatch.setattr(deep, "outcome_from_rows", lambda q, lay, W, *a, **k: ("outcome", W.shape[0]))
    monkeypatch.setattr(missing, "recover_from_walks", lambda *a, **k: new)
    monkeypatch.setattr(deep, "refine_row", lambda *a, **k: None)
    pipeline._walked_layer(lambda X: X[:, :1], layers, [report], width, d0, False, ExtractionConfig(), rng, 1e-9, [],
                           True)
    # the check walks, the full walks (their flips applied), then the check walks again behind the completed
    # layer (which decide here), and only then the signed walks
    assert walked == [(n_prev - 1, 3), (n_prev - 1, width), (n_prev, 3), (n_prev, -1)]


@pytest.mark.parametrize("decided", [True, False])
def test_a_recovered_neuron_is_followed_by_signed_walks(monkeypatch: pytest.MonkeyPatch, decided: bool) -> None:
    rng = np.random.default_rng(0)
    d0, n_prev, width = 6, 5, 4
    layers, report = _short_layer(rng, d0, n_prev, 1, 0.5)
    walked: list[int] = []  # rows of the layer before, at each sign-checking walk
    signed: list[tuple[int, int]] = []  # (rows of the layer before, rows given as known) at each signed walk

    def fake_walk_layer(q: Any, lay: Any, *a: Any, **k: Any) -> WalkOutcome:
        walked.append(lay[-1][0].shape[0])
        return _outcome(lay[-1][0].shape[0], decided)

    def fake_walk_rows(q: Any, lay: Any, width: int, *a: Any, known: Any = (), **k: Any) -> WalkedRows:
        signed.append((lay[-1][0].shape[0], len(known)))
        return _walked_rows(rng, width, lay[-1][0].shape[0], d0)

    new = _missing_row(rng, d0)
    monkeypatch.setattr(walk, "walk_layer", fake_walk_layer)
    monkeypatch.setattr(walk_rows, "walk_rows", fake_walk_rows)
    monkeypatch.setattr(missing, "recover_from_walks", lambda *a, **k: new)
    monkeypatch.setattr(deep, "refine_row", lambda *a, **k: None)
    monkeypatch.setattr(deep, "outcome_from_rows", lambda q, lay, W, *a, **k: ("outcome", W.shape[0]))
    lay, reps, out = pipeline._walked_layer(lambda X: X[:, :1], layers, [report], width, d0, False,
                                            ExtractionConfig(), rng, 1e-9, [], False, signed_only=True)
    assert lay[-1][0].shape[0] == n_prev and reps[-1].recovered == n_prev
    # the layer behind the completed one is walked by signed walks; the signs are walked again only when
    # the first walks left one open (here, with the wiggle's verdicts unclean too)
    assert walked == ([n_prev - 1] if decided else [n_prev - 1, n_prev])
    assert signed == [(n_prev, 0)] if decided else signed == []
    assert out == ("outcome", width) if decided else out is None


def test_missing_neurons_the_walks_cannot_separate_are_searched_for(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two neurons of the layer before missing, seen by the walks as one leftover space: that layer's row
    search goes on (more_rows), the rows it finds are added, and the signs are walked again (the new rows'
    are open) before the signed walks."""
    import relux.attack.more_rows as more_rows_mod
    from relux.attack.more_rows import MoreRows

    rng = np.random.default_rng(0)
    d0, n_prev, width = 6, 6, 4
    layers, report = _short_layer(rng, d0, n_prev, 2, 1.0)
    events: list[tuple[str, int]] = []

    def fake_walk_layer(q: Any, lay: Any, *a: Any, **k: Any) -> WalkOutcome:
        n = lay[-1][0].shape[0]
        events.append(("walks", n))
        return _outcome(n, True, missing=2 if n < n_prev else 0)

    def fake_more_rows(q: Any, lay: Any, W: Any, b: Any, width_: int, *a: Any, **k: Any) -> MoreRows:
        events.append(("more rows", width_ - W.shape[0]))
        return MoreRows(W=rng.normal(size=(2, d0)), b=rng.normal(size=2), points=(np.zeros((3, d0)),) * 2,
                        residual=np.zeros(2), coverage=np.ones((2, d0), dtype=bool), lines=8, witnesses=6, reason="")

    def fake_walk_rows(q: Any, lay: Any, width_: int, *a: Any, **k: Any) -> WalkedRows:
        events.append(("signed walks", lay[-1][0].shape[0]))
        return _walked_rows(rng, width_, lay[-1][0].shape[0], d0)

    monkeypatch.setattr(walk, "walk_layer", fake_walk_layer)
    monkeypatch.setattr(more_rows_mod, "more_rows", fake_more_rows)
    monkeypatch.setattr(walk_rows, "walk_rows", fake_walk_rows)
    monkeypatch.setattr(missing, "recover_from_walks", lambda *a, **k: None)
    monkeypatch.setattr(deep, "outcome_from_rows", lambda q, lay, W, *a, **k: ("outcome", W.shape[0]))
    points: list[np.ndarray] = []
    lay, reps, out = pipeline._walked_layer(lambda X: X[:, :1], layers, [report], width, d0, False,
                                            ExtractionConfig(), rng, 1e-9, [], False, points, signed_only=True)
    assert events == [("walks", n_prev - 2), ("more rows", 2), ("walks", n_prev), ("signed walks", n_prev)]
    assert lay[-1][0].shape[0] == n_prev and reps[-1].recovered == n_prev and reps[-1].dead == 0
    assert len(points) == 2 and out == ("outcome", width)
