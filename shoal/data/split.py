from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import TensorDataset


@dataclass
class DataSplit:
    """A training set, a held-out set, and what a model needs to know of them."""

    train: TensorDataset
    test: TensorDataset
    input_shape: tuple[int, ...]
    num_classes: int
    task: str = "classification"  # or "language_model": targets are next tokens


def split_tensors(x: torch.Tensor, y: torch.Tensor, test_fraction: float, seed: int, num_classes: int) -> DataSplit:
    """A seeded random split of in-memory tensors."""
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(x), generator=gen)
    n_test = max(1, round(len(x) * test_fraction))
    test, train = perm[:n_test], perm[n_test:]
    return DataSplit(
        TensorDataset(x[train], y[train]), TensorDataset(x[test], y[test]), tuple(x.shape[1:]), num_classes
    )
