"""Samplers that split a data set over the data-parallel ranks.

Both read this rank's (rank, world) when a pass starts, not when they are
made: under TensorParallel and Pipeline the data-parallel rank is known only
after `prepare()` builds the mesh, and a sampler made earlier must still
split by it (tensor-parallel ranks of one replica must see the same data).

- `ShardBatchSampler` yields this rank's index batches for `ShardedLoader`:
  global batch i of an epoch is `order[i*G : (i+1)*G]`, G = batch_size x
  world, and rank r takes the r-th slice, so the ranks' batches together are
  the single process's batch of size G. It starts a pass at a position
  (epoch, batch) that a checkpoint restores.
- `DataSampler` is `torch.utils.data.DistributedSampler` by the data-parallel
  rank, for a user's own `DataLoader(ds, batch_size=b, sampler=...)`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sized
from typing import Any

import torch
from torch.utils.data import DistributedSampler, Sampler

from shoal.errors import ShoalError

Shard = Callable[[], tuple[int, int]]
"""Returns (this rank's data-parallel rank, data-parallel world), read when a pass starts."""


def fixed(rank: int, world: int) -> Shard:
    """A shard known in advance (tests, a single process)."""
    if not 0 <= rank < world:
        raise ShoalError(f"rank {rank} is outside a world of {world}; give 0 <= rank < world")
    return lambda: (rank, world)


class ShardBatchSampler(Sampler[list[int]]):
    """This rank's index batches, from a position (epoch, start batch) that can be saved.

    `drop_last=False` keeps the last, smaller global batch and splits it over
    the ranks as evenly as possible (the first ranks take one more); a rank
    left without a sample (fewer samples than ranks) repeats the batch's
    first samples, as `DistributedSampler` pads, so every rank steps and the
    number of batches is the same on every rank.
    """

    def __init__(
        self, length: int, batch_size: int, shard: Shard, shuffle: bool = True, seed: int = 0, drop_last: bool = True
    ) -> None:
        if batch_size < 1:
            raise ShoalError(f"batch_size must be >= 1, not {batch_size}")
        if length < 1:
            raise ShoalError("the data set is empty; give the loader at least one sample")
        self.length, self.batch_size = length, batch_size
        self.shard = shard
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.epoch = 0
        """The epoch the next pass plays (advanced when a pass completes, or by `set_epoch`)."""
        self.start = 0
        """The batch the next pass starts at (0, or where a loaded checkpoint stopped)."""

    def set_epoch(self, epoch: int) -> None:
        """Play `epoch` next, from its start; the current epoch keeps a resumed position."""
        if epoch != self.epoch:
            self.epoch, self.start = epoch, 0

    def global_batch(self) -> int:
        return self.batch_size * self.shard()[1]

    def __len__(self) -> int:
        """Batches in a whole epoch (the same on every rank)."""
        g = self.global_batch()
        n = self.length // g if self.drop_last else -(-self.length // g)
        if n == 0:
            raise ShoalError(
                f"the data set has {self.length} samples, fewer than one global batch "
                f"(batch_size {self.batch_size} x {g // self.batch_size} workers = {g}); "
                "lower the batch size or pass drop_last=False"
            )
        return n

    def order(self, epoch: int) -> torch.Tensor:
        """The epoch's sample order, the same on every rank."""
        if not self.shuffle:
            return torch.arange(self.length)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.length, generator=gen)

    def index_batches(self, epoch: int, start: int) -> Iterator[torch.Tensor]:
        """This rank's index batches of `epoch` from batch `start` to the epoch's end (rank read now)."""
        rank, world = self.shard()
        return self._slices(self.order(epoch), rank, world, start, len(self))

    def _slices(self, order: torch.Tensor, rank: int, world: int, start: int, batches: int) -> Iterator[torch.Tensor]:
        g = self.batch_size * world
        for i in range(start, batches):
            first = i * g
            size = min(g, self.length - first)
            if size == g:
                lo = first + rank * self.batch_size
                yield order[lo : lo + self.batch_size]
                continue
            share, extra = divmod(size, world)  # the last, smaller global batch
            lo = first + rank * share + min(rank, extra)
            hi = lo + share + (rank < extra)
            if hi == lo:  # fewer samples than ranks: repeat one, so that this rank steps too
                lo = first + rank % size
                hi = lo + 1
            yield order[lo:hi]

    def __iter__(self) -> Iterator[list[int]]:
        return (idx.tolist() for idx in self.index_batches(self.epoch, self.start))

    def finished(self, epoch: int) -> None:
        """A pass over `epoch` completed: the next pass plays the following epoch."""
        if epoch == self.epoch:
            self.epoch, self.start = epoch + 1, 0

    def state_dict(self) -> dict[str, int]:
        """Where the next pass starts."""
        return {"epoch": self.epoch, "index": self.start}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.start = int(state["epoch"]), int(state["index"])


class DataSampler(Sampler[int]):
    """`DistributedSampler` by the data-parallel rank, read when a pass starts.

    Same samples, order, padding and `set_epoch` as
    `DistributedSampler(ds, num_replicas=data_world, rank=data_rank, ...)`:
    it builds one per pass. Without `set_epoch` every pass has the same order,
    as with `DistributedSampler`.
    """

    def __init__(self, dataset: Sized, shard: Shard, shuffle: bool = True, seed: int = 0, drop_last: bool = False):
        self.dataset, self.shard = dataset, shard
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def distributed(self) -> DistributedSampler:
        """torch's sampler for this rank, now."""
        rank, world = self.shard()
        sampler = DistributedSampler(
            self.dataset,  # pyright: ignore[reportArgumentType]  # it needs only len()
            num_replicas=world,
            rank=rank,
            shuffle=self.shuffle,
            seed=self.seed,
            drop_last=self.drop_last,
        )
        sampler.set_epoch(self.epoch)
        return sampler

    def __iter__(self) -> Iterator[int]:
        return iter(self.distributed())

    def __len__(self) -> int:
        return len(self.distributed())
