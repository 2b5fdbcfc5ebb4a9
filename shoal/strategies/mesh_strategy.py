"""The base of the model-parallel strategies (tensor parallel, pipeline): laid out
on a device mesh, data split over its data-parallel dimension only."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from shoal import runtime
from shoal.errors import ShoalError
from shoal.mesh import ParallelDims
from shoal.strategies.base import Strategy, StrategyOptions


class MeshStrategy(Strategy):
    """A strategy laid out on `shoal.mesh.ParallelDims` (built by `prepare`):
    data is split over the mesh's data-parallel dimension only, and gradients
    are averaged over it at `step()` (or at `synchronize()`, then not again),
    once per `grad_accum` micro-steps. A backward never communicates over the
    data-parallel ranks, so `no_sync()` has nothing to hold back."""

    def __init__(self, options: StrategyOptions | None = None, /, **kwargs: Any) -> None:
        super().__init__(options, **kwargs)
        self.dims: ParallelDims | None = None

    @property
    def mesh(self) -> ParallelDims:
        if self.dims is None:
            raise self.not_prepared()
        return self.dims

    @property
    def data_rank(self) -> int:
        return self.dims.dp_rank if self.dims else self._unsplit().rank

    @property
    def data_world(self) -> int:
        return self.dims.dp if self.dims else self._unsplit().world_size

    def _unsplit(self) -> runtime.Runtime:
        """Before `prepare`: a world of one, or a sentence (the split comes with the mesh)."""
        rt = runtime.current()
        if rt.world_size > 1:
            raise ShoalError(
                f"{type(self).__name__} splits data over its data-parallel ranks, known only after "
                "prepare(model, optimizer); call prepare before iterating the loader or sampler "
                "or reading data_rank / data_world"
            )
        return rt

    def data_group(self) -> dist.ProcessGroup | None:
        return self.dims.group("dp") if self.dims and self.dims.dp > 1 else None

    def step_needs(self) -> list[str]:
        needs = super().step_needs()
        if self.dims is not None and self.dims.dp > 1:
            needs.append(f"the gradient average over dp={self.dims.dp} replicas")
        return needs

    def check_same_batch(self, tensors: list[torch.Tensor], dim: str) -> None:
        """The ranks of one replica (mesh dimension `dim`) must hold the same batch: a sampler that
        splits by world rank would give them different ones and train on mismatched data in silence."""
        mine = torch.cat([fingerprint(t) for t in tensors]).to(runtime.current().device)
        extremes = torch.cat([mine, -mine])
        dist.all_reduce(extremes, op=dist.ReduceOp.MAX, group=self.mesh.group(dim))
        if not torch.equal(extremes[: len(mine)], -extremes[len(mine) :]):
            raise ShoalError(
                f"{type(self).__name__}: the ranks of one replica got different batches (a sampler that splits "
                "by world rank); build it with the strategy's data rank, "
                "DistributedSampler(dataset, num_replicas=strategy.data_world, rank=strategy.data_rank), "
                "or use strategy.sampler(dataset) or strategy.loader(...)"
            )

    def average_gradients(self) -> bool:
        """The all-reduce over the data-parallel ranks (once per update), then the mean over micro-steps."""
        if self.mesh.dp > 1:
            all_reduce_mean_grads(self._params, self.mesh.group("dp"), self.mesh.dp)
        return super().average_gradients()


def all_reduce_mean_grads(params: list[nn.Parameter], group: dist.ProcessGroup | None, world: int) -> None:
    """Average local gradients over a data-parallel group with one flat all-reduce.

    For model-parallel layouts where DDP cannot wrap the module (pipeline
    stages driven by a schedule, DTensor parameters): same arithmetic as DDP.
    """
    from torch.distributed.tensor import DTensor

    grads = []
    for p in params:
        if p.grad is not None:
            grads.append(p.grad._local_tensor if isinstance(p.grad, DTensor) else p.grad)
    if not grads or world <= 1:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=group)
    flat.div_(world)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def fingerprint(x: torch.Tensor) -> torch.Tensor:
    """Cheap summary of a batch (float64): size, sum, and a position-weighted sum of at most
    64Ki evenly spaced elements (so the order of samples counts)."""
    flat = x.detach().reshape(-1)
    sample = torch.nan_to_num(flat[:: max(1, flat.numel() // 65536)].to(torch.float64))
    weights = torch.arange(sample.numel(), device=flat.device, dtype=torch.float64).remainder_(7).add_(1)
    total = torch.nan_to_num(flat.sum(dtype=torch.float64))
    return torch.stack([total.new_tensor(float(flat.numel())), total, (sample * weights).sum()])
