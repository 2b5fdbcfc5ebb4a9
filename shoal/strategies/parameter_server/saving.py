"""Saving and loading under the parameter server: the servers hold the state.

`optimizer.state_dict()` fetches the servers' optimizer state in torch's
format, `optimizer.load_state_dict()` (or state loaded before `prepare`)
puts it back through worker 0 before the first step, `full_state_dict` /
`load_full_state_dict` use parameter names, and `checkpoint_state` is what
`shoal train` saves. A fetch is answered once every worker has pushed as
many clocks (one consistent cut); a restore only before the first push.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from shoal import runtime
from shoal.compress import Compressor
from shoal.errors import ShoalError
from shoal.ps.client import Client
from shoal.ps.pull_codec import PullDecoder
from shoal.strategies.base import Strategy
from shoal.strategies.optimizer import PreparedOptimizer, local_only
from shoal.strategies.parameter_server import checkpoint
from shoal.strategies.parameter_server.guard import Installed
from shoal.strategies.parameter_server.layout import Layout
from shoal.strategies.parameter_server.live import LiveRow, StepWindow, Totals
from shoal.strategies.parameter_server.overlap import Overlap


@dataclass
class Session:
    """What `prepare` builds: the connection to the servers and where this worker is."""

    client: Client
    layout: Layout
    optimizer: torch.optim.Optimizer
    optim: str
    compressor: Compressor
    installed: Installed
    pulls: PullDecoder
    live: LiveRow | None = None
    overlap: Overlap | None = None
    """Pushes during backward (None: at step() only)."""
    clock: int = 0
    micro: int = 0
    """`step()` calls since the last push (grad_accum)."""
    pending: bool = False
    """A pull was requested and its parameters are not yet in the model."""
    window: StepWindow = field(default_factory=StepWindow)
    totals: Totals = field(default_factory=Totals)


class ServerSaving(Strategy):
    """The parameter server's saving and loading; `ParameterServer` supplies the session and pulls."""

    _session: Session | None

    @property
    @abc.abstractmethod
    def session(self) -> Session: ...

    @abc.abstractmethod
    def sync(self) -> None: ...

    @abc.abstractmethod
    def refresh(self) -> None: ...

    def _fetch(self, optimizer: torch.optim.Optimizer | None) -> None:
        """The servers' values into the model and their optimizer state into `optimizer`'s
        `state`, once every worker has pushed as many clocks as this one."""
        self.sync()
        s = self.session
        checkpoint.take_server_state(s.client.state(s.clock), s.layout.slices, optimizer)
        s.installed.record()

    def _restore(self, optimizer: torch.optim.Optimizer | None, only_if_state: bool = False) -> None:
        """Worker 0 puts the model's values and `optimizer`'s state on the servers; collective.

        Only before the first push (the servers refuse a restore after it). The
        workers' copy of the state is dropped: the servers own it from here."""
        s = self._before_first_step()
        if runtime.current().rank == 0 and not (only_if_state and optimizer is None):
            s.client.restore(*checkpoint.server_state(s.layout.slices, optimizer))
        if dist.is_initialized():
            dist.barrier()  # no worker pushes or pulls before the servers hold it
        s.optimizer.state.clear()
        if not only_if_state:
            self.refresh()  # every worker takes worker 0's values

    def _before_first_step(self) -> Session:
        """The session; ShoalError once a step was taken (the servers accept saved state only before)."""
        s = self.session
        if s.clock or s.micro:
            raise ShoalError(
                "the parameter server loads saved state only before the first optimizer.step(); "
                "load the model and optimizer state right after prepare() (or before it)"
            )
        return s

    def optimizer_state_dict(self, optimizer: PreparedOptimizer) -> dict[str, Any]:
        """`optimizer.state_dict()`: torch's format, the state the servers hold (fetched now).

        Any worker may call it alone (rank 0 saving a snapshot): the servers answer once
        every worker has pushed as many clocks, which in BSP they already have."""
        if self._session is None:
            raise ShoalError(
                "the servers hold the optimizer state and this strategy was closed; "
                "call optimizer.state_dict() before strategy.close()"
            )
        self._fetch(optimizer)
        state = optimizer.local_state_dict()
        optimizer.state.clear()  # `state` keeps the tensors; the servers keep the truth
        return state

    def optimizer_load_state_dict(self, optimizer: PreparedOptimizer, state: dict[str, Any]) -> None:
        """`optimizer.load_state_dict()`: load it, then worker 0 puts it (and the model's current values)
        on the servers. Collective, before the first step."""
        self._before_first_step()
        optimizer.local_load_state_dict(state)
        self._restore(optimizer)

    def full_state_dict(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any]:
        """{"model": {name: CPU tensor}, "optimizer": torch's full optimizer state keyed by names}, the
        servers' current state on every worker ("optimizer" only when given). Collective."""
        self.sync()
        if dist.is_initialized():
            dist.barrier()  # every worker's pushes are in: all take the same cut
        self._fetch(optimizer)
        out: dict[str, Any] = {"model": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}}
        if optimizer is not None:
            with local_only(optimizer):
                out["optimizer"] = checkpoint.by_name(model, optimizer, optimizer.state_dict())
            optimizer.state.clear()
        return out

    def load_full_state_dict(
        self, model: nn.Module, state: dict[str, Any], optimizer: torch.optim.Optimizer | None = None
    ) -> None:
        """Load what `full_state_dict` gave (from any strategy) and put it on the servers. Collective,
        before the first step; without `optimizer` the servers' optimizer state starts afresh."""
        if self._session is not None:
            self._before_first_step()
        model.load_state_dict(state["model"])
        if optimizer is not None:
            with local_only(optimizer):
                optimizer.load_state_dict(checkpoint.by_index(model, optimizer, state["optimizer"]))
        if self._session is not None:
            self._restore(optimizer)

    def checkpoint_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """The servers' values and optimizer state, as torch's own state dicts.

        Every worker must call this at the same step (the trainer does): the
        servers answer once all workers have pushed that many clocks, so every
        worker holds the same cut. The optimizer state is put into the local
        optimizer in torch's layout, which makes the checkpoint independent of
        placement: it resumes with other server counts, or as data_parallel.
        """
        self._fetch(optimizer)
        state = super().checkpoint_state(model, optimizer)
        self.session.installed.record()  # torch may step with lr 0 to create empty state: same values
        return state

    def load_checkpoint_state(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        """Load into the local copies, then worker 0 puts them on the servers."""
        super().load_checkpoint_state(model, optimizer, state)
        self._restore(optimizer)
