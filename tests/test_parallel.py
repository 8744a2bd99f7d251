"""Parallel and distributed execution (relux.parallel): executors, and extraction results that do not
depend on the backend or the number of workers.

Task functions here are builtins (``abs``, ``operator.neg``, ``math.sqrt``) so that worker processes can
import them; the test module itself is not importable from a worker.

Every comparison of extraction results is exact (bit for bit): the oracle stays in the parent, every
random draw is made there in row order, and tasks run with one BLAS thread wherever they run, so
nothing may differ, not even in the last bit.
"""

from __future__ import annotations

import importlib.util
import json
import math
import operator
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from relux.attack import ExtractionConfig, ExtractionResult, extract
from relux.attack.first_layer import discover_first_layer, refine_first_layer
from relux.cli import main
from relux.errors import InputError
from relux.formats import save_model
from relux.oracle import CountingOracle, MLPOracle
from relux.parallel import (
    BaseExecutor,
    JoblibExecutor,
    SerialExecutor,
    make_executor,
    map_rows,
    split_evenly,
)
from relux.zoo import random_mlp

needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="ray not installed")

ARCH = (20, 10, 1)


# --------------------------------------------------------------------------- helpers
def run_cli(argv: Sequence[str]) -> int:
    try:
        return main(list(argv))
    except SystemExit as exc:
        return int(exc.code) if isinstance(exc.code, int) else 1


def assert_same_result(a: ExtractionResult, b: ExtractionResult) -> None:
    """Bit-identical models, and the same queries in total and per stage."""
    assert a.model.arch == b.model.arch
    for (Wa, ba), (Wb, bb) in zip(a.model.layers, b.model.layers, strict=True):
        assert Wa.tobytes() == Wb.tobytes()
        assert ba.tobytes() == bb.tobytes()
    assert a.queries == b.queries
    assert [(s.name, s.layer, s.queries) for s in a.stages] == [(s.name, s.layer, s.queries) for s in b.stages]
    assert a.selfcheck.max_abs_error == b.selfcheck.max_abs_error


class ManyChunks(SerialExecutor):
    """Serial, but claims many workers: refinement then cuts its work into many small tasks."""

    @property
    def jobs(self) -> int:
        return 7


# --------------------------------------------------------------------------- executors
@pytest.fixture(params=["serial", "loky"])
def executor(request: pytest.FixtureRequest) -> Iterator[BaseExecutor]:
    ex: BaseExecutor = SerialExecutor() if request.param == "serial" else JoblibExecutor(2)
    with ex:
        yield ex


def test_map_preserves_order(executor: BaseExecutor) -> None:
    items = list(range(-40, 60, 3))
    assert executor.map(operator.neg, items) == [-x for x in items]
    assert executor.map(abs, iter(items)) == [abs(x) for x in items]  # any iterable
    assert executor.map(abs, []) == []


def test_task_exception_propagates(executor: BaseExecutor) -> None:
    with pytest.raises(ValueError, match="math domain error"):
        executor.map(math.sqrt, [4.0, -1.0, 9.0])
    assert executor.map(math.sqrt, [4.0, 9.0]) == [2.0, 3.0]  # still usable afterwards


def test_parallel_seconds_accumulate(executor: BaseExecutor) -> None:
    assert executor.parallel_seconds == 0.0
    executor.map(abs, [-1, 2])
    first = executor.parallel_seconds
    assert first > 0.0
    executor.map(abs, [-3])
    assert executor.parallel_seconds > first
    assert SerialExecutor().parallel_seconds == 0.0  # per instance, not global


def test_make_executor() -> None:
    with make_executor("loky", 1) as ex:
        assert isinstance(ex, SerialExecutor) and ex.backend == "serial"  # no pool for one job
    with make_executor("loky", 2) as ex:
        assert isinstance(ex, JoblibExecutor) and (ex.backend, ex.jobs) == ("loky", 2)
    with make_executor("serial", 1) as ex:
        assert isinstance(ex, SerialExecutor)


@pytest.mark.parametrize(
    ("backend", "jobs", "address", "match"),
    [
        ("dask", 2, None, "backend"),
        ("loky", 0, None, "jobs"),
        ("loky", -3, None, "jobs"),
        ("loky", True, None, "jobs"),
        ("loky", 2, "127.0.0.1:6379", "ray backend"),
    ],
)
def test_make_executor_rejects(backend: str, jobs: Any, address: str | None, match: str) -> None:
    with pytest.raises(InputError, match=match):
        make_executor(backend, jobs, address)


