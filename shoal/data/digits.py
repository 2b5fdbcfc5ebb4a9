"""scikit-learn's handwritten digits: 1,797 8x8 images that ship with the
package, so the default job needs no download."""

from __future__ import annotations

import gzip
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
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
        images, labels = digits_arrays()
        x = torch.tensor(images, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
        x = (x - 0.3) / 0.4  # roughly zero mean, unit variance
        y = torch.tensor(labels, dtype=torch.long)
        return split_tensors(x, y, self.test_fraction, seed, num_classes=10)


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(images as 1,797 x 64 floats, labels), read from the CSV that scikit-learn ships. Read here
    because importing scikit-learn (for `load_digits`) costs 1.4 s of every worker's start, and a
    job's workers all load the data; `load_digits` is the fallback if the file is not where it was."""
    spec = importlib.util.find_spec("sklearn")  # finds the package without importing it
    path = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz" if spec and spec.origin else None
    if path is None or not path.is_file():
        from sklearn.datasets import load_digits

        images, labels = load_digits(return_X_y=True)  # pyright: ignore[reportGeneralTypeIssues]
        return np.asarray(images), np.asarray(labels)
    with gzip.open(path, "rt") as f:
        data = np.loadtxt(f, delimiter=",")
    return data[:, :-1], data[:, -1].astype(int)
