"""The parameter-server strategy: the worker side (the servers are `shoal.ps`)."""

from shoal.strategies.parameter_server.layout import code_shape
from shoal.strategies.parameter_server.strategy import ParameterServer

__all__ = ["ParameterServer", "code_shape"]
