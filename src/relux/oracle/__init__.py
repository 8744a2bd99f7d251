"""Oracles: black-box query access, local and remote, and composable wrappers."""

from relux.oracle.base import Oracle, OutputKind, as_query_batch, check_answer
from relux.oracle.http import KServeV2Oracle, TFServingOracle, oracle_from_url
from relux.oracle.journal import JournalOracle
from relux.oracle.local import CallableOracle, MLPOracle, load_callable
from relux.oracle.retry import RetryPolicy
from relux.oracle.wrappers import (
    BudgetOracle,
    CachingOracle,
    CountingOracle,
    Float32Oracle,
    NoisyOracle,
    OracleWrapper,
    RoundingOracle,
    unwrap,
)

__all__ = [
    "Oracle",
    "OutputKind",
    "as_query_batch",
    "check_answer",
    "CallableOracle",
    "MLPOracle",
    "load_callable",
    "KServeV2Oracle",
    "TFServingOracle",
    "oracle_from_url",
    "JournalOracle",
    "RetryPolicy",
    "BudgetOracle",
    "CachingOracle",
    "CountingOracle",
    "Float32Oracle",
    "NoisyOracle",
    "OracleWrapper",
    "RoundingOracle",
    "unwrap",
]
