"""``relux serve``: argument checks in-process, and one end-to-end run on a real victim file."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from relux.cli import main
from relux.oracle.http import oracle_from_url
from relux.oracle.retry import RetryPolicy

MODELS = Path(__file__).resolve().parents[2] / "shared" / "models"
MODEL = MODELS / "random-cjm20-style" / "10_5x2_1_Carlini.keras"


@pytest.mark.parametrize(
    "argv",
    [
        ["--port", "70000"],
        ["--max-queries", "-1"],
        ["--max-body-mb", "0"],
        ["--name", "a/b"],
    ],
)
def test_bad_arguments_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    if argv[0] == "--name":
        if not MODEL.is_file():
            pytest.skip("shared models not found")
        model = str(MODEL)
    else:
        model = str(tmp_path / "unused.keras")
    assert main(["serve", model, *argv]) == 2
    assert "relux: error:" in capsys.readouterr().err


def test_missing_model_file_exits_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["serve", str(tmp_path / "nope.keras")]) == 2
    assert "nope.keras" in capsys.readouterr().err


@pytest.mark.skipif(not MODEL.is_file(), reason=f"shared model not found at {MODEL}")
def test_serve_a_model_file_end_to_end() -> None:
    from relux.formats import load_model

    cmd = [sys.executable, "-m", "relux", "serve", str(MODEL), "--port", "0", "--name", "carlini"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline() for _ in range(3)]
        pattern = re.compile(r"http://127\.0\.0\.1:\d+/v[12]/models/carlini")
        urls = [m.group(0) for line in lines if (m := pattern.search(line))]
        assert len(urls) == 2, lines
        victim = load_model(MODEL)
        X = np.random.default_rng(0).normal(size=(7, victim.input_dim))
        for url in urls:
            oracle = oracle_from_url(url, retry=RetryPolicy(total_timeout=10.0))
            # Exact: one request of 7 rows, computed by MLP.forward on the same 7 rows.
            assert oracle.query(X).tobytes() == victim.forward(X).tobytes()
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert "answering 14 rows" in err and "after answering 14 rows" in out
