"""scikit-learn's handwritten digits: 1,797 8x8 images that ship with the
package, so the default job needs no download."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from shoal.config import check_range
from shoal.data.split import DataSplit, split_tensors


@dataclass
class Digits:
    batch_size: int = 32
    """Per worker; the global batch is batch_size x data-parallel workers."""
    test_fraction: float = 0.2

    def __post_init__(self):
        check_range(self.batch_size, "batch_size", low=1)
        check_range(self.test_fraction, "test_fraction", low=0.0, high=0.9, low_open=True)

    def load(self, seed: int = 0) -> DataSplit:
        from sklearn.datasets import load_digits

        images, labels = load_digits(return_X_y=True)
        x = torch.tensor(images, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
        x = (x - 0.3) / 0.4  # roughly zero mean, unit variance
        y = torch.tensor(labels, dtype=torch.long)
        return split_tensors(x, y, self.test_fraction, seed, num_classes=10)
