"""The optimizer `prepare` returns: the user's own object, given a subclass of its class.

A strategy works when the user calls `optimizer.step()` (apply after an
all-reduce, push to the servers, hold an accumulating micro-step), yet the
object must stay the user's optimizer: the same object, `isinstance` of its
class, its `param_groups`, `state_dict()`/`load_state_dict()`, and LR
schedulers made before or after `prepare`. As Horovod's
`DistributedOptimizer` does, the instance gets a subclass of its own class
(built once per class, under the same name) whose `step`/`zero_grad` ask the
strategy; the strategy applies with `local_step`, the class's own step.
`state_dict`/`load_state_dict` ask the strategy too where it defines
`optimizer_state_dict`/`optimizer_load_state_dict` (the parameter server,
whose servers hold the state); elsewhere they are the class's own.
Nothing is patched onto the instance.
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol, cast

import torch
from torch.utils._pytree import tree_leaves

from shoal import faults, runtime
from shoal.errors import ShoalError

Closure = Callable[[], float]


class StepHooks(Protocol):
    """What a strategy does at the prepared optimizer's `step()` and `zero_grad()`."""

    def optimizer_step(self, optimizer: PreparedOptimizer, closure: Closure | None) -> float | None: ...

    def optimizer_zero_grad(self, optimizer: PreparedOptimizer, set_to_none: bool) -> None: ...


@dataclass
class _Binding:
    hooks: StepHooks
    calls: int = 0
    """`step()` calls so far: a worker's step number in the fault schedule."""
    local: int = 0
    """> 0 inside `local_only()`: the class's own step and zero_grad, no strategy."""


