"""The one interface every strategy implements.

The trainer, the CLI and a user's own loop know only this: `prepare` the
model and optimizer, take this rank's `loader`, run steps, `evaluate`, save
and restore `checkpoint_state`, `close`. A strategy's `optimizer.step()` does
whatever the strategy needs (all-reduce, push/pull, pipeline schedule): the
user's optimizer object is returned with its `step`/`zero_grad` wrapped, so
it stays a real `torch.optim.Optimizer` (LR schedulers keep working).
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Callable
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch import nn

from shoal import faults, runtime
from shoal.data.loader import ShardedLoader, eval_shard, fetch

RANK_STATE = "rank_state/"


def rank_prefix(rank: int) -> str:
    """The DCP key prefix of one rank's own tensors."""
    return f"{RANK_STATE}rank{rank}/"


class Strategy:
    name: ClassVar[str] = ""

    # ------------------------------------------------------------------ setup
    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[nn.Module, torch.optim.Optimizer]:
        raise NotImplementedError

    @property
    def data_rank(self) -> int:
        """This rank's index among the ranks that see different data."""
        return runtime.current().rank

    @property
    def data_world(self) -> int:
        return runtime.current().world_size

    def loader(self, dataset, batch_size: int, shuffle: bool = True, seed: int = 0) -> ShardedLoader:
        """This rank's shard of `dataset`, `batch_size` samples per rank per step."""
        return ShardedLoader(
            dataset, batch_size, self.data_rank, self.data_world, shuffle, seed, runtime.current().device
        )

    # ------------------------------------------------------------------ steps
    def train_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: Callable, batch) -> torch.Tensor:
        """One micro-step of the ordinary loop; returns the detached loss."""
        x, y = batch
        loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return loss.detach()

    @torch.no_grad()
    def evaluate(self, model: nn.Module, dataset, loss_fn: Callable, batch_size: int = 512) -> dict[str, float]:
        """Accuracy and mean loss over the whole held-out set, each rank taking a share."""
        rt = runtime.current()
        was_training = model.training
        model.eval()
        idx = eval_shard(len(dataset), self.data_rank, self.data_world)
        totals = torch.zeros(3, dtype=torch.float64)
        # Every rank runs the same number of batches (some may be empty): sharded
        # and model-parallel forwards are collective.
        longest = -(-len(dataset) // self.data_world)
        for start in range(0, longest, batch_size):
            x, y = fetch(dataset, idx[start : start + batch_size], rt.device)
            out = model(x)
            if y.numel():
                totals += self.eval_totals(out, y, loss_fn)
        self.all_reduce_sum(totals)
        model.train(was_training)
        return {"eval_loss": totals[0].item() / totals[2].item(), "eval_accuracy": totals[1].item() / totals[2].item()}

    @staticmethod
    def eval_totals(out: torch.Tensor, y: torch.Tensor, loss_fn: Callable) -> torch.Tensor:
        """(loss sum, correct, count) per target: samples, or tokens of a language model."""
        n = y.numel()
        return torch.tensor([float(loss_fn(out, y)) * n, float((out.argmax(-1) == y).sum()), n], dtype=torch.float64)

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum a small CPU tensor over the data-parallel ranks (in place)."""
        if dist.is_initialized() and self.data_world > 1:
            dev = runtime.current().device
            moved = t.to(dev)
            dist.all_reduce(moved, group=self.data_group())
            t.copy_(moved.cpu())
        return t

    def data_group(self):
        """The process group over which data is split (None: the world)."""
        return None

    def step_metrics(self) -> dict[str, float]:
        """Strategy-specific figures for the last step (bytes sent, wait time, ...)."""
        return {}

    # ------------------------------------------------------------- checkpoints
    def checkpoint_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """A state dict for `torch.distributed.checkpoint`, keyed by parameter names."""
        from torch.distributed.checkpoint.state_dict import get_state_dict

        with raw_optimizer(optimizer):  # torch may call step() to create empty state
            model_sd, optim_sd = get_state_dict(self.unwrap(model), optimizer)
        return self.add_rank_tensors({"model": model_sd, "optim": optim_sd})

    def load_checkpoint_state(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import set_state_dict

        with raw_optimizer(optimizer):
            set_state_dict(
                self.unwrap(model), optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
            )
        self.take_rank_tensors(state)

    # Per-rank tensors (error-feedback residuals, PowerSGD factors, ...) differ
    # on every rank, so they go into the DCP checkpoint under a key naming the
    # rank (`rank_state/rank{r}/{key}`): each rank writes its own, binary, no
    # JSON/base64. `checkpoint.load` sizes them from the checkpoint's metadata.
    def rank_tensors(self) -> dict[str, torch.Tensor]:
        """This rank's own tensors to checkpoint (e.g. compressor state)."""
        return {}

    def load_rank_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore what `rank_tensors` returned (called with {} when none were saved)."""

    def add_rank_tensors(self, state: dict[str, Any]) -> dict[str, Any]:
        """`state` plus this rank's `rank_tensors` under per-rank DCP keys (for
        strategies that override `checkpoint_state`)."""
        prefix = rank_prefix(runtime.current().rank)
        for key, t in self.rank_tensors().items():
            state[prefix + key] = t.detach().cpu().contiguous()
        return state

    def take_rank_tensors(self, state: dict[str, Any]) -> None:
        """Hand the per-rank entries `checkpoint.load` filled in to `load_rank_tensors`."""
        own = rank_prefix(runtime.current().rank)
        prefix = own if any(k.startswith(own) for k in state) else rank_prefix(0)  # resumed on more ranks than saved
        tensors = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if tensors:
            self.load_rank_tensors(tensors)

    def state_dict(self) -> dict[str, Any]:
        """The strategy's own state (e.g. error-feedback residuals), JSON-able or tensors."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def unwrap(self, model: nn.Module) -> nn.Module:
        """The user's module inside whatever wrapper `prepare` put around it."""
        return getattr(model, "module", model)

    def close(self) -> None:
        pass

    # ------------------------------------------------------------- launching
    def server_processes(self, workers: int) -> int:
        """How many non-worker (server) processes the launcher must start."""
        return 0


