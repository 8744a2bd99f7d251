"""The CIFAR-scale benchmark harness (issue 7) on tiny stand-ins: result files, partial failures, timeouts,
the victim cache and ``relux bench --suite cifar``. The real 3072-256x8-10 network is never built here."""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import relux.attack
import relux.bench.suites
from relux.attack.result import LayerReport, PartialResult, StageStats
from relux.bench.cifar import (
    RESULT_KEYS,
    CifarOptions,
    StageTimeline,
    add_attempts,
    add_partial,
    cpu_info,
    execute_cifar_case,
    finish_record,
    git_commit,
    layer_entries,
    new_record,
    result_file_name,
    run_cifar_case,
    run_environment,
    signs_checked,
    stage_summary,
    stamp,
    write_result,
)
from relux.bench.sampler import StackSampler
from relux.bench.suites import CIFAR_ARCH, Case, Targets, Victim, suite
from relux.bench.victims import cache_key, cached_victim, file_sha256
from relux.cli import main
from relux.errors import ExtractionFailed

TINY_ARCH = (12, 8, 8, 3)
TINY = Case("tiny 12-8-8-3", Victim("random", TINY_ARCH), targets=Targets(20.0, 600.0, max_weight_error=2.0**-20,
                                                                       max_rel_output_error=None,
                                                                       min_argmax_agreement=1.0))
#: Keys issue 7 asks of every result file.
ISSUE_KEYS = {"queries", "seconds", "log2_weight_error", "max_rel_output_error", "argmax_agreement",
              "victim_sha256", "cpu", "date", "commit", "layers"}
LAYER_KEYS = {"index", "width", "witnesses", "queries", "seconds", "recovered", "signs_checked", "sign_method"}
#: Few verification inputs: the tiny nets are verified in milliseconds.
FAST = {"agreement_points": 500, "verify_lines": 4}


def run_cli(argv: Sequence[str]) -> int:
    try:
        return main(list(argv))
    except SystemExit as exc:
        return int(exc.code) if isinstance(exc.code, int) else 1


def neurons(confidences: Sequence[float]) -> tuple[dict[str, Any], ...]:
    return tuple({"index": j, "sign_confidence": c} for j, c in enumerate(confidences))


def fabricated_partial() -> PartialResult:
    """Layer 1 done (8 neurons, 6 with a confident sign), layer 2 failed after 700 more queries."""
    layer1 = LayerReport(index=1, width=8, recovered=8, dead=0, witnesses=40, queries=1000, seconds=2.5,
                         sign_method="wiggle (20/24 controllable points, 6 decided)",
                         neurons=neurons([0.9, 1.0, 0.5, 0.7, 0.2, 0.49, 1.0, 0.8]))
    stages = (StageStats("noise_floor", 50, 0.1), StageStats("layer", 1000, 2.5, layer=1))
    return PartialResult(arch=TINY_ARCH, queries=1750, seconds=4.0, stages=stages, layers=(layer1,),
                         noise_floor=1e-16, failed_layer=2, reason="layer 2: too few witnesses", config={"seed": 0})


# Worker functions: module level so that the spawn start method can pickle them by name.
def stalled_case(case: Case, seed: int, options: CifarOptions) -> dict[str, Any]:
    """Logs like an attack that finishes layer 1 and then hangs in layer 2."""
    attack = logging.getLogger("relux.attack.pipeline")
    beat = logging.getLogger("relux.bench.runner")
    attack.info("stage noise_floor")
    beat.debug("52 queries so far", extra={"bench_queries": 52})
    attack.info("stage layer (layer 1)")
    beat.debug("1052 queries so far", extra={"bench_queries": 1052})
    attack.info("layer 1: 8/8 neurons, wiggle (test)")
    attack.info("stage layer (layer 2)")
    beat.debug("5000 queries so far", extra={"bench_queries": 5000})
    time.sleep(60.0)
    return new_record(case, seed)


