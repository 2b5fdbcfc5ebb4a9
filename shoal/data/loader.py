"""A sharded, resumable batch loader.

Global batch i of an epoch is `perm[i*G : (i+1)*G]` with G = batch_size x
data-parallel world, and rank r takes the r-th slice of it. So the union of the
ranks' batches at every step is exactly the batch a single process would take
with batch size G: a synchronous run equals the single-process run with the
combined batch, and changing the world size keeps the global data order.
Its position (epoch, batch) is part of every checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

import torch
from torch.utils.data import default_collate

from shoal.errors import ShoalError


class Samples(Protocol):
    """A data set: its length and its samples by index (a TensorDataset, a list, ...)."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int, /) -> Any: ...


class ShardedLoader:
    def __init__(
        self,
        dataset: Samples,
        batch_size: int,
        rank: int = 0,
        world: int = 1,
        shuffle: bool = True,
        seed: int = 0,
        device: torch.device | str = "cpu",
    ):
        if batch_size < 1:
            raise ShoalError(f"batch_size must be >= 1, not {batch_size}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.rank, self.world = rank, world
        self.shuffle, self.seed = shuffle, seed
        self.device = torch.device(device)
        self.epoch = 0
        self.index = 0  # next global batch within the epoch
        n = len(dataset)
        if n // self.global_batch == 0:
            raise ShoalError(
                f"the data set has {n} samples, fewer than one global batch "
                f"(batch_size {batch_size} x {world} workers = {self.global_batch}); lower the batch size"
            )

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world

    def __len__(self) -> int:
        return len(self.dataset) // self.global_batch

    def _order(self, epoch: int) -> torch.Tensor:
        n = len(self.dataset)
        if not self.shuffle:
            return torch.arange(n)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(n, generator=gen)

    def __iter__(self) -> Iterator:
        """Yield this rank's batches from the current position to the epoch's end.

        A finished epoch rolls over when the next iteration starts, so the
        position is right even if the consumer stops at the last batch.
        """
        if self.index >= len(self):
            self.epoch += 1
            self.index = 0
        order = self._order(self.epoch)
        while self.index < len(self):
            start = self.index * self.global_batch + self.rank * self.batch_size
            self.index += 1
            yield fetch(self.dataset, order[start : start + self.batch_size], self.device)

    def forever(self) -> Iterator:
        """Batches across epochs without end, for step-counted loops."""
        while True:
            yield from self

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state["epoch"])
        self.index = int(state["index"])


def fetch(dataset: Samples, idx: torch.Tensor, device: torch.device) -> list[torch.Tensor]:
    """The samples `idx` as a batch on `device`; in-memory tensor data sets are indexed directly."""
    tensors = getattr(dataset, "tensors", None)
    batch = default_collate([dataset[int(i)] for i in idx]) if tensors is None else [t[idx] for t in tensors]
    non_blocking = device.type == "cuda"
    return [b.to(device, non_blocking=non_blocking) for b in batch]


def eval_shard(n: int, rank: int, world: int) -> torch.Tensor:
    """Indices of this rank's share of an evaluation set (every sample exactly once)."""
    return torch.arange(rank, n, world)
