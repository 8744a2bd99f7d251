"""Benchmarks of the attack: suites of victims (:mod:`.suites`), a runner with a per-case wall-clock
limit (:mod:`.runner`) and tables, JSON and plots (:mod:`.report`). ``relux bench`` drives them."""

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
    "format_table",
    "markdown_table",
    "plots_available",
    "run_case",
    "run_isolated",
    "shared_models_dir",
    "suite",
    "to_markdown",
    "write_json",
    "write_markdown",
    "write_plots",
]
