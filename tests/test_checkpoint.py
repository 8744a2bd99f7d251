"""Checkpoint and resume: the query journal, the checkpoint directory, and ``relux extract --checkpoint``.

A checkpoint is a journal of the victim's answers: the extraction is deterministic for a fixed seed
given identical answers, so a rerun replays the journal and goes live where it ends. These tests
check the journal format (round trip, torn and corrupt tails, divergence), the directory's identity
checks, and the command line end to end: SIGKILL part-way and resume, Ctrl-C.
"""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relux.attack import ExtractionConfig, extract
from relux.checkpoint import Checkpoint, RunIdentity, read_state, victim_identity
from relux.cli import main
from relux.errors import InputError
from relux.formats import load_model, save_model
from relux.model import MLP
from relux.oracle import CountingOracle, JournalOracle, MLPOracle, NoisyOracle
from relux.oracle.base import FloatArray, Oracle
from relux.oracle.journal import FILE_MAGIC, JournalIndex, read_journal, scan_journal
from relux.oracle.wrappers import OracleWrapper
from relux.verify import verify
from relux.zoo import random_mlp

#: Largest relative output error accepted of an extracted model (the CLI's default self-check
#: tolerance is 1e-8 of max|f|, the issue-4 bound).
MAX_OUTPUT_ERROR = 1e-8


def batches(seed: int, count: int, d: int = 5) -> list[FloatArray]:
    """Query batches of assorted sizes (1 to 7 rows)."""
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(int(rng.integers(1, 8)), d)) for _ in range(count)]


def toy_oracle() -> Oracle:
    return MLPOracle(random_mlp((5, 4, 2), np.random.default_rng(0)))


def model_equal(a: MLP, b: MLP) -> bool:
    return a.arch == b.arch and all(
        np.array_equal(Wa, Wb) and np.array_equal(ba, bb) for (Wa, ba), (Wb, bb) in zip(a.layers, b.layers, strict=True)
    )


# --------------------------------------------------------------------------- the journal
def test_round_trip_replays_bitwise_without_the_victim(tmp_path: Path) -> None:
    path = tmp_path / "journal.bin"
    Xs = batches(0, 6)
    Xs.append(Xs[2].copy())  # a repeated batch: each occurrence keeps its own (noisy) answer
    # Noise makes every answer distinct, so a replay that mixed records up would show.
    noisy = NoisyOracle(toy_oracle(), 0.1, np.random.default_rng(1))
    with JournalOracle(noisy, path) as journal:
        first = [journal.query(X) for X in Xs]
        assert journal.queries_live == sum(len(X) for X in Xs) and journal.queries_replayed == 0
    assert not np.array_equal(first[2], first[-1])

    inner = CountingOracle(toy_oracle())
    with JournalOracle(inner, path) as journal:
        again = [journal.query(X) for X in Xs]
        assert inner.queries == 0
        assert journal.queries_replayed == sum(len(X) for X in Xs) and journal.batches_replayed == len(Xs)
        assert journal.queries_live == 0 and journal.unused_batches == 0
    for a, b in zip(first, again, strict=True):
        assert a.dtype == b.dtype == np.float64 and np.array_equal(a, b)

    index = read_journal(path)
    assert [r.seq for r in index.records] == list(range(len(Xs)))
    assert [r.rows for r in index.records] == [len(X) for X in Xs]
    assert index.dropped_bytes == 0


