"""Every subcommand answers bad input with a one-line error on stderr, exit status 2 and no traceback.

Most cases run the CLI in-process through :func:`relux.cli.main`; a few run ``python -m relux`` in a
subprocess to check the real exit status and that stderr holds no traceback (and that ``--debug``
shows one). Bad input: missing, corrupt, truncated, empty or unsupported model files, ``.npz`` and
``.pt`` files holding pickles (which must never be unpickled), malformed architectures and numbers,
unreachable URLs, and models whose sizes differ from ``--arch``.
"""

from __future__ import annotations

import importlib.util
import os
import pickle
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from starlette.types import ASGIApp

from relux.cli import main
from relux.errors import InputError
from relux.formats import save_model
from relux.zoo import random_mlp

ROOT = Path(__file__).resolve().parent.parent

LiveServer = Callable[[ASGIApp], str]


class _Evil:
    """Unpickling this creates the file ``marker``: proof that a pickle was loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))


def _closed_port() -> int:
    """A loopback port with nothing listening on it (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def d(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory of good and bad model files (built once for the module)."""
    root = tmp_path_factory.mktemp("bad_input")
    model = random_mlp((10, 7, 3), np.random.default_rng(0))
    for ext in ("npz", "onnx", "safetensors"):
        save_model(model, root / f"good.{ext}")
    for ext in ("npz", "onnx", "safetensors", "keras", "h5", "pt"):
        (root / f"corrupt.{ext}").write_bytes(b"this is not a model file\x00\xff" * 8)
        (root / f"empty.{ext}").write_bytes(b"")
    for ext in ("npz", "onnx", "safetensors"):
        data = (root / f"good.{ext}").read_bytes()
        (root / f"truncated.{ext}").write_bytes(data[: len(data) // 2])
    (root / "model.txt").write_text("10-7-3\n")
    (root / "a_directory.npz").mkdir()
    # Pickles that would create pickle-ran.txt if anything unpickled them.
    evil = np.empty(1, dtype=object)
    evil[0] = _Evil(root / "pickle-ran.txt")
    np.savez(root / "pickled.npz", **{"layers.0.weight": evil, "layers.0.bias": np.zeros(7)})
    (root / "pickled.pt").write_bytes(pickle.dumps(_Evil(root / "pickle-ran.txt")))
    (root / "oracle.py").write_text(
        "import numpy as np\n"
        "W = np.ones((4, 9))\n"
        "def f(X):\n"
        "    return np.maximum(X @ W.T, 0.0)[:, :2]\n"
        "def boom(X):\n"
        "    raise RuntimeError('kaput')\n"
        "NOT_CALLABLE = 3\n"
    )
    (root / "broken.py").write_text("def f(:\n")
    return root


@pytest.fixture(autouse=True)
def _no_pickle_ever_ran(d: Path) -> Iterator[None]:
    yield
    assert not (d / "pickle-ran.txt").exists(), "a pickle was unpickled"


def run_cli(argv: Sequence[str]) -> int:
    try:
        return main(list(argv))
    except SystemExit as exc:  # argparse usage errors
        return int(exc.code) if isinstance(exc.code, int) else 1


def expect_bad_input(argv: Sequence[str], capsys: pytest.CaptureFixture[str], match: str = "") -> str:
    """Run ``relux ARGV`` in-process: exit status 2 and one line on stderr, ``relux: error: ...``."""
    code = run_cli(argv)
    err = capsys.readouterr().err
    assert code == 2, f"exit status {code}, stderr: {err}"
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("relux: error: "), err
    assert match.lower() in lines[0].lower(), f"expected {match!r} in: {lines[0]}"
    return lines[0]


def fill(argv: Sequence[str], d: Path) -> list[str]:
    return [a.format(d=d, port=_closed_port()) for a in argv]


# Each case: (argv with {d} for the files' directory and {port} for a closed port, expected text).
MODEL_FILES = [
    ("{d}/missing.npz", "does not exist"),
    ("{d}/corrupt.npz", "corrupt"),
    ("{d}/empty.npz", "npz"),
    ("{d}/truncated.npz", "npz"),
    ("{d}/corrupt.onnx", "onnx"),
    ("{d}/truncated.onnx", "onnx"),
    ("{d}/empty.onnx", "onnx"),
    ("{d}/corrupt.safetensors", "safetensors"),
    ("{d}/truncated.safetensors", "safetensors"),
    ("{d}/empty.safetensors", "safetensors"),
    ("{d}/corrupt.keras", "keras"),
    ("{d}/corrupt.h5", "keras"),
    ("{d}/empty.h5", "h5"),
    ("{d}/corrupt.pt", "pt"),
    ("{d}/pickled.pt", "pickled.pt"),
    ("{d}/pickled.npz", "pickle"),
    ("{d}/model.txt", "format"),
    ("{d}/a_directory.npz", "a_directory.npz"),
]
MODEL_IDS = [Path(path).name for path, _ in MODEL_FILES]

BAD_ARCHS = ["10-x-3", "10--3", "10", "10-0-3", "-", "ten-seven-three", "10-7-3-", "10x0-3"]


# --------------------------------------------------------------------------- bad model files, everywhere
@pytest.mark.parametrize(("path", "match"), MODEL_FILES, ids=MODEL_IDS)
def test_extract_bad_model_file(d: Path, capsys: pytest.CaptureFixture[str], path: str, match: str) -> None:
    expect_bad_input(fill(["extract", "--model", path, "--out", "{d}/out.npz"], d), capsys, match)
    assert not (d / "out.npz").exists()


@pytest.mark.parametrize(("path", "match"), MODEL_FILES, ids=MODEL_IDS)
def test_verify_bad_model_file(d: Path, capsys: pytest.CaptureFixture[str], path: str, match: str) -> None:
    expect_bad_input(fill(["verify", "--reference", path, "--extracted", "{d}/good.npz"], d), capsys)
    expect_bad_input(fill(["verify", "--reference", "{d}/good.npz", "--extracted", path], d), capsys)


@pytest.mark.parametrize(("path", "match"), MODEL_FILES, ids=MODEL_IDS)
def test_convert_bad_model_file(d: Path, capsys: pytest.CaptureFixture[str], path: str, match: str) -> None:
    expect_bad_input(fill(["convert", path, "{d}/converted.npz"], d), capsys, match)
    assert not (d / "converted.npz").exists()


class _NoServer:
    """Stands in for uvicorn: bad input must be refused before anything is served."""

    def run(self, sockets: Any = None) -> None:
        raise AssertionError("bad input reached the server")


@pytest.fixture
def no_server(monkeypatch: pytest.MonkeyPatch) -> None:
    import relux.serve

    monkeypatch.setattr(relux.serve, "_server", lambda app, access_log: _NoServer())


@pytest.mark.parametrize(("path", "match"), MODEL_FILES, ids=MODEL_IDS)
def test_serve_bad_model_file(
    d: Path, capsys: pytest.CaptureFixture[str], no_server: None, path: str, match: str
) -> None:
    expect_bad_input(fill(["serve", path, "--port", "0"], d), capsys, match)


# --------------------------------------------------------------------------- extract
@pytest.mark.parametrize(
    ("argv", "match"),
    [
        # malformed or mismatched architectures
        *[(["--model", "{d}/good.npz", "--arch", arch], "architecture") for arch in BAD_ARCHS],
        (["--oracle", "{d}/oracle.py:f", "--arch", "10-x-3"], "architecture"),
        (["--url", "http://127.0.0.1:{port}/v2/models/m", "--arch", "10--3"], "architecture"),
        (["--model", "{d}/good.npz", "--arch", "11-7-3"], "does not match"),  # input size differs
        (["--model", "{d}/good.onnx", "--arch", "11-7-3"], "does not match"),
        (["--model", "{d}/good.safetensors", "--arch", "10-7-2"], "does not match"),
        (["--model", "{d}/good.npz", "--arch", "10-8-3"], "does not match"),
        (["--oracle", "{d}/oracle.py:f", "--arch", "11-4-2"], "11 inputs"),  # input size differs
        (["--oracle", "{d}/oracle.py:f", "--arch", "9-4-3"], "expected (8, 3)"),  # output size differs
        (["--oracle", "{d}/oracle.py:boom", "--arch", "9-4-2"], "kaput"),
        # unreachable or malformed URLs
        (["--url", "http://127.0.0.1:{port}/v2/models/m", "--arch", "10-7-3"], "connection refused"),
        (["--url", "http://127.0.0.1:{port}/v1/models/m", "--arch", "10-7-3"], "connection refused"),
        (["--url", "http://127.0.0.1:{port}/models/m", "--arch", "10-7-3"], "protocol"),
        (["--url", "ftp://127.0.0.1:{port}/v2/models/m", "--arch", "10-7-3"], "URL"),
        (["--url", "http://127.0.0.1:99999/v2/models/m", "--arch", "10-7-3"], "port"),
        (["--url", "http://127.0.0.1:{port}/v2/models/m"], "--arch"),
        # bad oracle callables
        (["--oracle", "{d}/oracle.py:f"], "--arch"),
        (["--oracle", "{d}/missing.py:f", "--arch", "9-4-2"], "does not exist"),
        (["--oracle", "{d}/oracle.py", "--arch", "9-4-2"], "FILE.py:NAME"),
        (["--oracle", "{d}/oracle.py:nothere", "--arch", "9-4-2"], "no callable"),
        (["--oracle", "{d}/oracle.py:NOT_CALLABLE", "--arch", "9-4-2"], "no callable"),
        (["--oracle", "{d}/broken.py:f", "--arch", "9-4-2"], "SyntaxError"),
        (["--oracle", "no_such_module_anywhere:f", "--arch", "9-4-2"], "cannot import"),
        # sources
        (["--arch", "10-7-3"], "one of the arguments"),
        (["--model", "{d}/good.npz", "--oracle", "{d}/oracle.py:f"], "not allowed with"),
        # numbers
        (["--model", "{d}/good.npz", "--seed", "-1"], "--seed"),
        (["--model", "{d}/good.npz", "--budget", "lots"], "--budget"),
        (["--model", "{d}/good.npz", "--input-scale", "0"], "--input-scale"),
        (["--model", "{d}/good.npz", "--input-scale", "inf"], "--input-scale"),
        (["--model", "{d}/good.npz", "--selfcheck-tol", "nan"], "--selfcheck-tol"),
        (["--model", "{d}/good.npz", "--selfcheck-tol", "2"], "selfcheck_tol"),
        (["--model", "{d}/good.npz", "--oracle-timeout", "0"], "--oracle-timeout"),
        (["--model", "{d}/good.npz", "--oracle-timeout", "-5"], "--oracle-timeout"),
        (["--model", "{d}/good.npz", "--oracle-timeout", "soon"], "--oracle-timeout"),
    ],
)
def test_extract_bad_arguments(d: Path, capsys: pytest.CaptureFixture[str], argv: list[str], match: str) -> None:
    out = d / "extract-out.npz"
    expect_bad_input(fill(["extract", *argv, "--out", str(out)], d), capsys, match)
    assert not out.exists()


@pytest.mark.parametrize(
    ("out", "match"),
    [("out.txt", "format"), ("out.keras", "does not write"), ("nodir/out.npz", "does not exist"), ("", "directory")],
)
def test_extract_bad_out(d: Path, capsys: pytest.CaptureFixture[str], out: str, match: str) -> None:
    report = d / "never.json"
    argv = ["extract", "--model", f"{d}/good.npz", "--out", str(d / out), "--report", str(report)]
    expect_bad_input(argv, capsys, match)
    assert not report.exists()


def test_extract_bad_report_path(d: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["extract", "--model", f"{d}/good.npz", "--out", f"{d}/o.npz", "--report", f"{d}/nodir/r.json"]
    expect_bad_input(argv, capsys, "does not exist")


def test_extract_url_serving_other_sizes(
    live_server: LiveServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A served model whose input size differs from --arch: exit 2 before any query."""
    from relux.serve import create_app

    app = create_app(random_mlp((10, 7, 3), np.random.default_rng(0)), name="m")
    url = live_server(app) + "/v2/models/m"
    argv = ["extract", "--url", url, "--arch", "11-7-3", "--out", str(tmp_path / "o.npz")]
    expect_bad_input(argv, capsys, "11 inputs")
    argv = ["extract", "--url", url[: -len("/m")] + "/other", "--arch", "10-7-3", "--out", str(tmp_path / "o.npz")]
    expect_bad_input(argv, capsys, "404")
    assert app.state.stats.rows_served == 0


# --------------------------------------------------------------------------- verify
@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--reference", "{d}/good.npz"], "--extracted"),
        (["--reference", "{d}/good.npz", "--extracted", "{d}/good.onnx", "--samples", "-3"], "--samples"),
        (["--reference", "{d}/good.npz", "--extracted", "{d}/good.onnx", "--lines", "x"], "--lines"),
        (["--reference", "{d}/good.npz", "--extracted", "{d}/good.onnx", "--match-threshold", "0"], "threshold"),
        (["--reference", "{d}/good.npz", "--extracted", "{d}/good.onnx", "--samples", "0", "--lines", "0"], "0"),
        (["--reference", "{d}/good.npz", "--extracted", "{d}/other.npz"], "11 inputs"),
        (["--reference", "{d}/good.npz", "--extracted", "{d}/deep.npz"], "hidden layers"),
    ],
)
def test_verify_bad_arguments(d: Path, capsys: pytest.CaptureFixture[str], argv: list[str], match: str) -> None:
    save_model(random_mlp((11, 7, 3), np.random.default_rng(1)), d / "other.npz")
    save_model(random_mlp((10, 5, 4, 3), np.random.default_rng(1)), d / "deep.npz")
    expect_bad_input(fill(["verify", *argv], d), capsys, match)


