"""Distribution strategies by name. Each implements `shoal.strategies.base.Strategy`
and nests its options as a frozen `Options` dataclass (what `STRATEGIES.options`
returns and a config binds); `Options.build()` makes the strategy."""

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
