"""The one interface every strategy implements, and the options every strategy has.

A strategy's options are a frozen, comparable dataclass nested in it
(`DataParallel.Options`): the config binds them, `build()` makes the
strategy, and constructing the strategy (`DataParallel(grad_accum=2)`)
only validates them. Live state (DDP, clients, pipeline stages) is built by
`prepare(model, optimizer=None, *, example=None)`, the same signature for all.

The trainer, the CLI and a user's own loop know only this: `prepare`, take
this rank's `loader`, run steps, `evaluate`, `state_dict`/`checkpoint_state`
for checkpoints, `full_state_dict`/`load_full_state_dict` for a script that
saves by itself, `close`. The prepared optimizer's `step()` does whatever the
strategy needs (see `shoal.strategies.optimizer`); an optimizer built after
`prepare(model)`, as the DDP and FSDP tutorials build it, is given to
`prepare_optimizer`. `synchronize()` finishes the gradient averaging early,
for users who clip or inspect by hand; `clip_grad_norm_` does that and clips.

The options themselves are in `shoal.strategies.options`; `no_sync()`,
within which a backward accumulates local gradients without communicating
(as DDP's), is here.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import Any, ClassVar, cast

import torch
import torch.distributed as dist
from torch import nn

from shoal import runtime
from shoal.data.loader import Samples, ShardedLoader, eval_shard, fetch
from shoal.data.sampler import DataSampler
from shoal.errors import ShoalError
from shoal.strategies import optimizer as optim
from shoal.strategies.full_state import check_full_state, copy_containers, cpu_copy, full_options, has_arrays
from shoal.strategies.optimizer import Closure, PreparedOptimizer, StepGuard, local_only
from shoal.strategies.options import StepOptions as StepOptions  # re-exported: strategies import it here
from shoal.strategies.options import StrategyOptions

LossFn = Callable[[Any, torch.Tensor], torch.Tensor]
NOT_OURS = (
    "this optimizer holds parameters that are not the prepared model's: build it on model.parameters() "
    "of the model that prepare(model) returned, or pass it to prepare(model, optimizer)"
)


class Strategy(abc.ABC):
    """A way to split training over processes: options in, `prepare` builds the rest."""

    name: ClassVar[str] = ""
    Options: ClassVar[type[StrategyOptions]] = StrategyOptions

    def __init__(self, options: StrategyOptions | None = None, /, **kwargs: Any) -> None:
        if options is None:
            options = self.Options(**kwargs)  # ConfigError naming the key, if a value is wrong
        elif kwargs:
            raise TypeError(f"{type(self).__name__}() takes options or keyword arguments, not both")
        if not isinstance(options, self.Options):
            raise TypeError(f"{type(self).__name__}() needs {self.Options.__qualname__}, not {type(options).__name__}")
        self.options = options
        self._params: list[nn.Parameter] = []
        """The prepared model's parameters that train (set by `prepare`)."""
        self._param_ids: frozenset[int] | None = None
        """ids of all the prepared model's parameters; None before `prepare`."""
        self._guard: StepGuard | None = None
        self._micro = 0
        """Micro-steps done in the current update (0 .. grad_accum - 1)."""
        self._averaged: bool | None = None
        """After `synchronize()`: whether the coming step applies (None: not yet averaged)."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "Options" in cls.__dict__:
            cls.Options._owner = cls

    def __repr__(self) -> str:
        shown = ", ".join(f"{f.name}={getattr(self.options, f.name)!r}" for f in dataclasses.fields(self.options))
        return f"{type(self).__name__}({shown})"

    def not_prepared(self) -> RuntimeError:
        return RuntimeError(f"{type(self).__name__}: call prepare(model, optimizer) first")

    # ------------------------------------------------------------------ setup
    @abc.abstractmethod
    def prepare(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        example: tuple[Any, Any] | None = None,
    ) -> tuple[nn.Module, PreparedOptimizer | None]:
        """Build the live state: wrap or split the model, prepare the optimizer if given.

        Without an optimizer the second item is None: build it on the prepared
        model's parameters and give it to `prepare_optimizer`. `example`, a
        batch (x, y), lets a strategy measure the model (a pipeline balances
        its stages by time); every strategy accepts it.
        """

    def finish_prepare(
        self, model: nn.Module, optimizer: torch.optim.Optimizer | None, replaced: Sequence[nn.Parameter] = ()
    ) -> tuple[nn.Module, PreparedOptimizer | None]:
        """The end of `prepare`: remember the prepared model's parameters, then prepare the
        optimizer, or (without one) watch that the loop does not train around the strategy.

        `replaced`: the model's parameters before `prepare` split it (a sharding strategy's).
        """
        params = list(model.parameters())
        self._params = [p for p in params if p.requires_grad]
        self._param_ids = frozenset(map(id, params))
        if optimizer is not None:
            return model, self.prepare_optimizer(optimizer)
        gone = [p for p in replaced if id(p) not in self._param_ids]
        needs = self.step_needs()
        if needs or gone:
            sentence = (
                f"{type(self).__name__} applies {', '.join(needs)} at optimizer.step(), but the optimizer "
                "was not prepared, so it would train without them: pass it to prepare(model, optimizer), "
                "or call optimizer = strategy.prepare_optimizer(optimizer) after prepare(model)"
            )
            self._guard = StepGuard(model, self._params, gone, sentence if needs else "")
        return model, None

    def prepare_optimizer(self, optimizer: torch.optim.Optimizer) -> PreparedOptimizer:
        """Make `optimizer` (the same object) step through this strategy.

        For an optimizer built after `prepare(model)` on the prepared model's
        parameters, as the DDP and FSDP tutorials do; `prepare(model,
        optimizer)` calls it too.
        """
        if self._param_ids is None:
            raise ShoalError(
                f"{type(self).__name__}: call prepare(model) before prepare_optimizer(optimizer), "
                "or pass the optimizer to prepare(model, optimizer)"
            )
        if any(id(p) not in self._param_ids for g in optimizer.param_groups for p in g["params"]):
            raise ShoalError(optim.REPLACED if self._guard and self._guard.replaced else NOT_OURS)
        if self._guard is not None:
            self._guard.remove()
            self._guard = None
        return optim.prepare_optimizer(optimizer, self)

    def step_needs(self) -> list[str]:
        """What this strategy does at `optimizer.step()` that a plain optimizer would skip (empty: nothing)."""
        needs = []
        if self.grad_accum > 1:
            needs.append(f"grad_accum={self.grad_accum}")
        if self.clip_norm is not None:
            needs.append(f"clip_norm={self.clip_norm}")
        return needs

    @property
    def grad_accum(self) -> int:
        """Micro-batches (calls of `optimizer.step()`) per applied update (the `grad_accum` option, if any)."""
        return getattr(self.options, "grad_accum", 1)

    @property
    def clip_norm(self) -> float | None:
        """Clip the averaged gradients to this global norm before applying (the `clip_norm` option, if any)."""
        return getattr(self.options, "clip_norm", None)

    def trained_parameters(self) -> list[nn.Parameter]:
        """The prepared model's parameters that train, on this rank."""
        if self._param_ids is None and not self._params:
            raise self.not_prepared()
        return self._params

    @property
    def data_rank(self) -> int:
        """This rank's index among the ranks that see different data."""
        return runtime.current().rank

    @property
    def data_world(self) -> int:
        return runtime.current().world_size

    def data_group(self) -> dist.ProcessGroup | None:
        """The process group over which data is split (None: the world)."""
        return None

    def data_shard(self) -> tuple[int, int]:
        """(data_rank, data_world), read by loaders and samplers when a pass starts."""
        return self.data_rank, self.data_world

    def loader(
        self,
        dataset: Samples,
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        *,
        drop_last: bool = True,
        num_workers: int = 0,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        **dataloader_kwargs: Any,
    ) -> ShardedLoader:
        """This rank's shard of `dataset`, `batch_size` samples per rank per step, on this rank's device.

        Split by the data-parallel rank when iteration starts, so it may be
        made before `prepare`. Other `DataLoader` arguments (`pin_memory`,
        `persistent_workers`, `generator`, ...) pass through.
        """
        samples = cast(Sequence[Any], dataset)  # the loader needs only len() and items
        return ShardedLoader(
            samples,
            batch_size,
            self.data_shard,
            shuffle,
            seed,
            runtime.current().device,
            drop_last=drop_last,
            num_workers=num_workers,
            collate_fn=collate_fn,
            **dataloader_kwargs,
        )

    def sampler(self, dataset: Samples, shuffle: bool = True, seed: int = 0, drop_last: bool = False) -> DataSampler:
        """`DistributedSampler` by the data-parallel rank, for your own `DataLoader(dataset, b, sampler=...)`."""
        return DataSampler(dataset, self.data_shard, shuffle, seed, drop_last)

    # ------------------------------------------------------------------ steps
    def compute_loss(self, model: nn.Module, loss_fn: LossFn, x: Any, y: torch.Tensor) -> torch.Tensor:
        """The loss of one batch, ready for `backward()`."""
        return loss_fn(model(x), y)

    def train_step(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: LossFn, batch: tuple[Any, torch.Tensor]
    ) -> torch.Tensor:
        """One micro-step of the ordinary loop; returns the detached loss."""
        x, y = batch
        loss = self.compute_loss(model, loss_fn, x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return loss.detach()

    def synchronize(self) -> bool:
        """Average the gradients now, before `optimizer.step()` (to clip or inspect them by hand).

        The following `step()` applies them without averaging again. True if
        that step applies the gradients now in `.grad`; False if it will not
        (an accumulating micro-step, or a step to be skipped).
        """
        if self._micro < self.grad_accum - 1:
            return False  # an accumulating micro-step: the gradients are partial sums
        if self._averaged is None:
            self._averaged = self.average_gradients()
        return self._averaged

    def average_gradients(self) -> bool:
        """Make `.grad` this update's mean gradient; False if the step must not apply.

        Here the backward has averaged over ranks: what is left is the mean
        over `grad_accum` micro-steps.
        """
        if self.grad_accum > 1:
            for p in self.trained_parameters():
                if p.grad is not None:
                    p.grad.div_(self.grad_accum)
        return True

    def set_gradient_sync(self, sync: bool) -> None:
        """Whether the next backward communicates (False: it only accumulates local gradients)."""
        return None

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backward passes within accumulate local gradients without communicating, as DDP's
        `model.no_sync()`; the next backward outside it communicates their sum."""
        self.set_gradient_sync(False)
        try:
            yield
        finally:
            self.set_gradient_sync(self._micro == self.grad_accum - 1)

    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        """Average the gradients now (as `synchronize()`), then clip their global norm over all
        the model's parameters, across shards and ranks; the total norm before clipping, as torch's.

        On a step that will not apply (an accumulating micro-step, a skipped
        step) nothing is clipped and the norm is NaN.
        """
        if not self.synchronize():
            return torch.tensor(float("nan"))
        return self.clip_gradients(max_norm, norm_type)

    def clip_gradients(self, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        """Clip the averaged gradients of the whole model to `max_norm`; their norm before clipping."""
        return clip_global_norm(self.trained_parameters(), max_norm, norm_type)

    def optimizer_step(self, optimizer: PreparedOptimizer, closure: Closure | None) -> float | None:
        """What the prepared optimizer's `step()` does: hold an accumulating micro-step, else
        average (if `synchronize()` has not), clip, and take the optimizer's own step."""
        if self._micro < self.grad_accum - 1:
            self._micro += 1
            self.set_gradient_sync(self._micro == self.grad_accum - 1)
            return None
        applies = self.synchronize()
        self._micro, self._averaged = 0, None
        self.set_gradient_sync(self.grad_accum == 1)
        if not applies:
            self.skip_step()
            return None
        if self.clip_norm is not None:
            self.clip_gradients(self.clip_norm)
        return self.apply_step(optimizer, closure)

    def skip_step(self) -> None:
        """A step whose gradients must not be applied (`average_gradients` said so): drop them."""
        for p in self.trained_parameters():
            p.grad = None

    def apply_step(self, optimizer: PreparedOptimizer, closure: Closure | None) -> float | None:
        """Apply the averaged, clipped gradients: the optimizer's own step."""
        return optimizer.local_step(closure)

    def optimizer_zero_grad(self, optimizer: PreparedOptimizer, set_to_none: bool) -> None:
        """What the prepared optimizer's `zero_grad()` does (keeps an unfinished accumulation)."""
        if self._micro == 0:
            optimizer.local_zero_grad(set_to_none)

    def step_metrics(self) -> dict[str, float]:
        """Strategy-specific figures for the last step (bytes sent, wait time, ...)."""
        return {}

    # ------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self, model: nn.Module, dataset: Samples, loss_fn: LossFn, batch_size: int = 512) -> dict[str, float]:
        """Accuracy and mean loss over the whole held-out set, each rank taking a share."""
        device = runtime.current().device
        was_training = model.training
        model.eval()
        idx = eval_shard(len(dataset), self.data_rank, self.data_world)
        totals = torch.zeros(3, dtype=torch.float64)
        # Every rank runs the same number of batches (some may be empty): sharded
        # and model-parallel forwards are collective.
        longest = -(-len(dataset) // self.data_world)
        for start in range(0, longest, batch_size):
            x, y = fetch(dataset, idx[start : start + batch_size], device)
            out = model(x)
            if out is not None and y.numel():  # None: the output is on another pipeline stage
                totals += eval_totals(out, y, loss_fn)
        self.reduce_eval_totals(totals)
        model.train(was_training)
        return {"eval_loss": totals[0].item() / totals[2].item(), "eval_accuracy": totals[1].item() / totals[2].item()}

    def reduce_eval_totals(self, totals: torch.Tensor) -> None:
        """Sum the evaluation totals over the ranks that hold some."""
        self.all_reduce_sum(totals)

    def mean_over_ranks(self, value: float | torch.Tensor) -> float:
        """The mean of each rank's own figure over the data-parallel ranks: the same number on
        every rank (collective: every rank calls it).

        For the decisions a script takes on each rank alone (anneal the learning
        rate when validation got worse, keep the best model, stop early): under
        ASP/SSP every rank holds a different model, so its own figure would lead
        each rank its own way.
        """
        total = self.all_reduce_sum(torch.tensor([float(value)], dtype=torch.float64))
        return float(total[0]) / max(1, self.data_world)

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum a small CPU tensor over the data-parallel ranks (in place)."""
        if dist.is_initialized() and self.data_world > 1:
            moved = t.to(runtime.current().device)
            dist.all_reduce(moved, group=self.data_group())
            t.copy_(moved.cpu())
        return t

    # ------------------------------------------------------------- checkpoints
    def checkpoint_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """Model and optimizer state for `torch.distributed.checkpoint`, keyed by parameter names.

        Collective. The same keys on every rank hold one tensor (replicated or
        sharded), so a checkpoint loads into another layout.
        """
        from torch.distributed.checkpoint.state_dict import get_state_dict

        with local_only(optimizer):  # torch steps the optimizer to create empty state
            model_sd, optim_sd = get_state_dict(self.unwrap(model), optimizer)
        return {"model": model_sd, "optim": optim_sd}

    def load_checkpoint_state(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        """Put what `checkpoint_state` made (filled from a checkpoint) into the model and optimizer."""
        from torch.distributed.checkpoint.state_dict import set_state_dict

        with local_only(optimizer):
            set_state_dict(
                self.unwrap(model), optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
            )

    def full_state_dict(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any]:
        """The whole model (and optimizer) state on every rank, as CPU tensors: what a script saves.

        Collective. `{"model": ..., "optimizer": ...}` ("optimizer" only when
        one is given): the model under the plain module's names, loadable into
        the unprepared model with `load_state_dict`; the optimizer as torch's
        full optimizer state dict, keyed by parameter names. Sharded and split
        tensors are gathered, so it loads under any strategy and world size.
        """
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        module = self.unwrap(model)
        state: dict[str, Any] = {"model": get_model_state_dict(module, options=full_options())}
        if optimizer is not None:
            fresh = not optimizer.state  # the same on every rank: they step together
            with local_only(optimizer):  # torch steps the optimizer to create empty state
                state["optimizer"] = get_optimizer_state_dict(module, optimizer, options=full_options())
            if fresh:  # ... which a fresh optimizer must not keep (Adam's step count would be 1)
                optimizer.state.clear()
                state["optimizer"]["state"] = {}
        return cpu_copy(state)

    def load_full_state_dict(
        self, model: nn.Module, state: dict[str, Any], optimizer: torch.optim.Optimizer | None = None
    ) -> None:
        """Load what `full_state_dict` returned (saved under any strategy and world size). Collective."""
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        module = self.unwrap(model)
        check_full_state(module, state, optimizer is not None)
        # torch rewrites the dicts it is given: hand it copies of the containers.
        set_model_state_dict(module, copy_containers(state["model"]), options=full_options())
        if optimizer is not None:
            saved = state["optimizer"]
            # torch's whole-tensor path needs a tensor to distribute; hyperparameters alone
            # (a stateless optimizer such as plain SGD, or one saved before its first step)
            # load as they are.
            options = full_options(whole=has_arrays(saved.get("state", {})))
            # Hyperparameters the saved groups have and these lack (`initial_lr`, which an LR
            # scheduler adds) fail torch's whole-tensor path; loading sets them all anyway.
            for group, saved_group in zip(optimizer.param_groups, saved.get("param_groups", []), strict=False):
                for key, value in saved_group.items():
                    group.setdefault(key, value)
            with local_only(optimizer):
                set_optimizer_state_dict(module, optimizer, copy_containers(saved), options=options)
            if not saved.get("state"):  # saved before the first step: torch's zero state must go
                optimizer.state.clear()

    def state_dict(self) -> dict[str, Any]:
        """This rank's own state: plain JSON values and tensors (e.g. error-feedback residuals)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned (keys it does not know are ignored)."""
        return None

    def unwrap(self, model: nn.Module) -> nn.Module:
        """The user's module inside whatever wrapper `prepare` put around it."""
        return model

    def close(self) -> None:
        """Release what `prepare` opened (connections, hooks)."""
        return None


def eval_totals(out: torch.Tensor, y: torch.Tensor, loss_fn: LossFn) -> torch.Tensor:
    """(loss sum, correct, count) per target: samples, or tokens of a language model."""
    n = y.numel()
    return torch.tensor([float(loss_fn(out, y)) * n, float((out.argmax(-1) == y).sum()), n], dtype=torch.float64)


def clip_global_norm(params: list[nn.Parameter], max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
    """torch's `clip_grad_norm_` over `params` (DTensor gradients included); the total norm as a plain tensor."""
    from torch.distributed.tensor import DTensor

    norm = torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm
