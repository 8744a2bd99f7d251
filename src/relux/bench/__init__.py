"""Benchmarks of the attack: suites of victims (:mod:`.suites`), a runner with a per-case wall-clock
limit (:mod:`.runner`) and tables, JSON and plots (:mod:`.report`); the CIFAR-scale runs of issue 7 with
one result file per victim (:mod:`.cifar`, victims cached by :mod:`.victims`). ``relux bench`` drives them."""

from relux.bench.cifar import (
    CifarOptions,
    execute_cifar_case,
    result_file_name,
    run_cifar_case,
    write_result,
)
from relux.bench.report import (
    environment,
    format_table,
    markdown_table,
    plots_available,
    to_markdown,
    write_json,
    write_markdown,
    write_plots,
)
from relux.bench.runner import (
    DEFAULT_TIMEOUT,
    ROW_KEYS,
    IsolatedOutcome,
    execute_case,
    run_case,
    run_isolated,
)
from relux.bench.suites import (
    HIDDEN_SUITES,
    SUITE_NAMES,
    Case,
    Published,
    Targets,
    Victim,
    shared_models_dir,
    suite,
)

__all__ = [
    "Case",
    "CifarOptions",
    "DEFAULT_TIMEOUT",
    "HIDDEN_SUITES",
    "IsolatedOutcome",
    "Published",
    "ROW_KEYS",
    "SUITE_NAMES",
    "Targets",
    "Victim",
    "environment",
    "execute_case",
    "execute_cifar_case",
    "format_table",
    "markdown_table",
    "plots_available",
    "result_file_name",
    "run_cifar_case",
    "run_case",
    "run_isolated",
    "shared_models_dir",
    "suite",
    "to_markdown",
    "write_json",
    "write_markdown",
    "write_plots",
    "write_result",
]
