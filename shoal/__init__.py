"""shoal: train PyTorch models across many processes and machines.

import shoal
shoal.init()
strategy = shoal.DataParallel()
model, optimizer = strategy.prepare(model, optimizer)
recovery = shoal.Recovery(strategy, model, optimizer, loader=loader)   # survive restarts
"""

from typing import TYPE_CHECKING, Any

from shoal.errors import ConfigError, ShoalError
from shoal.runtime import current, init, shutdown
from shoal.strategies.base import Strategy
from shoal.strategies.data_parallel import DataParallel
from shoal.strategies.parameter_server import ParameterServer
from shoal.strategies.pipeline import Pipeline
from shoal.strategies.sharded import ShardedDataParallel
from shoal.strategies.tensor_parallel import TensorParallel

if TYPE_CHECKING:
    from shoal.train.recovery import Recovery

__version__ = "0.1.0"

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
    """`shoal.Recovery`, imported when first used (it brings in the checkpoint code)."""
    if name == "Recovery":
        from shoal.train.recovery import Recovery

        return Recovery
    raise AttributeError(f"module 'shoal' has no attribute {name!r}")
