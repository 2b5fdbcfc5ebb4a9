"""Distribution strategies by name. Each is a dataclass of its options that
implements `shoal.strategies.base.Strategy`; construction only validates."""

from shoal.registry import Registry

STRATEGIES = Registry(
    "strategy",
    {
        "data_parallel": "shoal.strategies.data_parallel:DataParallel",
        "parameter_server": "shoal.strategies.parameter_server:ParameterServer",
        "pipeline": "shoal.strategies.pipeline:Pipeline",
        "tensor_parallel": "shoal.strategies.tensor_parallel:TensorParallel",
        "sharded": "shoal.strategies.sharded:ShardedDataParallel",
    },
)

__all__ = ["STRATEGIES"]