# --------------------------------------------------------------------------- suite
def test_cifar_suite() -> None:
    trained, unitary = suite("cifar")
    assert CIFAR_ARCH == (3072, *([256] * 8), 10)
    assert trained.victim == Victim("trained", CIFAR_ARCH, dataset="mnist32")
    assert unitary.victim == Victim("unitary", CIFAR_ARCH)
    assert [result_file_name(c) for c in (trained, unitary)] == [
        "cifar3072-256x8-10-trained.json", "cifar3072-256x8-10-unitary.json"]
    for case in (trained, unitary):
        assert case.published is not None and case.published.paper == "CM24"
        assert "30 min on 256 cores" in case.published.time
        t = case.targets
        assert t is not None and t.max_log2_queries == 25 and t.max_seconds == 3600
        assert t.max_weight_error == 2.0**-20 and t.min_argmax_agreement == 1.0
    # 3072*256 + 256 + 7 * (256*256 + 256) + 256*10 + 10: the issue's 1,249,802 parameters.
    assert new_record(trained, 0)["params"] == 1_249_802


# --------------------------------------------------------------------------- per-layer figures
def test_signs_checked_counts_confident_signs_and_last_layer_solves() -> None:
    partial = fabricated_partial()
    assert signs_checked(partial.layers[0]) == 6  # confidences >= 0.5: 0.9, 1.0, 0.5, 0.7, 1.0, 0.8
    solved = LayerReport(2, 8, 7, 1, 30, 10, 1.0, "last-layer solve (free bits 0, solutions 1)", neurons([0.0] * 7))
    failed = LayerReport(2, 8, 7, 1, 30, 10, 1.0, "last-layer enum (free bits 30, solutions 0, FAILED)",
                         neurons([0.0] * 6 + [0.6]))
    assert signs_checked(solved) == 7 and signs_checked(failed) == 1


def test_layer_entries_mark_done_failed_and_unreached() -> None:
    arch = (12, 8, 8, 8, 3)
    entries = layer_entries(arch, fabricated_partial().layers, failed_layer=2, failed_queries=700, failed_seconds=1.4)
    assert [e["status"] for e in entries] == ["done", "failed", "not reached"]
    assert all(LAYER_KEYS <= set(e) for e in entries)
    assert entries[0]["witnesses"] == 40 and entries[0]["queries"] == 1000 and entries[0]["recovered"] == 8
    assert entries[1]["queries"] == 700 and entries[1]["recovered"] is None
    assert entries[2]["queries"] is None


def test_the_failed_layer_keeps_the_attack_s_tries_at_its_rows() -> None:
    record = {"layers": layer_entries((12, 8, 8, 8, 3), fabricated_partial().layers, failed_layer=2)}
    lines = ["layer 1: 8/8 rows from 4 all-on lines (0 of them tips; 9 kinks, 8 measured)",
             "layer 2: 0/8 rows from 0 all-on lines (0 of them tips; 0 kinks, 0 measured); no point",
             "layer 2: regions of fixed pattern instead",
             "layer 2: 6/8 rows from 3 pattern regions (30 lines, 80 kinks, 9 measured; 4 weights unseen)"]
    add_attempts(record, lines)
    assert record["layers"][1]["attempts"] == [lines[1], lines[3]]
    assert "attempts" not in record["layers"][0]
    add_attempts({"layers": []}, lines)  # nothing failed: nothing to add


# --------------------------------------------------------------------------- result files
def test_result_file_of_a_fabricated_partial_result(tmp_path: Path) -> None:
    record = new_record(TINY, 0)
    add_partial(record, fabricated_partial(), TINY_ARCH)
    record["status"] = "failed: layer 2: too few witnesses"
    record["queries"] = 1750
    finish_record(record, TINY)
    stamp(record, run_environment(tmp_path))  # tmp_path is no git checkout: commit None
    path = write_result(record, tmp_path / "results")
    assert path == tmp_path / "results" / "cifar12-8x2-3-random.json"
    data = json.loads(path.read_text())
    assert ISSUE_KEYS | set(RESULT_KEYS) <= set(data)
    assert data["ok"] is False and data["failed_layer"] == 2 and data["reason"] == "layer 2: too few witnesses"
    assert data["argmax_agreement"] is None and data["log2_weight_error"] is None  # no model was produced
    assert data["commit"] is None and data["cpu"]["cores"] >= 1 and re.match(r"\d{4}-\d\d-\d\dT", data["date"])
    one, two = data["layers"]
    assert one["status"] == "done" and one["signs_checked"] == 6 and one["seconds"] == 2.5
    # The failed layer's cost: the run's totals minus its finished stages (1750 - 1050 queries, 4.0 - 2.6 s).
    assert two["status"] == "failed" and two["queries"] == 700 and two["seconds"] == pytest.approx(1.4)
    assert data["stages"][-1] == {"name": "layer", "layer": 2, "queries": 700, "seconds": 1.4, "incomplete": True}
    assert [s["stage"] for s in data["where_the_time_goes"]] == ["layer 1", "layer 2", "noise_floor"]
    assert data["met"] is False and data["misses"][0].startswith("no verified model")
    assert "victim_test_accuracy" not in data  # a trained victim only