@pytest.mark.parametrize(("n", "parts"), [(0, 3), (1, 4), (5, 1), (10, 4), (10, 10), (7, 20), (128, 6)])
def test_split_evenly(n: int, parts: int) -> None:
    chunks = split_evenly(n, parts)
    assert [i for c in chunks for i in c] == list(range(n))  # consecutive, complete, in order
    assert all(len(c) > 0 for c in chunks) and len(chunks) <= max(parts, 1)
    if chunks:
        assert max(map(len, chunks)) - min(map(len, chunks)) <= 1



def _scaled_rows(item: tuple[float, np.ndarray]) -> list[float]:
    scale, rows = item
    return [float(scale * r.sum()) for r in rows]


def test_map_rows_joins_the_blocks_in_row_order() -> None:
    rows = np.arange(21.0).reshape(7, 3)
    alone = map_rows(None, _scaled_rows, rows, 2.0)
    assert alone == [2.0 * float(r.sum()) for r in rows]
    with make_executor("loky", 2) as ex:
        assert map_rows(ex, _scaled_rows, rows, 2.0) == alone
        assert map_rows(ex, _scaled_rows, rows[:0], 2.0) == []  # no rows: one empty call here

@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"jobs": 0}, "jobs"),
        ({"jobs": 1.5}, "jobs"),
        ({"backend": "dask"}, "backend"),
        ({"ray_address": "127.0.0.1:6379"}, "ray_address"),  # an address needs backend="ray"
        ({"backend": "ray", "ray_address": " "}, "ray_address"),
    ],
)
def test_config_rejects(changes: dict[str, Any], field: str) -> None:
    with pytest.raises(InputError, match=f"ExtractionConfig.{field}"):
        ExtractionConfig(**changes)


# --------------------------------------------------------------------------- refinement, in process
def test_refinement_does_not_depend_on_the_split() -> None:
    """The per-row work cut into 1 task or into 14 gives the same bits (and the same generator state)."""
    victim = random_mlp((16, 12, 2), np.random.default_rng(3))
    oracle = MLPOracle(victim)
    cfg = ExtractionConfig(seed=3)
    sigs, _ = discover_first_layer(oracle.query, 16, 12, cfg, np.random.default_rng(3), 1e-9)
    W = np.stack([s.w for s in sigs])
    b = np.array([s.b for s in sigs])
    starts = np.stack([s.point for s in sigs])
    outs = []
    for ex in (None, SerialExecutor(), ManyChunks()):
        rng = np.random.default_rng(11)
        rows, X, F = refine_first_layer(oracle.query, W, b, starts, cfg, rng, executor=ex)
        part, _, _ = refine_first_layer(oracle.query, W, b, starts, cfg, rng, only=[1, 5, 6], executor=ex)
        outs.append(([(r.w, r.b, r.point, r.jump, r.clearance, r.ok) for r in rows + part], X, F, rng.random()))
    ref = outs[0]
    for other in outs[1:]:
        assert other[1].tobytes() == ref[1].tobytes() and other[2].tobytes() == ref[2].tobytes()
        assert other[3] == ref[3]  # the run's generator advanced by exactly as much
        for ra, rb in zip(ref[0], other[0], strict=True):
            assert ra[0].tobytes() == rb[0].tobytes() and ra[2].tobytes() == rb[2].tobytes()
            assert ra[3].tobytes() == rb[3].tobytes() and ra[1:2] + ra[4:] == rb[1:2] + rb[4:]


def test_result_records_execution() -> None:
    victim = random_mlp((8, 5, 1), np.random.default_rng(0))
    result = extract(MLPOracle(victim), victim.arch, ExtractionConfig(seed=0))
    ex = result.to_json()["execution"]
    assert (ex["jobs"], ex["backend"]) == (1, "serial")
    names = [(s["name"], s["layer"]) for s in ex["stages"]]
    assert names == [(s.name, s.layer) for s in result.stages]
    refinement = next(s for s in ex["stages"] if s["name"] == "refinement")
    assert refinement["parallel_seconds"] > 0.0
    assert math.isclose(ex["parallel_seconds"], sum(s["parallel_seconds"] for s in ex["stages"]), abs_tol=1e-3)
    json.dumps(result.to_json())  # plain JSON


