"""Sharded data parallelism (ZeRO-3 / FSDP) on PyTorch's `fully_shard` (FSDP2).

Parameters, gradients and optimizer state are split over the ranks; each
layer's parameters are all-gathered for its forward and backward and its
gradients reduce-scattered. Guarantee: the same steps as `DataParallel`
(gradients averaged over ranks), so it equals one process with the
combined batch; memory for model state per rank ~ 1/N of DataParallel's.
The gradients are averaged when backward ends: `synchronize()` has nothing left to do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from shoal import runtime
from shoal.strategies.base import Strategy, StrategyOptions
from shoal.strategies.optimizer import PreparedOptimizer, prepare_optimizer, rebind_optimizer
from shoal.strategies.pickling import refuse_pickling


class ShardedDataParallel(Strategy):
    """FSDP2 over all ranks: `ShardedDataParallel(reshard_after_forward=True)`."""

    name = "sharded"

    @dataclass(frozen=True, kw_only=True, slots=True)
    class Options(StrategyOptions):
        reshard_after_forward: bool = True

    options: Options

    def prepare(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, *, example: tuple[Any, Any] | None = None
    ) -> tuple[nn.Module, PreparedOptimizer]:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        rt = runtime.current()
        model.to(rt.device)
        names = {id(p): n for n, p in model.named_parameters()}
        if rt.distributed:
            mesh = init_device_mesh(rt.device.type, (rt.world_size,))
            reshard = self.options.reshard_after_forward
            for child in model.children():  # one all-gather unit per top-level layer
                if any(True for _ in child.parameters()):
                    fully_shard(child, mesh=mesh, reshard_after_forward=reshard)
            fully_shard(model, mesh=mesh, reshard_after_forward=reshard)
            rebind_optimizer(optimizer, names, dict(model.named_parameters()))
            refuse_pickling(model, "its parameters are sharded over the ranks")
        return model, prepare_optimizer(optimizer, self)