def test_stage_summary_groups_and_shares() -> None:
    stages = [{"name": "layer", "layer": 1, "queries": 10, "seconds": 1.0},
              {"name": "selfcheck", "layer": None, "queries": 5, "seconds": 3.0},
              {"name": "layer", "layer": 1, "queries": 2, "seconds": 1.0}]
    assert stage_summary(stages, 10.0) == [
        {"stage": "selfcheck", "queries": 5, "seconds": 3.0, "share": 0.3},
        {"stage": "layer 1", "queries": 12, "seconds": 2.0, "share": 0.2},
    ]


def test_environment_figures(tmp_path: Path) -> None:
    cpu = cpu_info()
    assert set(cpu) == {"model", "cores", "usable_cores", "load_average"} and cpu["cores"] >= 1
    assert git_commit(tmp_path) is None
    here = git_commit(Path(__file__).parent)
    if here is not None:  # running from a checkout
        assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?", here)


# --------------------------------------------------------------------------- runs on the tiny stand-in
def test_tiny_run_in_process(tmp_path: Path) -> None:
    record = run_cifar_case(TINY, 0, timeout=None, options=CifarOptions(cache_dir=str(tmp_path), **FAST))
    assert record["status"] == "ok" and record["ok"] is True and record["met"] is True, record["misses"]
    assert record["failed_layer"] is None and record["reason"] is None
    assert record["argmax_agreement"] == 1.0 and record["agreement_points"] == 500
    # Extraction of a 12-8-8-3 random net reaches about 2^-30; the issue's target is 2^-20.
    assert record["log2_weight_error"] < -20
    assert [e["status"] for e in record["layers"]] == ["done", "done"]
    assert all(e["signs_checked"] == 8 and e["recovered"] == 8 for e in record["layers"])
    assert sum(s["queries"] for s in record["stages"]) == record["queries"] > 0
    assert record["victim_sha256"] == file_sha256(tmp_path / "victims" / "random-12-8x2-3-seed0.npz")
    assert record["profile"]["interval"] > 0 and record["oracle_seconds"] >= 0


def test_partial_failure_is_recorded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing(oracle: Any, arch: Any, config: Any = None) -> Any:
        oracle.query(np.zeros((1750, 12)))
        raise ExtractionFailed("layer 2 could not be extracted: test", partial=fabricated_partial())

    monkeypatch.setattr(relux.attack, "extract", failing)
    record = execute_cifar_case(TINY, 0, CifarOptions(cache_dir=str(tmp_path), **FAST))
    assert record["status"] == "failed: layer 2 could not be extracted: test" and record["partial"] is True
    assert record["ok"] is False and record["failed_layer"] == 2 and record["reason"] == "layer 2: too few witnesses"
    assert record["queries"] == 1750 and record["argmax_agreement"] is None
    assert [e["status"] for e in record["layers"]] == ["done", "failed"]
    path = write_result(record, tmp_path / "out")
    assert json.loads(path.read_text())["layers"][1]["queries"] == 700


