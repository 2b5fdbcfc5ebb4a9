"""shoal: train PyTorch models across many processes and machines.

import shoal
shoal.init()
strategy = shoal.DataParallel()
model, optimizer = strategy.prepare(model, optimizer)
recovery = shoal.Recovery(strategy, model, optimizer, loader=loader)   # survive restarts

The names below are imported on first use (PEP 562), so that processes that
need none of them (control-plane members, the launcher's helpers) start
without importing torch: `import shoal.control.member` costs milliseconds,
not the seconds torch takes.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from shoal.errors import ConfigError, ShoalError

if TYPE_CHECKING:
    from shoal.runtime import current, init, shutdown
    from shoal.strategies.base import Strategy
    from shoal.strategies.data_parallel import DataParallel
    from shoal.strategies.parameter_server import ParameterServer
    from shoal.strategies.pipeline import Pipeline
    from shoal.strategies.sharded import ShardedDataParallel
    from shoal.strategies.tensor_parallel import TensorParallel
    from shoal.train.recovery import Recovery

__version__ = "0.1.0"

_LAZY = {
    "current": "shoal.runtime",
    "init": "shoal.runtime",
    "shutdown": "shoal.runtime",
    "Strategy": "shoal.strategies.base",
    "DataParallel": "shoal.strategies.data_parallel",
    "ParameterServer": "shoal.strategies.parameter_server",
    "Pipeline": "shoal.strategies.pipeline",
    "ShardedDataParallel": "shoal.strategies.sharded",
    "TensorParallel": "shoal.strategies.tensor_parallel",
    "Recovery": "shoal.train.recovery",
}

__all__ = [
    "ConfigError",
    "DataParallel",
    "ParameterServer",
    "Pipeline",
    "Recovery",
    "ShardedDataParallel",
    "ShoalError",
    "Strategy",
    "TensorParallel",
    "current",
    "init",
    "shutdown",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'shoal' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
