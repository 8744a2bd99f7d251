"""relux.bench and ``relux bench``: rows from the runner, the time limit, the writers, the CLI."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import relux.attack
from relux.bench import (
    ROW_KEYS,
    SUITE_NAMES,
    Case,
    Published,
    Victim,
    execute_case,
    format_table,
    markdown_table,
    plots_available,
    run_case,
    run_isolated,
    suite,
    write_json,
    write_markdown,
    write_plots,
)
from relux.bench.runner import base_row, sign_stage_queries
from relux.cli import main
from relux.errors import ExtractionFailed, InputError

TINY = Case("random 6-4-1", Victim("random", (6, 4, 1)))
JSON_KEYS = {"model", "params", "queries", "seconds", "log2_weight_error", "max_rel_output_error"}
# The project's one-hidden-layer accuracy target; a 6-4-1 random net reaches about 2^-47 (seed 0).
MAX_LOG2_WEIGHT_ERROR = -30.0


def run_cli(argv: Sequence[str]) -> int:
    try:
        return main(list(argv))
    except SystemExit as exc:
        return int(exc.code) if isinstance(exc.code, int) else 1


# Worker functions: module level so that the spawn start method can pickle them by name.
def sleeping_case(case: Case, seed: int, shared_dir: str | None) -> dict[str, Any]:
    logging.getLogger("relux.bench.test").info("sleeping case started")
    logging.getLogger("relux.attack.pipeline").info("layer 1: 3/4 neurons, wiggle (test)")
    logging.getLogger("relux.bench.runner").debug("heartbeat", extra={"bench_queries": 1234})
    time.sleep(60.0)
    return base_row(case, seed)


def raising_case(case: Case, seed: int, shared_dir: str | None) -> dict[str, Any]:
    raise RuntimeError("boom in the worker")


def sleep_then_return(seconds: float) -> dict[str, Any]:
    time.sleep(seconds)
    return {"slept": seconds}


# --------------------------------------------------------------------------- runner
def check_ok_row(row: dict[str, Any]) -> None:
    assert set(ROW_KEYS) <= set(row)
    assert row["status"] == "ok", row["status"]
    assert row["model"] == "random 6-4-1" and row["arch"] == "6-4-1" and row["params"] == 6 * 4 + 4 + 4 + 1
    assert row["queries"] > 0 and row["log2_queries"] == pytest.approx(math.log2(row["queries"]), abs=1e-3)
    assert row["seconds"] >= 0 and row["selfcheck"] == "passed"
    assert row["log2_weight_error"] < MAX_LOG2_WEIGHT_ERROR
    assert row["sign_errors"] == 0 and row["argmax_agreement"] == 1.0
    (layer,) = row["layers"]
    assert layer["width"] == 4 and layer["recovered"] == 4 and layer["matched"] == 4 and layer["sign_errors"] == 0
    json.dumps(row, allow_nan=False)  # JSON-ready as is


def test_execute_case_in_process() -> None:
    check_ok_row(execute_case(TINY, 0))


def test_run_case_in_worker_process() -> None:
    levels: list[int] = []
    row = run_case(TINY, 0, timeout=120.0, on_log=lambda level, text: levels.append(level))
    check_ok_row(row)
    assert levels, "the worker's log records reach the parent"


def test_timeout_kills_the_case_and_keeps_its_progress() -> None:
    t0 = time.monotonic()
    # The limit covers the worker's start (a spawned interpreter importing this module: 2-2.5 s on a
    # loaded 2-core machine) before its first heartbeat; 10 s leaves room for that.
    row = run_case(TINY, 0, timeout=10.0, execute=sleeping_case)
    elapsed = time.monotonic() - t0
    assert row["status"] == "timeout"
    assert elapsed < 30.0  # 10 s limit + process start and terminate, far below the 60 s sleep
    assert set(ROW_KEYS) <= set(row)
    assert row["queries"] == 1234  # the last heartbeat before the kill
    assert "sleeping case started" in row["progress"]
    # How far it got, from the attack's per-layer log line.
    assert row["layers"] == [{"index": 1, "width": 4, "recovered": 3, "from_log": True, "sign_method": "wiggle (test)"}]
    assert row["arch"] == "6-4-1" and row["params"] == 33


def test_run_isolated_outcomes() -> None:
    done = run_isolated(sleep_then_return, (0.0,), timeout=60.0)
    assert done.state == "done" and done.value == {"slept": 0.0}
    killed = run_isolated(sleep_then_return, (60.0,), timeout=2.0)
    assert killed.state == "timeout" and killed.seconds < 15.0
    with pytest.raises(InputError):
        run_isolated(sleep_then_return, (0.0,), timeout=0.0)


def test_worker_exception_becomes_a_failed_row() -> None:
    row = run_case(TINY, 0, timeout=60.0, execute=raising_case)
    assert row["status"] == "failed: RuntimeError: boom in the worker"
    assert "RuntimeError" in row["traceback"]


def test_failed_extraction_reports_the_partial_result(monkeypatch: pytest.MonkeyPatch) -> None:
    real = relux.attack.extract

    def failing(oracle: Any, arch: Any, config: Any = None) -> Any:
        result = real(oracle, arch, config)
        check = dataclasses.replace(result.selfcheck, passed=False)
        raise ExtractionFailed("self-check failed: test", partial=dataclasses.replace(result, selfcheck=check))

    monkeypatch.setattr(relux.attack, "extract", failing)
    row = execute_case(TINY, 0)
    assert row["status"] == "failed: self-check failed: test" and row["partial"] is True
    assert row["selfcheck"] == "failed" and row["queries"] > 0
    assert row["log2_weight_error"] < MAX_LOG2_WEIGHT_ERROR  # the partial model is verified too
    assert row["layers"][0]["recovered"] == 4 and row["layers"][0]["matched"] == 4


def test_early_failure_without_partial_keeps_the_queries(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def failing(oracle: Any, arch: Any, config: Any = None) -> Any:
        oracle.query(np.zeros((5, 6)))
        logging.getLogger("relux.attack.pipeline").info("layer 1: 3/4 neurons, wiggle (test)")
        raise ExtractionFailed("no kink found")

    monkeypatch.setattr(relux.attack, "extract", failing)
    caplog.set_level(logging.INFO, logger="relux.attack")
    row = execute_case(TINY, 0)
    assert row["status"] == "failed: no kink found" and row["partial"] is False
    assert row["queries"] == 5 and row["log2_weight_error"] is None
    # How far it got, from the attack's per-layer log line.
    assert row["layers"] == [{"index": 1, "width": 4, "recovered": 3, "from_log": True, "sign_method": "wiggle (test)"}]


def test_missing_shared_file_is_skipped(tmp_path: Path) -> None:
    case = Case("absent", Victim("file", path="nowhere/absent.keras"))
    row = execute_case(case, 0, tmp_path)
    assert row["status"].startswith("skipped: ../shared/models/nowhere/absent.keras not found")
    assert set(ROW_KEYS) <= set(row)


def test_sign_stage_queries() -> None:
    stages = [{"name": "critical_points+signatures", "queries": 100}, {"name": "signs+output", "queries": 7},
              {"name": "sign_check", "queries": 5}, {"name": "layer", "queries": 1000}]
    assert sign_stage_queries(stages) == 12
    assert sign_stage_queries(stages[:1]) is None


# --------------------------------------------------------------------------- suites
@pytest.mark.parametrize("name", [*SUITE_NAMES, "smoke"])
def test_suites_are_well_formed(name: str) -> None:
    cases = suite(name)
    assert cases and len({c.name for c in cases}) == len(cases)


def test_suite_contents() -> None:
    assert len(suite("quick")) == 5 and len(suite("deep")) == 8 and len(suite("one-layer")) == 4
    assert all(c.published is not None for c in suite("paper"))
    assert all(c.targets is not None for c in suite("one-layer"))
    with pytest.raises(InputError):
        suite("nope")
    with pytest.raises(InputError):
        Victim("random", (6, 1))


# --------------------------------------------------------------------------- writers
def sample_rows() -> list[dict[str, Any]]:
    ok = execute_case(TINY, 0)
    deep_case = Case("random 8-6-4-1", Victim("random", (8, 6, 4, 1)),
                     Published("CJM20", "setting", queries="2^16.6", log2_queries=16.6))
    failed = base_row(deep_case, 0)
    failed.update(
        status="failed: self-check failed: 0.9 relative error", params=99, queries=1000, log2_queries=9.966,
        seconds=1.5, selfcheck="failed", partial=True, log2_weight_error=-3.0, max_rel_output_error=0.9,
        layers=[{"index": 1, "width": 6, "recovered": 6, "matched": 6, "sign_errors": 0, "log2_weight_error": -35.0},
                {"index": 2, "width": 4, "recovered": 1, "matched": 1, "sign_errors": 1, "log2_weight_error": -3.0}],
        stages=[{"name": "layer", "queries": 600, "seconds": 1.0, "layer": 1},
                {"name": "layer", "queries": 400, "seconds": 0.5, "layer": 2}],
    )
    skipped = base_row(Case("absent", Victim("file", path="x.keras")), 0)
    skipped["status"] = "skipped: ../shared/models/x.keras not found"
    timeout = base_row(Case("slow | pipe", Victim("random", (6, 4, 1))), 0)
    timeout.update(status="timeout", queries=77, progress=["stage layer (layer 2)"])
    return [ok, failed, skipped, timeout]


def test_markdown_and_text_tables(tmp_path: Path) -> None:
    rows = sample_rows()
    md = markdown_table(rows)
    lines = md.splitlines()
    assert lines[0].startswith("| model | params | queries | log2 q |") and "published by" in lines[0]
    assert all(line.count("|") - line.count("\\|") == lines[0].count("|") for line in lines[: 2 + len(rows)])
    assert "L1 6/6 rec, 6 matched, 0 sgn, 2^-35.0; L2 1/4 rec, 1 matched, 1 sgn, 2^-3.0" in md
    assert "failed (1)" in md and "self-check failed: 0.9 relative error" in md
    assert "partial result" in md and "timeout (3)" in md and "after 77 queries" in md
    assert "slow \\| pipe" in md  # a pipe in a cell is escaped
    text = format_table(rows)
    assert text.splitlines()[1].startswith("-----") and "skipped (2)" in text
    out = write_markdown(rows, tmp_path / "t.md", title="relux bench --suite test", command="relux bench")
    assert out.read_text().startswith("## relux bench --suite test\n\n```\nrelux bench\n```")


def test_json_writer(tmp_path: Path) -> None:
    rows = sample_rows()
    rows[1]["max_rel_output_error"] = None
    data = json.loads(write_json(rows, tmp_path / "rows.json").read_text())
    assert isinstance(data, list) and len(data) == 4
    assert all(JSON_KEYS <= set(r) for r in data)
    assert data[0]["model"] == "random 6-4-1" and data[1]["layers"][1]["recovered"] == 1


def test_plots(tmp_path: Path) -> None:
    if not plots_available():
        pytest.skip("matplotlib is not installed")
    paths = write_plots(sample_rows(), tmp_path / "plots")
    assert [p.name for p in paths] == ["queries.png", "errors.png", "stages.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)


# --------------------------------------------------------------------------- CLI
def test_cli_smoke_suite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    js, md = tmp_path / "out.json", tmp_path / "out.md"
    code = run_cli(["-q", "bench", "--suite", "smoke", "--json", str(js), "--markdown", str(md),
                    "--timeout", "120", "--strict"])
    out = capsys.readouterr().out
    assert code == 0
    assert "random 6-4-1" in out and f"wrote {js}" in out
    (row,) = json.loads(js.read_text())
    assert JSON_KEYS <= set(row) and row["status"] == "ok" and row["suite"] == "smoke"
    text = md.read_text()
    assert "relux bench --suite smoke --seed 0 --timeout 120" in text and "| random 6-4-1 | 33 |" in text


def test_cli_plots_without_matplotlib_or_with(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = run_cli(["-q", "bench", "--suite", "smoke", "--timeout", "0", "--plots", str(tmp_path / "p")])
    captured = capsys.readouterr()
    assert code == 0
    if plots_available():
        assert (tmp_path / "p" / "queries.png").is_file()
    else:
        assert "plots skipped: matplotlib is not installed" in captured.err


@pytest.mark.parametrize(
    "argv",
    [
        ["bench", "--suite", "nope"],
        ["bench", "--suite", "smoke", "--only", "no such row"],
        ["bench", "--suite", "smoke", "--timeout", "-1"],
        ["bench", "--suite", "smoke", "--json", "/nonexistent-dir/x.json"],
    ],
)
def test_cli_bad_input_exits_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(argv) == 2
    assert capsys.readouterr().err.startswith("relux: error:")


_ORPHAN_SCRIPT = """
import os, sys, time
from relux.bench import run_isolated