def test_soft_deadline_stops_the_attack(tmp_path: Path) -> None:
    options = CifarOptions(cache_dir=str(tmp_path), deadline=time.time() - 1.0, **FAST)
    record = execute_cifar_case(TINY, 0, options)
    assert record["deadline_reached"] is True and record["ok"] is False
    assert record["queries"] == 0 and "soft deadline" in record["reason"]
    assert [e["status"] for e in record["layers"]] == ["failed", "not reached"]


def test_deadline_inside_a_later_layer_keeps_the_finished_ones(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The soft deadline passing inside layer 2 ends the run (no new attempt from scratch, which would
    stop at its first query): the record keeps layer 1 as done and names layer 2 as the failed one."""
    from relux.bench import cifar

    emit = cifar._LayerWatch.emit

    def expire_after_layer_1(self: Any, record: logging.LogRecord) -> None:
        emit(self, record)
        if re.match(r"layer 1: \d+/\d+ neurons", record.getMessage()):
            self.meter.deadline = time.time() - 1.0

    monkeypatch.setattr(cifar._LayerWatch, "emit", expire_after_layer_1)
    record = execute_cifar_case(TINY, 0, CifarOptions(cache_dir=str(tmp_path), deadline=time.time() + 600, **FAST))
    assert record["deadline_reached"] is True and record["partial"] is True
    assert record["failed_layer"] == 2 and "soft deadline" in record["reason"]
    assert [e["status"] for e in record["layers"]] == ["done", "failed"]
    assert not any(s["name"].startswith("failed_attempt") for s in record["stages"])


def test_deadline_is_lifted_after_the_last_hidden_layer() -> None:
    from relux.bench.cifar import _DeadlineMeter, _LayerWatch
    from relux.oracle.local import MLPOracle
    from relux.zoo import random_mlp

    meter = _DeadlineMeter(MLPOracle(random_mlp(TINY_ARCH, np.random.default_rng(0))), deadline=1e12)
    watch = _LayerWatch(meter, n_hidden=2)
    log = logging.getLogger("relux.attack.test")
    log.addHandler(watch)
    log.setLevel(logging.DEBUG)
    try:
        log.info("layer 1: 8/8 neurons, wiggle")
        log.debug("layer 2: 12 lines, 40 witnesses, 8 rows, 3 complete")  # progress inside layer 2
        assert meter.deadline == 1e12
        log.info("layer 2: 8/8 neurons, last-layer solve")
        assert meter.deadline is None and len(watch.lines) == 3
    finally:
        log.removeHandler(watch)


def test_killed_worker_still_gets_a_record(tmp_path: Path) -> None:
    record = run_cifar_case(TINY, 0, timeout=8.0, options=CifarOptions(cache_dir=str(tmp_path)),
                            execute=stalled_case)
    assert record["status"] == "timeout" and record["ok"] is False and record["time_limit_seconds"] == 8.0
    assert record["reason"] == "killed at the 8 s wall-clock limit during stage layer (layer 2)"
    assert record["failed_layer"] == 2 and record["queries"] == 5000
    one, two = record["layers"]
    assert one["status"] == "done" and one["recovered"] == 8 and one["sign_method"] == "wiggle (test)"
    assert one["queries"] == 1000 and two["status"] == "failed" and two["queries"] == 5000 - 1052
    assert [(s["name"], s["layer"]) for s in record["stages"]] == [("noise_floor", None), ("layer", 1), ("layer", 2)]
    assert record["victim_sha256"] is not None  # prepared by the parent


def test_stage_timeline_with_a_fake_clock() -> None:
    now = [0.0]
    seen: list[str] = []
    timeline = StageTimeline(lambda level, text: seen.append(text), clock=lambda: now[0])
    for t, text in [(1.0, "stage noise_floor"), (2.0, "40 queries so far"), (3.0, "stage layer (layer 1)"),
                    (9.0, "100 queries so far")]:
        now[0] = t
        timeline.feed(logging.INFO, text)
    now[0] = 10.0
    assert timeline.current() == ("layer", 1) and len(seen) == 4
    assert timeline.stages() == [
        {"name": "noise_floor", "layer": None, "queries": 40, "seconds": 2.0, "approximate": True},
        {"name": "layer", "layer": 1, "queries": 60, "seconds": 7.0, "approximate": True, "incomplete": True},
    ]


# --------------------------------------------------------------------------- victim cache
def test_victim_cache(tmp_path: Path) -> None:
    model, info = cached_victim(TINY_ARCH, "unitary", 3, cache_dir=tmp_path)
    assert info["cached"] is False
    assert info["cache_key"] == cache_key(TINY_ARCH, "unitary", 3) == "unitary-12-8x2-3-seed3"
    again, info2 = cached_victim(TINY_ARCH, "unitary", 3, cache_dir=tmp_path)
    assert info2["cached"] is True and info2["sha256"] == info["sha256"]
    assert all(np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
               for a, b in zip(model.layers, again.layers, strict=True))
    weights = tmp_path / "victims" / "unitary-12-8x2-3-seed3.npz"
    weights.write_bytes(weights.read_bytes()[:-10])  # torn: its SHA-256 no longer matches
    _, info3 = cached_victim(TINY_ARCH, "unitary", 3, cache_dir=tmp_path)
    assert info3["cached"] is False and info3["sha256"] == info["sha256"] == file_sha256(weights)


def test_cache_matches_relux_zoo(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "zoo.npz"
    assert run_cli(["zoo", "12-8-8-3", "--init", "random", "--seed", "0", "--out", str(out), "--json"]) == 0
    zoo = json.loads(capsys.readouterr().out)
    _, info = cached_victim(TINY_ARCH, "random", 0, cache_dir=tmp_path / "cache")
    assert info["sha256"] == zoo["sha256"]


def test_trained_victim_records_its_accuracy(tmp_path: Path) -> None:
    case = Case("digits 64-8-8-10", Victim("trained", (64, 8, 8, 10), dataset="digits"))
    record = run_cifar_case(case, 0, timeout=None, options=CifarOptions(cache_dir=str(tmp_path), **FAST))
    assert record["result_file"] == "cifar64-8x2-10-trained.json"
    assert 0.5 < record["victim_test_accuracy"] <= 1.0 and record["victim_training"]["epochs"] == 50


# --------------------------------------------------------------------------- CLI
def test_cli_cifar_suite_writes_result_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    real = relux.bench.suites.suite
    monkeypatch.setattr(relux.bench.suites, "suite", lambda name: (TINY,) if name == "cifar" else real(name))
    results = tmp_path / "results"
    code = run_cli(["-q", "bench", "--suite", "cifar", "--timeout", "0", "--results-dir", str(results),
                    "--cache", str(tmp_path / "cache"), "--agreement-points", "300", "--json",
                    str(tmp_path / "rows.json"), "--jobs", "2"])
    out = capsys.readouterr().out
    assert code == 0 and "tiny 12-8-8-3" in out
    data = json.loads((results / "cifar12-8x2-3-random.json").read_text())
    assert ISSUE_KEYS <= set(data) and data["ok"] is True and data["agreement_points"] == 300
    assert data["command"].startswith("relux bench --suite cifar --seed 0 --timeout 0")
    assert all(LAYER_KEYS <= set(e) for e in data["layers"])
    assert (data["execution"]["jobs"], data["execution"]["backend"]) == (2, "loky")
    (row,) = json.loads((tmp_path / "rows.json").read_text())
    assert row["victim_sha256"] == data["victim_sha256"]


@pytest.mark.parametrize("argv", [
    ["bench", "--suite", "cifar", "--agreement-points", "0"],
    ["bench", "--suite", "cifar", "--results-dir", __file__],
])
def test_cli_cifar_bad_input_exits_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(argv) == 2
    assert capsys.readouterr().err.startswith("relux: error:")


def test_stack_sampler_sees_the_caller() -> None:
    with StackSampler(0.01) as sampler:
        t_end = time.perf_counter() + 0.3
        while time.perf_counter() < t_end:
            sum(range(1000))
    summary = sampler.summary(top=5)
    assert summary["samples"] >= 5
    assert summary["self"][0]["function"] == "test_bench_cifar.py:test_stack_sampler_sees_the_caller"
    assert all(r["function"].startswith("relux/") for r in summary["inclusive"])  # only relux functions