def test_verify_negative_seed(d: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["verify", "--reference", f"{d}/good.npz", "--extracted", f"{d}/good.npz", "--seed", "-1"]
    try:
        expect_bad_input(argv, capsys, "--seed")
    except ValueError as exc:  # the traceback a user would see
        raise AssertionError(f"uncaught {exc!r}") from exc


# --------------------------------------------------------------------------- convert
@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["{d}/good.npz", "{d}/out.txt"], "format"),
        (["{d}/good.npz", "{d}/out.keras"], "does not write"),
        (["{d}/good.npz", "{d}/nodir/out.npz"], "does not exist"),
        (["{d}/good.npz", "{d}/good.onnx"], "--force"),
        (["{d}/good.npz"], "OUT"),
    ],
)
def test_convert_bad_arguments(d: Path, capsys: pytest.CaptureFixture[str], argv: list[str], match: str) -> None:
    expect_bad_input(fill(["convert", *argv], d), capsys, match)


# --------------------------------------------------------------------------- serve
@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--port", "70000"], "--port"),
        (["--port", "-1"], "--port"),
        (["--port", "x"], "--port"),
        (["--max-queries", "-1"], "--max-queries"),
        (["--max-body-mb", "0"], "--max-body-mb"),
        (["--max-body-mb", "nan"], "--max-body-mb"),
        (["--name", "a/b"], "name"),
        (["--name", ""], "name"),
        (["--token", "two words"], "token"),
    ],
)
def test_serve_bad_arguments(
    d: Path, capsys: pytest.CaptureFixture[str], no_server: None, argv: list[str], match: str
) -> None:
    expect_bad_input(["serve", f"{d}/good.npz", *argv], capsys, match)


