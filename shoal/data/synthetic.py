"""A generated classification problem of any size, for benchmarks and tests:
Gaussian clusters around random class centres, reproducible from the seed."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from shoal.config import check_range
from shoal.data.split import DataSplit, split_tensors


@dataclass
class Synthetic:
    batch_size: int = 64
    samples: int = 8192
    features: int = 64
    classes: int = 10
    noise: float = 1.0
    test_fraction: float = 0.1

    def __post_init__(self):
        check_range(self.batch_size, "batch_size", low=1)
        check_range(self.samples, "samples", low=2)
        check_range(self.features, "features", low=1)
        check_range(self.classes, "classes", low=2)
        check_range(self.noise, "noise", low=0.0)
        check_range(self.test_fraction, "test_fraction", low=0.0, high=0.9, low_open=True)

    def load(self, seed: int = 0) -> DataSplit:
        gen = torch.Generator().manual_seed(seed + 12345)
        centres = torch.randn(self.classes, self.features, generator=gen) * 1.5
        y = torch.randint(0, self.classes, (self.samples,), generator=gen)
        x = centres[y] + self.noise * torch.randn(self.samples, self.features, generator=gen)
        return split_tensors(x, y, self.test_fraction, seed, self.classes)
