"""Tensor parallelism (Megatron style) on DTensor's `parallelize_module`.

Pairs of linear layers are split column-wise then row-wise, so one all-reduce
per pair joins the partial results: in an MLP, consecutive Linear layers; in
an attention block, q/k/v column-wise (each rank a subset of heads) and the
output projection row-wise; in a feed-forward block, up then down. With `dp`
> 1 the tensor-parallel groups are replicated and their gradients averaged
over the data-parallel ranks.

Layers outside the plan are replicated and kept identical: every rank starts
from rank 0's parameters and buffers (as DDP does), the tensor-parallel ranks
share one RNG state (so dropout on replicated activations draws one mask), and
their parameters become `Replicate` DTensors on the tensor-parallel mesh. So
every parameter is a DTensor and torch's own `clip_grad_norm_` and
`GradScaler` see one kind of tensor; their gradients need no averaging: the
backward of a column-wise layer all-reduces the gradient it hands back. A plan
that splits nothing, and a sampler that gives the tensor-parallel ranks
different batches (checked at the first training forwards), stop with one
sentence instead of training N unrelated models.
Guarantee: the same arithmetic as one process (up to summation order).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.hooks import RemovableHandle

from shoal import runtime
from shoal.config import check_range
from shoal.errors import ConfigError
from shoal.mesh import ParallelDims
from shoal.strategies.base import StepOptions
from shoal.strategies.mesh_strategy import MeshStrategy
from shoal.strategies.optimizer import PreparedOptimizer, rebind_optimizer
from shoal.strategies.pickling import refuse_pickling

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

STYLES = ("colwise", "rowwise")


class TensorParallel(MeshStrategy):
    """Megatron-style layer splits: `TensorParallel(plan="auto", dp=1, grad_accum=1, clip_norm=None)`."""

    name = "tensor_parallel"

    @dataclass(frozen=True, kw_only=True, slots=True)
    class Options(StepOptions):
        plan: dict[str, str] | str = "auto"
        """"auto", or {module name: "colwise" | "rowwise"} for an explicit plan."""
        dp: int = 1

        def __post_init__(self) -> None:
            StepOptions.__post_init__(self)  # grad_accum, clip_norm
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
        self._batch_checks_left = 0
        self._batch_check: RemovableHandle | None = None

    def prepare(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        example: tuple[Any, Any] | None = None,
    ) -> tuple[nn.Module, PreparedOptimizer | None]:
        from torch.distributed.tensor import distribute_module
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

        rt = runtime.current()
        self.dims = dims = ParallelDims.for_world(
            rt.world_size, tp=rt.world_size // self.options.dp, dp=self.options.dp
        )
        model.to(rt.device)
        names = {id(p): n for n, p in model.named_parameters()}
        before = list(model.parameters())
        self.plan_used = plan_for(model, self.options.plan, dims.tp)
        if dims.tp > 1:
            replicated = replicated_regions(model, self.plan_used)
            broadcast_state(model)
            styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
            tp_mesh = dims.mesh["tp"]
            parallelize_module(model, tp_mesh, {k: styles[v]() for k, v in self.plan_used.items()})
            for module in replicated:  # Replicate DTensor parameters; plain tensors in and out
                distribute_module(module, tp_mesh, None, None, _local_outputs)  # pyright: ignore[reportArgumentType]
                module.register_forward_pre_hook(functools.partial(_replicated_inputs, tp_mesh), with_kwargs=True)
            share_rng_state(dims.group("tp"), rt.device)
            self._batch_checks_left = BATCH_CHECKS
            self._batch_check = model.register_forward_pre_hook(self._check_same_batch, with_kwargs=True)
            if optimizer is not None:
                rebind_optimizer(optimizer, names, dict(model.named_parameters()))
            refuse_pickling(model, "its layers are split over the ranks")
        elif rt.world_size > 1:
            broadcast_state(model)
        return self.finish_prepare(model, optimizer, replaced=before)

    def _check_same_batch(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """At the first training forwards: the tensor-parallel ranks must hold the same input."""
        if not module.training:
            return
        self._batch_checks_left -= 1
        if self._batch_checks_left <= 0 and self._batch_check is not None:
            self._batch_check.remove()
        x = _first_tensor((args, kwargs))
        if x is None:
            return
        self.check_same_batch([x], "tp")


BATCH_CHECKS = 2
"""Training forwards whose input is compared over the tensor-parallel group."""

NOTHING_TO_SPLIT = (
    "TensorParallel found no layer to split in this model: the automatic plan splits pairs of nn.Linear "
    "(consecutive in an nn.Sequential, or children named q, k, v, out or up, down); give "
    "plan={'layer.name': 'colwise' | 'rowwise', ...} or use shoal.DataParallel()"
)


def plan_for(model: nn.Module, plan: dict[str, str] | str, tp: int) -> dict[str, str]:
    """The plan to apply: the options' table or the automatic one, checked against the model."""
    used = dict(plan) if isinstance(plan, dict) else auto_plan(model)
    unknown = set(used) - {n for n, _ in model.named_modules()}
    if unknown:
        raise ConfigError(
            f"'strategy.plan' names module(s) {sorted(unknown)} that the model does not have", "strategy.plan"
        )
    if tp > 1 and not used:
        raise ConfigError(NOTHING_TO_SPLIT, "strategy.plan")
    if tp > 1:
        first: dict[int, str] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            if id(p) in first:
                raise ConfigError(
                    f"TensorParallel cannot keep tied parameters ('{name}' is '{first[id(p)]}'): splitting or "
                    "replicating one would untie them; untie them or use shoal.DataParallel()",
                    "strategy.plan",
                )
            first[id(p)] = name
    return used