def test_serve_port_in_use(d: Path, capsys: pytest.CaptureFixture[str], no_server: None) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        expect_bad_input(["serve", f"{d}/good.npz", "--port", str(port)], capsys, "cannot listen")


# --------------------------------------------------------------------------- zoo
@pytest.mark.parametrize(
    ("argv", "match"),
    [
        *[([arch, "--init", "random"], "architecture") for arch in BAD_ARCHS],
        (["10-7-3", "--init", "bogus"], "--init"),
        (["10-7-3"], "--init"),
        (["10-7-3", "--init", "random", "--seed", "-1"], "seed"),
        (["10-7-3", "--init", "random", "--seed", "x"], "--seed"),
        (["10-7-3", "--init", "trained", "--epochs", "0"], "--epochs"),
        (["10-7-3", "--init", "trained"], "dataset"),
        (["10-7-3", "--init", "random", "--data", "nope"], "--data"),
    ],
)
def test_zoo_bad_arguments(d: Path, capsys: pytest.CaptureFixture[str], argv: list[str], match: str) -> None:
    expect_bad_input(["zoo", *argv, "--out", str(d / "zoo.npz")], capsys, match)
    assert not (d / "zoo.npz").exists()


def test_zoo_arch_differs_from_data(d: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["zoo", "784-7-3", "--init", "trained", "--data", "digits", "--epochs", "1", "--out", str(d / "z.npz")]
    expect_bad_input(argv, capsys, "64")


@pytest.mark.parametrize(
    ("out", "match"), [("zoo.txt", "format"), ("zoo.keras", "does not write"), ("nodir/z.npz", "does not exist")]
)
def test_zoo_bad_out(d: Path, capsys: pytest.CaptureFixture[str], out: str, match: str) -> None:
    expect_bad_input(["zoo", "10-7-3", "--init", "random", "--out", str(d / out)], capsys, match)


def test_zoo_out_is_a_directory(d: Path, capsys: pytest.CaptureFixture[str]) -> None:
    expect_bad_input(["zoo", "10-7-3", "--init", "random", "--out", str(d)], capsys, "directory")


# --------------------------------------------------------------------------- demo, bench, top level
@pytest.mark.parametrize(
    ("argv", "match"),
    [
        *[(["--arch", arch], "architecture") for arch in BAD_ARCHS],
        (["--seed", "-1"], "--seed"),
        (["--seed", "x"], "--seed"),
    ],
)
def test_demo_bad_arguments(capsys: pytest.CaptureFixture[str], argv: list[str], match: str) -> None:
    expect_bad_input(["demo", *argv], capsys, match)


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--no-such-option"], "--no-such-option"),
        (["--suite", "nosuch"], "--suite"),
        (["--seed", "-1"], "--seed"),
        (["--timeout", "-1"], "--timeout"),
        (["--timeout", "nan"], "--timeout"),
        (["--json", "{d}/nodir/rows.json"], "does not exist"),
        (["--markdown", "{d}"], "directory"),
        (["--plots", "{d}/good.npz"], "--plots"),
        (["--shared-models", "{d}/good.npz"], "--shared-models"),
        (["--only", "no row has this name"], "--only"),
    ],
)
def test_bench_bad_arguments(d: Path, capsys: pytest.CaptureFixture[str], argv: list[str], match: str) -> None:
    if importlib.util.find_spec("relux.cli.bench") is None:
        pytest.skip("relux bench is not built yet")
    expect_bad_input(fill(["bench", *argv], d), capsys, match)


