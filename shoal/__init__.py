"""shoal: train PyTorch models across many processes and machines.

import shoal
shoal.init()
strategy = shoal.DataParallel()
model, optimizer = strategy.prepare(model, optimizer)
"""

from shoal.errors import ConfigError, ShoalError
from shoal.runtime import current, init, shutdown
from shoal.strategies.base import Strategy
from shoal.strategies.data_parallel import DataParallel
from shoal.strategies.parameter_server import ParameterServer
from shoal.strategies.pipeline import Pipeline
from shoal.strategies.sharded import ShardedDataParallel
from shoal.strategies.tensor_parallel import TensorParallel

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "DataParallel",
    "ParameterServer",
    "Pipeline",
    "ShardedDataParallel",
    "ShoalError",
    "Strategy",
    "TensorParallel",
    "current",
    "init",
    "shutdown",
]