def replicated_regions(model: nn.Module, plan: dict[str, str]) -> list[nn.Module]:
    """The outermost modules outside the plan that hold parameters themselves.

    Each becomes one replicated DTensor region (its inputs made `Replicate`
    DTensors, its outputs plain again), so everything inside runs on DTensors.
    """
    regions: list[nn.Module] = []

    def visit(name: str, module: nn.Module) -> None:
        if name in plan:
            return
        own = [n for n, _ in module.named_parameters(recurse=False)]
        if not own:
            for child, sub in module.named_children():
                visit(f"{name}.{child}" if name else child, sub)
            return
        split = [n for n, _ in module.named_modules(prefix=name) if n in plan]
        if split:
            raise ConfigError(
                f"TensorParallel cannot replicate {f'module {name!r}' if name else 'the model'}: it holds "
                f"parameter(s) {own} itself and also contains split layers {split}; "
                "move those parameters into a child module of their own",
                "strategy.plan",
            )
        rnn = [n for n, m in module.named_modules(prefix=name) if isinstance(m, nn.RNNBase)]
        if rnn:
            raise ConfigError(
                f"TensorParallel cannot replicate the recurrent layer '{rnn[0]}' (DTensor has no recurrent "
                "kernels); train this model with shoal.DataParallel()",
                "strategy.plan",
            )
        regions.append(module)

    visit("", model)
    return regions


def _replicated_inputs(
    mesh: DeviceMesh, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """A replicated region's tensor arguments (positional or keyword, e.g. an attention mask) as
    `Replicate` DTensors: every tensor its parameters meet must be one."""
    from torch.distributed.tensor import DTensor, Replicate

    def convert(x: Any) -> Any:
        if isinstance(x, torch.Tensor) and not isinstance(x, DTensor):
            return DTensor.from_local(x, mesh, [Replicate()], run_check=False)
        if isinstance(x, tuple | list):
            return type(x)(convert(item) for item in x)
        return x

    return convert(args), {k: convert(v) for k, v in kwargs.items()}


def _local_outputs(module: nn.Module, outputs: Any, mesh: Any) -> Any:
    from torch.distributed.tensor import DTensor

    if isinstance(outputs, DTensor):
        return outputs.to_local()
    if isinstance(outputs, tuple | list):
        return type(outputs)(_local_outputs(module, o, mesh) for o in outputs)
    return outputs


def broadcast_state(model: nn.Module) -> None:
    """Every rank starts from rank 0's parameters and buffers, as DDP does (no user seed needed)."""
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            dist.broadcast(t, src=0)


def share_rng_state(group: dist.ProcessGroup, device: torch.device) -> None:
    """The group's first rank's torch RNG state on every rank of `group`: one dropout mask
    on replicated activations."""
    src = dist.get_global_rank(group, 0)
    state = torch.get_rng_state().to(device)
    dist.broadcast(state, src=src, group=group)
    torch.set_rng_state(state.cpu())
    if device.type == "cuda":
        cuda_state = torch.cuda.get_rng_state(device).to(device)
        dist.broadcast(cuda_state, src=src, group=group)
        torch.cuda.set_rng_state(cuda_state.cpu(), device)


def _first_tensor(tree: Any) -> torch.Tensor | None:
    if isinstance(tree, torch.Tensor):
        return tree
    items = tree.values() if isinstance(tree, dict) else tree if isinstance(tree, tuple | list) else ()
    for item in items:
        found = _first_tensor(item)
        if found is not None:
            return found
    return None


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
