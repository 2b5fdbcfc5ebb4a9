"""Tensor parallelism (Megatron style) on DTensor's `parallelize_module`.

Pairs of linear layers are split column-wise then row-wise, so one all-reduce
per pair joins the partial results: in an MLP, consecutive Linear layers; in
an attention block, q/k/v column-wise (each rank a subset of heads) and the
output projection row-wise; in a feed-forward block, up then down. Layers
outside a pair stay replicated. With `dp` > 1 the tensor-parallel groups are
replicated and their gradients averaged over the data-parallel ranks.
Guarantee: the same arithmetic as one process (up to summation order).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from shoal import runtime
from shoal.config import check_range
from shoal.errors import ConfigError
from shoal.mesh import ParallelDims
from shoal.strategies.base import MeshStrategy, all_reduce_mean_grads, rebind_optimizer, wrap_optimizer

STYLES = ("colwise", "rowwise")


@dataclass
class TensorParallel(MeshStrategy):
    plan: dict[str, str] | str = "auto"
    """"auto", or {module name: "colwise" | "rowwise"} for an explicit plan."""
    dp: int = 1
    clip_norm: float | None = None

    name: ClassVar[str] = "tensor_parallel"

    def __post_init__(self):
        check_range(self.dp, "dp", low=1)
        if isinstance(self.plan, str) and self.plan != "auto":
            raise ConfigError(
                f"'plan' must be 'auto' or a table of module name = 'colwise' | 'rowwise', not {self.plan!r}", "plan"
            )
        if isinstance(self.plan, dict):
            for module, style in self.plan.items():
                if style not in STYLES:
                    raise ConfigError(f"'plan.{module}' must be 'colwise' or 'rowwise', not {style!r}", "plan")
        self.dims: ParallelDims | None = None
        self._plan_used: dict[str, str] = {}

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

        rt = runtime.current()
        self.dims = ParallelDims.for_world(rt.world_size, tp=rt.world_size // self.dp, dp=self.dp)
        model.to(rt.device)
        names = {id(p): n for n, p in model.named_parameters()}
        self._plan_used = dict(self.plan) if isinstance(self.plan, dict) else auto_plan(model)
        unknown = set(self._plan_used) - {n for n, _ in model.named_modules()}
        if unknown:
            raise ConfigError(
                f"'strategy.plan' names module(s) {sorted(unknown)} that the model does not have", "strategy.plan"
            )
        if self.dims.tp > 1:
            styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
            parallelize_module(model, self.dims.mesh["tp"], {k: styles[v]() for k, v in self._plan_used.items()})
            rebind_optimizer(optimizer, names, dict(model.named_parameters()))
        self._params = [p for p in model.parameters() if p.requires_grad]
        return model, wrap_optimizer(optimizer, self._step)

    def _step(self, original_step, closure=None):
        if self.dims.dp > 1:
            all_reduce_mean_grads(self._params, self.dims.group("dp"), self.dims.dp)
        if self.clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(self._params, self.clip_norm)
        return original_step(closure)


def auto_plan(model: nn.Module) -> dict[str, str]:
    """Column-then-row pairs: attention (q, k, v | out), feed-forward (up | down), and consecutive Linear layers of a Sequential."""
    plan: dict[str, str] = {}
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        children = dict(module.named_children())
        if all(isinstance(children.get(k), nn.Linear) for k in ("q", "k", "v", "out")):
            plan.update({f"{prefix}{k}": "colwise" for k in ("q", "k", "v")})
            plan[f"{prefix}out"] = "rowwise"
        elif all(isinstance(children.get(k), nn.Linear) for k in ("up", "down")):
            plan.update({f"{prefix}up": "colwise", f"{prefix}down": "rowwise"})
        elif isinstance(module, nn.Sequential):
            pending = None  # a Linear waiting for its row-wise partner
            for key, child in children.items():
                if isinstance(child, nn.Linear):
                    if pending is None:
                        pending = key
                    else:
                        plan.update({f"{prefix}{pending}": "colwise", f"{prefix}{key}": "rowwise"})
                        pending = None
                elif not isinstance(child, ELEMENTWISE):
                    pending = None  # only element-wise layers may sit inside a pair
    return plan


ELEMENTWISE = (nn.ReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Dropout, nn.Identity)
