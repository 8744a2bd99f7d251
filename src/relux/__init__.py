"""relux: cryptanalytic extraction of ReLU networks from black-box query access.

Quick use::

    import relux
    victim = relux.load_model("model.keras")           # only to build an oracle
    oracle = relux.MLPOracle(victim)                     # the attack sees only this
    result = relux.extract(oracle, victim.arch)
    report = relux.verify(victim, result.model)
"""

from relux.errors import BudgetExhausted, ExtractionFailed, InputError, OracleError, ReluxError
from relux.model import MLP, format_arch, parse_arch
from relux.oracle import (
    BudgetOracle,
    CachingOracle,
    CallableOracle,
    CountingOracle,
    MLPOracle,
    Oracle,
    OutputKind,
)

__version__ = "0.1.0"

__all__ = [
    "MLP",
    "parse_arch",
    "format_arch",
    "Oracle",
    "OutputKind",
    "MLPOracle",
    "CallableOracle",
    "CountingOracle",
    "BudgetOracle",
    "CachingOracle",
    "ReluxError",
    "InputError",
    "OracleError",
    "BudgetExhausted",
    "ExtractionFailed",
    "__version__",
]


def __getattr__(name: str) -> object:
    # Heavier entry points import lazily so that `import relux` stays cheap.
    if name in ("load_model", "save_model"):
        from relux import formats

        return getattr(formats, name)
    if name == "verify":
        from relux.verify import verify

        return verify
    if name in ("extract", "ExtractionConfig", "ExtractionResult"):
        from relux import attack

        return getattr(attack, name)
    raise AttributeError(f"module 'relux' has no attribute {name!r}")