def test_torn_last_record_is_dropped_and_asked_again(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "journal.bin"
    Xs = batches(1, 3)
    with JournalOracle(toy_oracle(), path) as journal:
        answers = [journal.query(X) for X in Xs]
    size = path.stat().st_size
    with open(path, "r+b") as fh:  # what a SIGKILL in the middle of the last write leaves
        fh.truncate(size - 5)
    assert len(read_journal(path).records) == 2

    inner = CountingOracle(toy_oracle())
    with caplog.at_level(logging.WARNING), JournalOracle(inner, path) as journal:
        again = [journal.query(X) for X in Xs]
        assert journal.batches_replayed == 2 and journal.batches_live == 1
    assert "dropped" in caplog.text
    assert inner.queries == len(Xs[2])
    assert all(np.array_equal(a, b) for a, b in zip(answers, again, strict=True))
    index = read_journal(path)
    assert len(index.records) == 3 and index.dropped_bytes == 0 and index.valid_bytes == size


def test_divergence_goes_live_and_compaction_drops_the_stale_records(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "journal.bin"
    A, B, C, D = batches(2, 4)
    with JournalOracle(toy_oracle(), path) as journal:
        for X in (A, B, C):
            journal.query(X)

    inner = CountingOracle(toy_oracle())
    with caplog.at_level(logging.WARNING), JournalOracle(inner, path) as journal:
        journal.query(A)
        assert inner.queries == 0
        journal.query(D)  # not what the journal's run asked next: live, with a warning
        assert inner.queries == len(D)
        assert "diverged" in caplog.text
        assert journal.unused_batches == 2  # B and C
        assert journal.compact() == 2
        journal.query(B)  # after compaction B is no longer recorded: live again
        assert inner.queries == len(D) + len(B)
    index = read_journal(path)
    assert [r.rows for r in index.records] == [len(A), len(D), len(B)]
    assert [r.seq for r in index.records] == [0, 1, 2]

    inner = CountingOracle(toy_oracle())
    with JournalOracle(inner, path) as journal:  # the compacted journal replays the new run
        for X in (A, D, B):
            journal.query(X)
    assert inner.queries == 0


def test_a_file_that_is_not_a_journal_is_bad_input(tmp_path: Path) -> None:
    path = tmp_path / "journal.bin"
    path.write_bytes(b"PK\x03\x04 something else entirely")
    with pytest.raises(InputError, match="not a relux query journal"):
        JournalOracle(toy_oracle(), path)


@cache
def sample_journal() -> tuple[bytes, JournalIndex]:
    """The bytes of a journal of 12 batches, and its index."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "journal.bin"
        with JournalOracle(toy_oracle(), path) as journal:
            for X in batches(3, 12):
                journal.query(X)
        return path.read_bytes(), read_journal(path)


def scan_bytes(data: bytes) -> JournalIndex:
    return scan_journal(io.BytesIO(data), len(data))


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_any_truncation_yields_the_records_that_fit(data: st.DataObject) -> None:
    full, index = sample_journal()
    cut = data.draw(st.integers(0, len(full)))
    got = scan_bytes(full[:cut])
    expected = tuple(r for r in index.records if r.end <= cut)
    assert got.records == expected
    assert got.valid_bytes == (expected[-1].end if expected else (len(FILE_MAGIC) if cut >= len(FILE_MAGIC) else 0))


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_any_corrupt_byte_yields_a_prefix_or_bad_input(data: st.DataObject) -> None:
    full, index = sample_journal()
    pos = data.draw(st.integers(0, len(full) - 1))
    flip = data.draw(st.integers(1, 255))
    damaged = bytearray(full)
    damaged[pos] ^= flip
    if pos < len(FILE_MAGIC):
        with pytest.raises(InputError):
            scan_bytes(bytes(damaged))
        return
    got = scan_bytes(bytes(damaged))
    # Records before the damaged one survive; the damaged one fails its CRC-32 (or its frame checks).
    assert got.records == tuple(r for r in index.records if r.end <= pos)


# --------------------------------------------------------------------------- resume in process
class Crash(Exception):
    """Stands for the process dying: raised by the victim after a number of calls."""


class CrashingOracle(OracleWrapper):
    def __init__(self, inner: Oracle, calls: int) -> None:
        super().__init__(inner)
        self.calls_left = calls

    def query(self, X: FloatArray) -> FloatArray:
        if self.calls_left == 0:
            raise Crash
        self.calls_left -= 1
        return self.inner.query(X)


def test_extract_resumes_to_the_identical_model(tmp_path: Path) -> None:
    arch = (10, 6, 1)
    victim = random_mlp(arch, np.random.default_rng(4))
    cfg = ExtractionConfig(seed=2)
    reference = extract(MLPOracle(victim), arch, cfg)
    path = tmp_path / "journal.bin"
    calls = 0
    for k in (3, 10):  # two crashes, each further along
        with JournalOracle(CrashingOracle(MLPOracle(victim), k), path) as journal:
            with pytest.raises(Crash):
                extract(journal, arch, cfg)
        calls += k
        assert len(read_journal(path).records) == calls
    inner = CountingOracle(MLPOracle(victim))
    with JournalOracle(inner, path) as journal:
        result = extract(journal, arch, cfg)
        assert journal.batches_replayed == calls and journal.unused_batches == 0
        assert journal.queries_replayed + journal.queries_live == result.queries == reference.queries
    assert inner.queries == journal.queries_live
    assert model_equal(result.model, reference.model)


# --------------------------------------------------------------------------- the checkpoint directory
def identity(model: Path, seed: int = 0, arch: Sequence[int] = (5, 4, 2)) -> RunIdentity:
    return RunIdentity(tuple(arch), ExtractionConfig(seed=seed).to_json(), victim_identity(model=str(model)))


def test_checkpoint_refuses_another_run(tmp_path: Path) -> None:
    model = tmp_path / "victim.npz"
    save_model(random_mlp((5, 4, 2), np.random.default_rng(0)), model)
    ckdir = tmp_path / "ck"
    with Checkpoint.open(ckdir, identity(model)) as ckpt:
        ckpt.wrap(toy_oracle()).query(batches(0, 1)[0])
        ckpt.save("interrupted")
    assert read_state(ckdir)["status"] == "interrupted"

    with pytest.raises(InputError, match=r"seed 0 \(checkpoint\) vs 3 \(now\).*fresh --checkpoint"):
        Checkpoint.open(ckdir, identity(model, seed=3))
    with pytest.raises(InputError, match="architecture 5-4-2"):
        Checkpoint.open(ckdir, identity(model, arch=(5, 3, 2)))
    other = tmp_path / "other.npz"
    save_model(random_mlp((5, 4, 2), np.random.default_rng(1)), other)
    with pytest.raises(InputError, match="sha256"):
        Checkpoint.open(ckdir, identity(other))
    # Parallel execution settings do not change the queries: a resume may use other ones.
    parallel = RunIdentity((5, 4, 2), {**ExtractionConfig().to_json(), "jobs": 2}, victim_identity(model=str(model)))
    assert parallel.differences(read_state(ckdir)) == []
    moved = tmp_path / "moved.npz"
    moved.write_bytes(model.read_bytes())  # same bytes elsewhere: the same victim
    with Checkpoint.open(ckdir, identity(moved)) as ckpt:
        assert ckpt.resumed and ckpt.state["runs"] == 2
        with pytest.raises(InputError, match="in use by another relux process"):
            Checkpoint.open(ckdir, identity(moved))

    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="not empty"):
        Checkpoint.open(tmp_path / "busy", identity(model))
    with pytest.raises(InputError, match="is a file"):
        Checkpoint.open(model, identity(model))
    with pytest.raises(InputError, match="does not exist"):
        Checkpoint.open(tmp_path / "no" / "such", identity(model))


def run_cli(argv: Sequence[str]) -> int:
    try:
        return main(list(argv))
    except SystemExit as exc:
        return int(exc.code) if isinstance(exc.code, int) else 1


def test_cli_rerun_of_a_completed_checkpoint_replays_everything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    save_model(random_mlp((12, 8, 2), np.random.default_rng(5)), tmp_path / "v.npz")
    ckdir = tmp_path / "ck"
    argv = ["-q", "extract", "--model", str(tmp_path / "v.npz"), "--checkpoint", str(ckdir)]
    assert run_cli([*argv, "--out", str(tmp_path / "a.npz"), "--report", str(tmp_path / "a.json")]) == 0
    assert run_cli([*argv, "--out", str(tmp_path / "b.npz"), "--report", str(tmp_path / "b.json")]) == 0
    out = capsys.readouterr().out
    assert "resuming from checkpoint" in out and "queries replayed" in out
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in "ab")
    assert a["queries_replayed"] == 0 and a["queries_live"] == a["queries"] > 0
    assert b["queries_replayed"] == b["queries"] == a["queries"] and b["queries_live"] == 0
    assert a["checkpoint"] == b["checkpoint"] == str(ckdir)
    assert model_equal(load_model(tmp_path / "a.npz"), load_model(tmp_path / "b.npz"))
    state = read_state(ckdir)
    assert state["status"] == "complete" and state["runs"] == 2 and state["journal_queries"] == a["queries"]

    assert run_cli([*argv, "--out", str(tmp_path / "c.npz"), "--seed", "1"]) == 2
    assert "belongs to a different run" in capsys.readouterr().err


# --------------------------------------------------------------------------- through a subprocess
def relux_process(args: Sequence[str], cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "relux", "-q", *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out, err


def wait_for_size(path: Path, size: int, proc: subprocess.Popen[str]) -> None:
    """Poll until ``path`` holds ``size`` bytes; fail if the process ends first."""
    while not (path.exists() and path.stat().st_size >= size):
        if proc.poll() is not None:
            pytest.fail(f"the run ended (status {proc.returncode}) before its journal reached {size} bytes")
        time.sleep(0.001)


def read_report(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text())
    assert isinstance(data, dict)
    return data


def test_sigkill_and_resume(tmp_path: Path) -> None:
    """SIGKILL twice at arbitrary moments (40% and 85% of the journal), then resume: the same model,
    the same total query count, and only the queries after the last kill are asked again."""
    victim = random_mlp((10, 8, 6, 1), np.random.default_rng(0))
    save_model(victim, tmp_path / "victim.npz")
    base = ["extract", "--model", "victim.npz", "--arch", "10-8-6-1"]

    # The uninterrupted run, in process (journaled too, so that its journal size tells where to kill).
    paths = {name: str(tmp_path / name) for name in ("victim.npz", "full.npz", "full.json", "full")}
    assert run_cli(["-q", "extract", "--model", paths["victim.npz"], "--out", paths["full.npz"],
                    "--report", paths["full.json"], "--checkpoint", paths["full"]]) == 0
    full = read_report(tmp_path / "full.json")
    total_bytes = (tmp_path / "full" / "journal.bin").stat().st_size

    ckdir = tmp_path / "ck"
    journal = ckdir / "journal.bin"
    argv = [*base, "--out", "resumed.npz", "--report", "resumed.json", "--checkpoint", "ck"]
    for fraction in (0.4, 0.85):
        proc = relux_process(argv, tmp_path)
        wait_for_size(journal, int(fraction * total_bytes), proc)
        proc.send_signal(signal.SIGKILL)
        assert finish(proc)[0] == -signal.SIGKILL
        assert read_state(ckdir)["status"] == "running"  # it never got to say otherwise
    kept = read_journal(journal)  # a record torn by the kill is not counted here
    assert not (tmp_path / "resumed.npz").exists()

    code, out, err = finish(relux_process(argv, tmp_path))
    assert code == 0, err
    assert "resuming from checkpoint" in out
    resumed = read_report(tmp_path / "resumed.json")
    assert resumed["queries"] == full["queries"]
    assert resumed["queries_replayed"] == kept.queries
    assert resumed["queries_replayed"] + resumed["queries_live"] == resumed["queries"]
    assert resumed["queries_live"] <= 0.3 * full["queries"]
    extracted = load_model(tmp_path / "resumed.npz")
    assert model_equal(extracted, load_model(tmp_path / "full.npz"))  # deterministic given the answers
    report = verify(victim, extracted, rng=np.random.default_rng(0), n_random=2000, n_lines=16)
    assert report.complete and report.max_rel_output_error <= MAX_OUTPUT_ERROR, report
    state = read_state(ckdir)
    assert state["status"] == "complete" and state["runs"] == 3 and state["journal_queries"] == full["queries"]


SLOW_ORACLE = """\
import time
from pathlib import Path

from relux.formats import load_model

MODEL = load_model({model!r})


def predict(X):
    Path({started!r}).touch()
    time.sleep(0.06)
    return MODEL.forward(X)
"""


def slow_oracle(tmp_path: Path) -> list[str]:
    """``--oracle`` arguments of a victim that takes 60 ms per batch (about 40 batches: a window of
    over 2 s for the signal, even on a loaded machine) and touches ``started`` when first asked."""
    save_model(random_mlp((20, 10, 1), np.random.default_rng(0)), tmp_path / "victim.npz")
    code = SLOW_ORACLE.format(model=str(tmp_path / "victim.npz"), started=str(tmp_path / "started"))
    (tmp_path / "slow.py").write_text(code)
    return ["extract", "--oracle", "slow.py:predict", "--arch", "20-10-1", "--out", "out.npz"]


@pytest.mark.skipif(os.name != "posix", reason="SIGINT to a subprocess")
def test_ctrl_c_saves_and_the_rerun_resumes(tmp_path: Path) -> None:
    argv = [*slow_oracle(tmp_path), "--checkpoint", "ck", "--report", "r.json"]
    journal = tmp_path / "ck" / "journal.bin"
    proc = relux_process(argv, tmp_path)
    # Some records in: the extraction is under way.
    wait_for_size(journal, len(FILE_MAGIC) + 4 * 80, proc)
    proc.send_signal(signal.SIGINT)
    code, out, err = finish(proc)
    assert code == 130, err
    assert "interrupted: progress saved to ck; rerun the same command to resume" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert read_state(tmp_path / "ck")["status"] == "interrupted"
    recorded = read_journal(journal).queries
    assert recorded > 0

    code, out, err = finish(relux_process(argv, tmp_path))
    assert code == 0, err
    report = read_report(tmp_path / "r.json")
    assert report["queries_replayed"] == recorded
    assert report["queries_replayed"] + report["queries_live"] == report["queries"]
    assert read_state(tmp_path / "ck")["status"] == "complete"


@pytest.mark.skipif(os.name != "posix", reason="SIGINT to a subprocess")
def test_ctrl_c_without_checkpoint_says_nothing_was_saved(tmp_path: Path) -> None:
    proc = relux_process(slow_oracle(tmp_path), tmp_path)
    wait_for_size(tmp_path / "started", 0, proc)
    proc.send_signal(signal.SIGINT)
    code, out, err = finish(proc)
    assert code == 130, err
    assert "interrupted: nothing was saved; add --checkpoint DIR" in err
    assert "Traceback" not in err
    assert not (tmp_path / "out.npz").exists()