@pytest.mark.parametrize(("argv", "match"), [([], "COMMAND"), (["nosuch"], "nosuch"), (["extract"], "--out")])
def test_top_level_bad_arguments(capsys: pytest.CaptureFixture[str], argv: list[str], match: str) -> None:
    expect_bad_input(argv, capsys, match)


# --------------------------------------------------------------------------- --debug
def test_debug_raises_instead_of_one_line(d: Path) -> None:
    with pytest.raises(InputError, match="pickle"):
        main(["--debug", "extract", "--model", f"{d}/pickled.npz", "--out", f"{d}/o.npz"])


# --------------------------------------------------------------------------- real processes
def run_relux(*argv: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [sys.executable, "-m", "relux", *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=env,
        check=False,
    )


def test_process_pickled_npz_and_closed_port(d: Path) -> None:
    proc = run_relux("extract", "--model", f"{d}/pickled.npz", "--out", f"{d}/o.npz")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("relux: error: ") and len(proc.stderr.strip().splitlines()) == 1
    assert "pickle" in proc.stderr
    url = f"http://127.0.0.1:{_closed_port()}/v2/models/m"
    proc = run_relux("extract", "--url", url, "--arch", "10-7-3", "--out", f"{d}/o.npz", timeout=20.0)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "connection refused" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_process_debug_shows_the_traceback(d: Path) -> None:
    proc = run_relux("--debug", "convert", f"{d}/corrupt.onnx", f"{d}/o.npz")
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "InputError" in proc.stderr


def test_process_demo_without_hidden_layer() -> None:
    proc = run_relux("demo", "--arch", "10-3")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