class PreparedOptimizer(torch.optim.Optimizer):
    """The base that `prepare_optimizer` puts in front of the user's optimizer class.

    Never instantiated: an optimizer object becomes one when it is prepared.
    """

    _binding: _Binding

    def step(self, closure: Closure | None = None) -> float | None:
        binding = self._binding
        if binding.local:
            return self.local_step(closure)
        binding.calls += 1
        faults.at_step("worker", runtime.current().rank, binding.calls)
        self._opt_called = True  # what an LR scheduler's call tracking records (see prepare_optimizer)
        return binding.hooks.optimizer_step(self, closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        if self._binding.local:
            self.local_zero_grad(set_to_none)
        else:
            self._binding.hooks.optimizer_zero_grad(self, set_to_none)

    def state_dict(self) -> dict[str, Any]:
        hook = getattr(self._binding.hooks, "optimizer_state_dict", None)
        if self._binding.local or hook is None:
            return self.local_state_dict()
        return hook(self)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        hook = getattr(self._binding.hooks, "optimizer_load_state_dict", None)
        if self._binding.local or hook is None:
            self.local_load_state_dict(state_dict)
        else:
            hook(self, state_dict)

    def local_state_dict(self) -> dict[str, Any]:
        """The optimizer class's own state_dict: the state this process holds."""
        return super().state_dict()

    def local_load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """The optimizer class's own load_state_dict."""
        super().load_state_dict(state_dict)

    def local_step(self, closure: Closure | None = None) -> float | None:
        """The optimizer class's own step: update the parameters from their `.grad` now."""
        return super().step(closure)

    def local_zero_grad(self, set_to_none: bool = True) -> None:
        """The optimizer class's own zero_grad."""
        super().zero_grad(set_to_none)


# torch reads two marks on an optimizer's step function. `hooked`: the step
# hooks already run around it (they do, inside the class's own step), so
# `Optimizer.load_state_dict` must not wrap ours again. `_wrapped_by_lr_sched`:
# an LR scheduler need not wrap it to see that it ran (ours sets `_opt_called`).
_marks = cast(Any, PreparedOptimizer.step)
_marks.hooked = True
_marks._wrapped_by_lr_sched = True


@functools.cache
def prepared_class(base: type[torch.optim.Optimizer]) -> type[PreparedOptimizer]:
    """`base` behind PreparedOptimizer's step/zero_grad, under base's name; one per class."""
    namespace = {"__module__": __name__, "__qualname__": base.__qualname__, "__doc__": base.__doc__}
    return cast(type[PreparedOptimizer], type(base.__name__, (PreparedOptimizer, base), namespace))


def prepare_optimizer(optimizer: torch.optim.Optimizer, hooks: StepHooks) -> PreparedOptimizer:
    """Make `optimizer` (the same object) call `hooks` at `step()` and `zero_grad()`."""
    own = vars(optimizer)
    if "step" in own:
        # An LR scheduler made before prepare() put a call-counting wrapper of the
        # class's own step on the instance: it would bypass the strategy. It goes;
        # the prepared step keeps the scheduler's record (`_opt_called`).
        if not getattr(own["step"], "_wrapped_by_lr_sched", False):
            raise ShoalError(
                "this optimizer's step() was replaced on the object itself; prepare() the optimizer before changing it"
            )
        del own["step"]
    if not isinstance(optimizer, PreparedOptimizer):
        optimizer.__class__ = prepared_class(type(optimizer))
    prepared = cast(PreparedOptimizer, optimizer)
    prepared._binding = _Binding(hooks)
    return prepared


@contextlib.contextmanager
def local_only(optimizer: torch.optim.Optimizer) -> Iterator[torch.optim.Optimizer]:
    """Within the block, `step`/`zero_grad` are the class's own, without the strategy.

    torch's checkpoint helpers step an optimizer with zero gradients to create its state.
    """
    if not isinstance(optimizer, PreparedOptimizer):
        yield optimizer
        return
    optimizer._binding.local += 1
    try:
        yield optimizer
    finally:
        optimizer._binding.local -= 1


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


class StepGuard:
    """Stops a loop that trains around the strategy with an optimizer it never prepared.

    Two mistakes train wrong in silence: an optimizer still holding the
    parameters a sharding strategy replaced (its step changes nothing), and,
    where the strategy acts at `step()` (`needs`), any unprepared optimizer of
    the model. torch's global step pre-hook sees every optimizer's `step()`;
    a loop that never calls `step()` (updating `p.data` by hand) is stopped at
    the training forward after a backward. A forward before any backward (a
    dry run to build lazy modules) and forwards in eval mode or without
    gradients pass.
    """

    def __init__(
        self, model: torch.nn.Module, ours: list[torch.nn.Parameter], replaced: list[torch.nn.Parameter], needs: str
    ) -> None:
        from torch.optim.optimizer import register_optimizer_step_pre_hook

        self.needs = needs
        """The sentence for an unprepared optimizer under options that act at step() ('' if none)."""
        self.ours = frozenset(map(id, ours))  # the strategy holds these: their ids stay theirs
        self.replaced: weakref.WeakValueDictionary[int, torch.nn.Parameter] = weakref.WeakValueDictionary(
            (id(p), p) for p in replaced
        )
        self.backward_seen = False
        me = weakref.ref(self)
        self.handles = [register_optimizer_step_pre_hook(lambda opt, args, kwargs: _check_step(me, opt))]
        if needs:
            self.handles += [model.register_forward_pre_hook(self._before), model.register_forward_hook(self._after)]
        weakref.finalize(self, _remove_all, list(self.handles))

    def check_step(self, optimizer: torch.optim.Optimizer) -> None:
        if isinstance(optimizer, PreparedOptimizer):
            return  # it steps through a strategy
        params = [p for g in optimizer.param_groups for p in g["params"]]
        if any(self.replaced.get(id(p)) is p for p in params):
            raise ShoalError(REPLACED)
        if self.needs and any(id(p) in self.ours for p in params):
            raise ShoalError(self.needs)

    def _before(self, module: torch.nn.Module, args: Any) -> None:
        if self.backward_seen and module.training and torch.is_grad_enabled():
            raise ShoalError(self.needs)

    def _after(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        if not (module.training and torch.is_grad_enabled()):
            return
        for t in tree_leaves(output):
            if isinstance(t, torch.Tensor) and t.requires_grad:
                t.register_hook(self._seen)
                return

    def _seen(self, grad: torch.Tensor) -> None:
        self.backward_seen = True

    def remove(self) -> None:
        _remove_all(self.handles)


REPLACED = (
    "this optimizer holds the model's parameters from before prepare(), which the strategy replaced to split "
    "the model, so its step would change nothing: build it on model.parameters() of the model that "
    "prepare(model) returned, or pass it to prepare(model, optimizer)"
)


def _check_step(guard: Callable[[], StepGuard | None], optimizer: torch.optim.Optimizer) -> None:
    alive = guard()
    if alive is not None:
        alive.check_step(optimizer)


def _remove_all(handles: list[Any]) -> None:
    for h in handles:
        h.remove()


def steps_called(optimizer: torch.optim.Optimizer) -> int:
    """The prepared optimizer's `step()` calls so far (0 for one that is not prepared)."""
    return optimizer._binding.calls if isinstance(optimizer, PreparedOptimizer) else 0


def count_steps_from(optimizer: torch.optim.Optimizer, calls: int) -> None:
    """Continue the `step()` count (the fault schedule's step number) from `calls`, after a resume."""
    if isinstance(optimizer, PreparedOptimizer):
        optimizer._binding.calls = calls
