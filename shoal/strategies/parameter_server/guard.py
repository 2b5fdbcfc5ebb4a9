"""Catch a loop that trains the wrong thing under the parameter server without a word.

The servers apply every update; a worker's parameters change only when
shoal installs what the servers sent. A loop that updates them itself
(`p.data.add_(p.grad, alpha=-lr)`, as pytorch/examples' word_language_model
does, or another optimizer) would train one model per worker while the
servers never move; a loop that never calls the prepared `step()` pushes
nothing. `Installed` remembers, after every install, each parameter's
version counter and a sample of its values (`p.data.add_` does not bump the
version, so the sample catches it), and counts backward passes since the
last `step()` (new or grown `.grad` tensors between two forwards; an
evaluation forward has none); the model's forward pre-hook checks at every
training forward and stops the run in one sentence.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

from shoal.errors import ShoalError
from shoal.strategies.parameter_server.layout import Slice

SAMPLES_PER_SLICE = 16
SAMPLED_SLICES = 32
"""Values are compared on this many slices (spread over the model), this many elements each."""
MAX_BACKWARDS_WITHOUT_STEP = 256
"""Backward passes without a `step()` before the run is stopped (more than any accumulation by hand)."""

CHANGED = (
    "the model's parameters changed outside optimizer.step() (a hand-written update such as "
    "p.data.add_(p.grad, alpha=-lr), another optimizer, or model.load_state_dict() after prepare()), but under "
    "the parameter server the servers apply every update, so call optimizer.step() on the optimizer given to "
    "prepare(), and load saved parameters before prepare() or with strategy.load_full_state_dict()"
)
NO_OPTIMIZER = (
    "the parameter server trains with an optimizer on its servers and has none yet: call "
    "strategy.prepare_optimizer(optimizer) (or pass it to strategy.prepare(model, optimizer)) before training"
)


def no_step(backwards: int) -> str:
    return (
        f"{backwards} backward passes ran without optimizer.step(), so no gradient reached the parameter "
        "servers; call optimizer.step() on the optimizer given to prepare() after backward() (to accumulate "
        "gradients, ParameterServer(grad_accum=k) with a step() per micro-batch)"
    )


class Installed:
    """What shoal last put into the parameters: version counters and sampled values."""

    def __init__(self, slices: list[Slice]) -> None:
        self.params = list({id(h.param): h.param for h in slices}.values())
        every = max(1, -(-len(slices) // SAMPLED_SLICES))
        self.sampled = []
        for h in slices[::every]:
            n = h.stop - h.start
            idx = torch.linspace(0, n - 1, min(n, SAMPLES_PER_SLICE)).round().long().to(h.param.device)
            self.sampled.append((h, idx))
        self.versions: list[int] = []
        self.sample = torch.empty(0)
        self.backwards = 0
        """Backward passes seen since the last `step()` or install."""
        self.grads: list[tuple[int, int] | None] = []

    @torch.no_grad()
    def _values(self) -> torch.Tensor:
        if not self.sampled:
            return torch.empty(0)
        return torch.cat([h.flat(h.param.detach())[idx] for h, idx in self.sampled])

    def record(self) -> None:
        """Call after every install: this is what the parameters hold now."""
        self.versions = [p._version for p in self.params]
        self.sample = self._values().clone()
        self.stepped()

    def stepped(self) -> None:
        """Call at every `step()`: the gradients so far were handed over."""
        self.backwards = 0
        self.grads = self._grads()

    def _grads(self) -> list[tuple[int, int] | None]:
        return [None if p.grad is None else (id(p.grad), p.grad._version) for p in self.params]

    def check(self) -> None:
        """At a training forward: ShoalError if the loop changed the parameters or never steps."""
        if [p._version for p in self.params] != self.versions or not torch.equal(self._values(), self.sample):
            raise ShoalError(CHANGED)
        grads = self._grads()
        if grads != self.grads and any(g is not None for g in grads):
            self.backwards += 1  # a backward ran since the last forward
            self.grads = grads
            if self.backwards >= MAX_BACKWARDS_WITHOUT_STEP:
                raise ShoalError(no_step(self.backwards))


def training(module: torch.nn.Module) -> bool:
    """Whether a forward of `module` now is a training one (not an evaluation)."""
    return module.training and torch.is_grad_enabled()


class ForwardHook:
    """The prepared model's forward pre-hook: calls `strategy.before_forward`.

    It holds the strategy weakly and pickles as a hook that does nothing, so
    `torch.save(model)` works (the strategy holds ZeroMQ sockets) and a model
    loaded elsewhere, with no servers, runs as a plain module."""

    def __init__(self, strategy: Any = None) -> None:
        self._ref = weakref.ref(strategy) if strategy is not None else None

    def __call__(self, module: torch.nn.Module, inputs: tuple[Any, ...]) -> None:
        strategy = self._ref() if self._ref is not None else None
        if strategy is not None:
            strategy.before_forward(module, inputs)

    def __reduce__(self) -> tuple[type, tuple[()]]:
        return (ForwardHook, ())