# --------------------------------------------------------------------------- command line
@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--jobs", "0"], "--jobs: expected a positive integer"),
        (["--jobs", "two"], "--jobs: expected a positive integer"),
        (["--backend", "dask"], "--backend: invalid choice"),
        (["--address", "127.0.0.1:6379"], "needs --backend ray"),
    ],
)
def test_cli_bad_parallel_options(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    model = tmp_path / "victim.npz"
    save_model(random_mlp((6, 4, 1), np.random.default_rng(0)), model)
    code = run_cli(["extract", "--model", str(model), "--out", str(tmp_path / "out.npz"), *extra])
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out.npz").exists()


def test_cli_ray_not_installed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    model = tmp_path / "victim.npz"
    save_model(random_mlp((6, 4, 1), np.random.default_rng(0)), model)
    code = run_cli(["extract", "--model", str(model), "--out", str(tmp_path / "out.npz"), "--backend", "ray"])
    assert code == 2
    err = capsys.readouterr().err
    assert "ray package, which is not installed" in err and "pip install" in err


# --------------------------------------------------------------------------- slow: real workers
@pytest.mark.slow
def test_extraction_same_with_two_loky_workers(tmp_path: Path) -> None:
    victim = random_mlp(ARCH, np.random.default_rng(20))
    one = extract(CountingOracle(MLPOracle(victim)), ARCH, ExtractionConfig(seed=5))
    two = extract(CountingOracle(MLPOracle(victim)), ARCH, ExtractionConfig(seed=5, jobs=2))
    assert one.selfcheck.passed and two.selfcheck.passed
    assert_same_result(one, two)
    assert (two.execution["jobs"], two.execution["backend"]) == (2, "loky")
    assert next(s for s in two.execution["stages"] if s["name"] == "refinement")["parallel_seconds"] > 0.0

    # The command line: --jobs 2 gives the same file and records jobs and backend in the report.
    model = tmp_path / "victim.npz"
    save_model(victim, model)
    for jobs in ("1", "2"):
        argv = ["-q", "extract", "--model", str(model), "--out", str(tmp_path / f"out{jobs}.npz"),
                "--report", str(tmp_path / f"run{jobs}.json"), "--seed", "5", "--jobs", jobs]
        assert run_cli(argv) == 0
    a, b = np.load(tmp_path / "out1.npz"), np.load(tmp_path / "out2.npz")
    assert all(a[k].tobytes() == b[k].tobytes() for k in a.files)
    report = json.loads((tmp_path / "run2.json").read_text())
    assert report["execution"]["jobs"] == 2 and report["execution"]["backend"] == "loky"
    assert report["config"]["jobs"] == 2 and report["config"]["backend"] == "loky"


@pytest.fixture
def no_ray_left() -> Iterator[None]:
    """Whatever happens in the test, no Ray instance is left running afterwards."""
    yield
    import ray

    if ray.is_initialized():
        ray.shutdown()
        pytest.fail("the test left a Ray instance running")


@pytest.mark.slow
@needs_ray
def test_ray_executor_local_instance(no_ray_left: None) -> None:
    import os

    from relux.parallel import RayExecutor

    with RayExecutor(2) as ex:
        import ray

        assert ray.is_initialized()
        assert os.environ.get("RAY_USAGE_STATS_ENABLED") == "0"
        assert {n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]} == {"127.0.0.1"}
        items = list(range(-15, 25, 2))
        assert ex.map(operator.neg, items) == [-x for x in items]
        with pytest.raises(ValueError, match="math domain error"):
            ex.map(math.sqrt, [1.0, -1.0])
        assert ex.parallel_seconds > 0.0
    assert not ray.is_initialized()  # shut down: this executor started it


@pytest.mark.slow
@needs_ray
def test_extraction_same_on_local_ray(no_ray_left: None) -> None:
    import ray

    victim = random_mlp(ARCH, np.random.default_rng(20))
    serial = extract(MLPOracle(victim), ARCH, ExtractionConfig(seed=5))
    on_ray = extract(MLPOracle(victim), ARCH, ExtractionConfig(seed=5, jobs=2, backend="ray"))
    assert not ray.is_initialized()  # extract started a local instance and shut it down
    assert_same_result(serial, on_ray)
    assert (on_ray.execution["jobs"], on_ray.execution["backend"]) == (2, "ray")


@pytest.mark.slow
def test_deep_extraction_same_with_two_loky_workers() -> None:
    """A deep network's first-layer refinement and its witness measurements (layer 2) run on the
    workers too, with the same result."""
    arch = (10, 8, 6, 1)
    victim = random_mlp(arch, np.random.default_rng(0))
    one = extract(MLPOracle(victim), arch, ExtractionConfig(seed=0))
    two = extract(MLPOracle(victim), arch, ExtractionConfig(seed=0, jobs=2))
    assert one.selfcheck.passed and two.selfcheck.passed
    assert_same_result(one, two)
    for i in (1, 2):
        stage = next(s for s in two.execution["stages"] if s["name"] == "layer" and s["layer"] == i)
        assert stage["parallel_seconds"] > 0.0


@pytest.mark.slow
def test_bench_row_records_jobs_and_backend() -> None:
    """``relux bench --jobs 2``: the attack runs with two workers and the row says so."""
    from relux.bench.runner import execute_case
    from relux.bench.suites import suite

    row = execute_case(suite("smoke")[0], 0, parallel={"jobs": 2, "backend": "loky", "ray_address": None})
    assert row["status"] == "ok"
    assert (row["execution"]["jobs"], row["execution"]["backend"]) == (2, "loky")
