"""A sharded, resumable batch loader that iterates like `torch.utils.data.DataLoader`.

Global batch i of an epoch is `perm[i*G : (i+1)*G]` with G = batch_size x
data-parallel world, and rank r takes the r-th slice of it
(`shoal.data.sampler.ShardBatchSampler`). So the union of the ranks' batches
at every step is exactly the batch a single process would take with batch
size G: a synchronous run equals the single-process run with the combined
batch, and changing the world size keeps the global data order.

Each `iter(loader)` is an independent pass, as with a `DataLoader`: looking
at one batch (`next(iter(loader))`) takes nothing from the pass that trains.
A pass plays the sampler's epoch from its start position; when a pass
completes, the next one plays the following epoch (so successive passes
reshuffle without `set_epoch`; `loader.sampler.set_epoch(e)` works as with a
`DistributedSampler`). `state_dict()` is the position (epoch, next batch) of
the pass that yielded a batch most recently (or, when it completed or none
has, where the next pass starts); `load_state_dict()` makes the next pass
start there, so a checkpoint resumes mid-epoch exactly.

Batches come from a real `DataLoader` over the sampler (workers, `collate_fn`,
`pin_memory`, ...), except for an in-memory tensor data set with the default
collation and no workers, which is indexed by an index tensor directly: the
same batches, without per-sample collation.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, Protocol

import torch
from torch.utils.data import DataLoader, default_collate

from shoal.data.sampler import Shard, ShardBatchSampler, fixed
from shoal.errors import ShoalError


class Samples(Protocol):
    """A data set: its length and its samples by index (a TensorDataset, a list, ...)."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int, /) -> Any: ...


class ShardedLoader:
    """This rank's batches of `dataset`, as a re-iterable with a resumable position."""

    def __init__(
        self,
        dataset: Samples,
        batch_size: int,
        shard: Shard | tuple[int, int] = (0, 1),
        shuffle: bool = True,
        seed: int = 0,
        device: torch.device | str = "cpu",
        *,
        drop_last: bool = True,
        **dataloader_kwargs: Any,
    ):
        """`shard`: (rank, world), or a function that returns them when a pass starts.

        `dataloader_kwargs` go to the `DataLoader` (num_workers, collate_fn, pin_memory, ...).
        """
        for own in ("sampler", "batch_sampler"):
            if own in dataloader_kwargs:
                raise ShoalError(
                    f"the loader makes its own sampler, so it takes no {own!r}; for your own sampler build "
                    "DataLoader(dataset, batch_size, sampler=strategy.sampler(dataset)) yourself"
                )
        self.dataset = dataset
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.device = torch.device(device)
        known = isinstance(shard, tuple)
        split = fixed(*shard) if isinstance(shard, tuple) else shard
        self.sampler = ShardBatchSampler(len(dataset), batch_size, split, shuffle, seed, drop_last)
        if known:
            len(self.sampler)  # a data set smaller than one global batch is refused here
        plain = dataloader_kwargs.get("collate_fn") is None and not dataloader_kwargs.get("num_workers")
        self.tensors: tuple[torch.Tensor, ...] | None = getattr(dataset, "tensors", None) if plain else None
        """An in-memory tensor data set, indexed directly (same batches as the DataLoader's)."""
        self.dataloader = DataLoader(
            dataset,  # pyright: ignore[reportArgumentType]  # a map-style data set: len() and items
            batch_sampler=self.sampler,
            **dataloader_kwargs,
        )
        self._latest: _Pass | None = None

    @property
    def batch_sampler(self) -> ShardBatchSampler:
        return self.sampler

    @property
    def epoch(self) -> int:
        """The epoch of `state_dict()`'s position."""
        return self.state_dict()["epoch"]

    @property
    def global_batch(self) -> int:
        return self.sampler.global_batch()

    def __len__(self) -> int:
        """Batches per epoch on this rank (the same on every rank)."""
        return len(self.sampler)

    def __iter__(self) -> Iterator:
        """A new pass over the sampler's epoch, from its start position."""
        return _Pass(self)

    def open(self) -> Iterator:
        """This rank's batches from the sampler's position to its epoch's end; the position is read now."""
        if self.tensors is not None:
            return self._indexed(self.sampler.index_batches(self.sampler.epoch, self.sampler.start))
        return self._moved(iter(self.dataloader))  # its iterator reads the sampler's position now

    def _indexed(self, index_batches: Iterator[torch.Tensor]) -> Iterator:
        tensors = self.tensors or ()
        pinned = self.dataloader.pin_memory and self.device.type == "cuda"
        for idx in index_batches:
            batch = [t[idx] for t in tensors]
            yield to_device([b.pin_memory() for b in batch] if pinned else batch, self.device)

    def _moved(self, batches: Iterator) -> Iterator:
        for batch in batches:
            yield to_device(batch, self.device)

    def forever(self) -> Iterator:
        """Batches across epochs without end, for step-counted loops."""
        while True:
            yield from self

    def state_dict(self) -> dict[str, int]:
        """(epoch, next batch) of the pass that advanced last; see the module's docstring."""
        latest = self._latest
        if latest is None or latest.done:
            return self.sampler.state_dict()
        return {"epoch": latest.epoch, "index": latest.index}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """The next pass starts at `state`'s position; passes under way go on as they were."""
        self.sampler.load_state_dict(dict(state))
        self._latest = None


class _Pass:
    """One iteration over the loader: counts the batches it has handed out."""

    def __init__(self, loader: ShardedLoader) -> None:
        self.loader = loader
        len(loader.sampler)  # the data split is known (or refused) before anything is handed out
        self.epoch, self.index = loader.sampler.epoch, loader.sampler.start
        self.batches = loader.open()
        self.done = False

    def __iter__(self) -> _Pass:
        return self

    def __next__(self) -> Any:
        try:
            batch = next(self.batches)
        except StopIteration:
            if not self.done:
                self.done = True
                self.loader.sampler.finished(self.epoch)
            raise
        self.index += 1
        self.loader._latest = self
        return batch

    def __len__(self) -> int:
        return len(self.loader)


def to_device(batch: Any, device: torch.device) -> Any:
    """The batch with its tensors on `device` (lists, tuples and dicts followed)."""
    if device.type == "cpu":
        return batch
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=device.type == "cuda")
    if isinstance(batch, Mapping):
        return type(batch)({k: to_device(v, device) for k, v in batch.items()})  # pyright: ignore[reportCallIssue]
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a namedtuple
        return type(batch)(*(to_device(v, device) for v in batch))
    if isinstance(batch, list | tuple):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def fetch(dataset: Samples, idx: torch.Tensor, device: torch.device) -> list[torch.Tensor]:
    """The samples `idx` as a batch on `device`; in-memory tensor data sets are indexed directly."""
    tensors = getattr(dataset, "tensors", None)
    batch = default_collate([dataset[int(i)] for i in idx]) if tensors is None else [t[idx] for t in tensors]
    non_blocking = device.type == "cuda"
    return [b.to(device, non_blocking=non_blocking) for b in batch]


def eval_shard(n: int, rank: int, world: int) -> torch.Tensor:
    """Indices of this rank's share of an evaluation set (every sample exactly once)."""
    return torch.arange(rank, n, world)