def record_and_sleep(path):
    with open(path, "w") as f:
        f.write(str(os.getpid()))
    time.sleep(120)
    return {}

if __name__ == "__main__":
    run_isolated(record_and_sleep, (sys.argv[1],), timeout=300.0)
"""


def _running(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie (Linux ``/proc``)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_the_worker_ends_with_a_parent_killed_by_a_signal(tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import sys

    script = tmp_path / "parent.py"
    script.write_text(_ORPHAN_SCRIPT)
    pid_file = tmp_path / "worker.pid"
    parent = subprocess.Popen([sys.executable, str(script), str(pid_file)])
    worker = None
    ended = False
    try:
        t0 = time.monotonic()
        while not (pid_file.exists() and pid_file.read_text()) and time.monotonic() - t0 < 60.0:
            assert parent.poll() is None, f"the parent exited with {parent.returncode} before its worker ran"
            time.sleep(0.1)
        worker = int(pid_file.read_text())
        assert _running(worker)
        parent.send_signal(signal.SIGTERM)  # no clean-up runs in the parent
        parent.wait(10.0)
        t0 = time.monotonic()
        # the worker waits on its parent's sentinel (runner._exit_with_parent)
        while _running(worker) and time.monotonic() - t0 < 20.0:
            time.sleep(0.1)
        ended = not _running(worker)
        assert ended
    finally:
        if parent.poll() is None:
            parent.kill()
        if worker is not None and not ended and _running(worker):
            os.kill(worker, signal.SIGKILL)
