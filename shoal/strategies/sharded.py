"""Sharded data parallelism (ZeRO-3 / FSDP) on PyTorch's `fully_shard` (FSDP2).

Parameters, gradients and optimizer state are split over the ranks; each
layer's parameters are all-gathered for its forward and backward and its
gradients reduce-scattered. Guarantee: the same steps as `DataParallel`
(gradients averaged over ranks), so it equals one process with the
combined batch; memory for model state per rank ~ 1/N of DataParallel's.
The gradients are averaged when backward ends: `synchronize()` has only the
mean over `grad_accum` micro-steps left to do.

`grad_accum` and `no_sync()` use FSDP2's own switch,
`set_requires_gradient_sync(False)`: the accumulating backward passes keep
unsharded local gradients (memory of a whole unsharded gradient per layer)
and the last one reduce-scatters their sum once. `clip_norm` and
`clip_grad_norm_` clip the global norm of the sharded (DTensor) gradients,
as one process would clip the whole gradient.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from shoal import runtime
from shoal.strategies.base import StepOptions, Strategy
from shoal.strategies.optimizer import PreparedOptimizer, rebind_optimizer
from shoal.strategies.pickling import refuse_pickling


class ShardedDataParallel(Strategy):
    """FSDP2 over all ranks: `ShardedDataParallel(reshard_after_forward=True, grad_accum=1, clip_norm=None)`."""

    name = "sharded"

    @dataclass(frozen=True, kw_only=True, slots=True)
    class Options(StepOptions):
        reshard_after_forward: bool = True

    options: Options

    def __init__(self, options: Options | None = None, /, **kwargs: Any) -> None:
        super().__init__(options, **kwargs)
        self._root: nn.Module | None = None
        """The model under `fully_shard` (None in a world of one)."""

    def prepare(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        example: tuple[Any, Any] | None = None,
    ) -> tuple[nn.Module, PreparedOptimizer | None]:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        rt = runtime.current()
        model.to(rt.device)
        names = {id(p): n for n, p in model.named_parameters()}
        before = list(model.parameters())
        if rt.distributed:
            mesh = init_device_mesh(rt.device.type, (rt.world_size,))
            reshard = self.options.reshard_after_forward
            for child in model.children():  # one all-gather unit per top-level layer
                if any(True for _ in child.parameters()):
                    fully_shard(child, mesh=mesh, reshard_after_forward=reshard)
            fully_shard(model, mesh=mesh, reshard_after_forward=reshard)
            self._root = model
            if optimizer is not None:
                rebind_optimizer(optimizer, names, dict(model.named_parameters()))
            refuse_pickling(model, "its parameters are sharded over the ranks")
        self.set_gradient_sync(self.grad_accum == 1)
        return self.finish_prepare(model, optimizer, replaced=before)

    def set_gradient_sync(self, sync: bool) -> None:
        from torch.distributed.fsdp import FSDPModule

        if isinstance(self._root, FSDPModule):
            self._root.set_requires_gradient_sync(sync)
