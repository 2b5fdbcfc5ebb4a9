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
from typing import Any

import torch
from torch import nn

from shoal import runtime
from shoal.config import check_range
from shoal.errors import ConfigError
from shoal.mesh import ParallelDims
from shoal.strategies.base import MeshStrategy, StrategyOptions
from shoal.strategies.optimizer import PreparedOptimizer, prepare_optimizer, rebind_optimizer
from shoal.strategies.pickling import refuse_pickling

STYLES = ("colwise", "rowwise")


class TensorParallel(MeshStrategy):
    """Megatron-style layer splits: `TensorParallel(plan="auto", dp=1, clip_norm=None)`."""

    name = "tensor_parallel"

    @dataclass(frozen=True, kw_only=True, slots=True)
    class Options(StrategyOptions):
        plan: dict[str, str] | str = "auto"
        """"auto", or {module name: "colwise" | "rowwise"} for an explicit plan."""
        dp: int = 1
        clip_norm: float | None = None

        def __post_init__(self) -> None:
            check_range(self.dp, "dp", low=1)
            if isinstance(self.plan, str) and self.plan != "auto":
                raise ConfigError(
                    f"'plan' must be 'auto' or a table of module name = 'colwise' | 'rowwise', not {self.plan!r}",
                    "plan",
                )
            if isinstance(self.plan, dict):
                for module, style in self.plan.items():
                    if style not in STYLES:
                        raise ConfigError(f"'plan.{module}' must be 'colwise' or 'rowwise', not {style!r}", "plan")

    options: Options

    def __init__(self, options: Options | None = None, /, **kwargs: Any) -> None:
        super().__init__(options, **kwargs)
        self.plan_used: dict[str, str] = {}
        """The plan `prepare` applied (the options' or the automatic one)."""

    def prepare(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, *, example: tuple[Any, Any] | None = None
    ) -> tuple[nn.Module, PreparedOptimizer]:
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

        rt = runtime.current()
        self.dims = dims = ParallelDims.for_world(
            rt.world_size, tp=rt.world_size // self.options.dp, dp=self.options.dp
        )
        model.to(rt.device)
        names = {id(p): n for n, p in model.named_parameters()}
        plan = self.options.plan
        self.plan_used = dict(plan) if isinstance(plan, dict) else auto_plan(model)
        unknown = set(self.plan_used) - {n for n, _ in model.named_modules()}
        if unknown:
            raise ConfigError(
                f"'strategy.plan' names module(s) {sorted(unknown)} that the model does not have", "strategy.plan"
            )
        if dims.tp > 1:
            styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
            parallelize_module(model, dims.mesh["tp"], {k: styles[v]() for k, v in self.plan_used.items()})
            rebind_optimizer(optimizer, names, dict(model.named_parameters()))
            refuse_pickling(model, "its layers are split over the ranks")
        self._params = [p for p in model.parameters() if p.requires_grad]
        return model, prepare_optimizer(optimizer, self)

    @property
    def clip_norm(self) -> float | None:
        return self.options.clip_norm


def auto_plan(model: nn.Module) -> dict[str, str]:
    """Column-then-row pairs: attention (q, k, v | out), feed-forward (up | down),
    and consecutive Linear layers of a Sequential."""
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
            plan.update(_sequential_pairs(prefix, children))
    return plan


def _sequential_pairs(prefix: str, children: dict[str, nn.Module]) -> dict[str, str]:
    """Consecutive Linear layers, with only element-wise layers between them, as column/row pairs."""
    plan: dict[str, str] = {}
    waiting = None  # a Linear waiting for its row-wise partner
    for key, child in children.items():
        if isinstance(child, nn.Linear):
            if waiting is None:
                waiting = key
            else:
                plan.update({f"{prefix}{waiting}": "colwise", f"{prefix}{key}": "rowwise"})
                waiting = None
        elif not isinstance(child, ELEMENTWISE):
            waiting = None  # only element-wise layers may sit inside a pair
    return plan


ELEMENTWISE = (nn.ReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Dropout, nn.Identity)
