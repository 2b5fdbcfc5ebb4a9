"""Data sets by name. Each is an options dataclass with `load()` -> `DataSplit`."""

from shoal.data.split import DataSplit
from shoal.registry import Registry

DATASETS = Registry(
    "data set",
    {
        "digits": "shoal.data.digits:Digits",
        "synthetic": "shoal.data.synthetic:Synthetic",
        "stdlib_chars": "shoal.data.chars:StdlibChars",
    },
)

__all__ = ["DATASETS", "DataSplit"]