class MeshStrategy(Strategy):
    """A strategy laid out on `shoal.mesh.ParallelDims` (set in `prepare` as
    `self.dims`): data is split over the mesh's data-parallel dimension only."""

    dims = None

    @property
    def data_rank(self) -> int:
        return self.dims.dp_rank if self.dims else runtime.current().rank

    @property
    def data_world(self) -> int:
        return self.dims.dp if self.dims else runtime.current().world_size

    def data_group(self):
        return self.dims.group("dp") if self.dims and self.dims.dp > 1 else None


def wrap_optimizer(
    optimizer: torch.optim.Optimizer, step: Callable, zero_grad: Callable | None = None
) -> torch.optim.Optimizer:
    """Replace the optimizer's `step` (and, if given, `zero_grad`) on this instance only.

    `step(original_step, closure)` and `zero_grad(original_zero_grad, set_to_none)`
    receive the class's own bound methods.
    """
    original_step = types.MethodType(type(optimizer).step, optimizer)
    original_zero = types.MethodType(type(optimizer).zero_grad, optimizer)

    calls = 0

    def new_step(self, closure=None):
        nonlocal calls
        calls += 1
        faults.at_step("worker", runtime.current().rank, calls)
        return step(original_step, closure)

    def new_zero_grad(self, set_to_none: bool = True):
        return zero_grad(original_zero, set_to_none)

    optimizer.step = types.MethodType(new_step, optimizer)
    if zero_grad is not None:
        optimizer.zero_grad = types.MethodType(new_zero_grad, optimizer)
    return optimizer


@contextlib.contextmanager
def raw_optimizer(optimizer: torch.optim.Optimizer):
    """Within the block, `step`/`zero_grad` are the optimizer class's own (no strategy work)."""
    wrapped = {k: optimizer.__dict__.pop(k) for k in ("step", "zero_grad") if k in optimizer.__dict__}
    try:
        yield optimizer
    finally:
        optimizer.__dict__.update(wrapped)


def rebind_optimizer(
    optimizer: torch.optim.Optimizer, names: dict[int, str], params: dict[str, torch.nn.Parameter]
) -> None:
    """Point `optimizer`'s groups at new parameter objects, by name, in place.

    Sharding (FSDP2, tensor parallel) replaces a module's parameters and a
    pipeline stage keeps only some: the user's optimizer, built on the
    original parameters, must follow. `names` maps id(original) -> name. Groups
    keep their hyperparameters; parameters this rank no longer holds are dropped.
    """
    if optimizer.state:
        raise RuntimeError("prepare() the model before the optimizer's first step")
    groups = optimizer.param_groups
    optimizer.param_groups = []
    for group in groups:
        kept = [params[names[id(p)]] for p in group["params"] if names.get(id(p)) in params]
        if kept:
            optimizer.add_param_group({**{k: v for k, v in group.items() if k != "params"}, "params": kept})
    if not optimizer.param_groups:
        raise RuntimeError("after splitting the model this rank holds no parameter of the optimizer")


def all_reduce_mean_grads(params, group, world: int) -> None:
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
