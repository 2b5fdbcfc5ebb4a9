"""The parameter-server strategy: data split over workers, parameters sharded
over server processes, consistency chosen per run or per parameter.

    strategy = ParameterServer(consistency="ssp", staleness=3, overrides={"embedding.*": "asp"})
    model, optimizer = strategy.prepare(model, optimizer)
    # loss.backward(); optimizer.step()   # pushes gradients, asks for fresh parameters
    # optimizer.zero_grad()

`optimizer.step()` does not update parameters locally: it sends the
gradients to the servers that hold each piece (the user's optimizer runs
there, see `shoal.ps.optim`), asks for the next parameters and puts them
into the model before it returns, as a local step would: right after
`step()`, `model.state_dict()`, a hand-written evaluation or a comparison
with one process see the new values, in every mode. When the pull is
answered is the consistency rule's business (`shoal.ps.consistency`,
docs/consistency.md); with `bsp` the run equals one process with the
combined batch. The servers average the gradients, so a worker has no
averaged gradient: `synchronize()`, `clip_grad_norm_()` and `clip_norm` are
refused; `grad_accum=k` pushes the mean of k micro-batches' gradients once
per k calls of `step()`. With `overlap` (the default) most gradients leave
during backward, as each is computed (`parameter_server.overlap`); `step()`
sends the rest.

The servers hold the optimizer state: `optimizer.state_dict()` fetches it
(torch's format, so `torch.save` / `load_state_dict` resume AdamW's
moments), `optimizer.load_state_dict()` before the first step puts it on
the servers, as does an optimizer loaded before `prepare`. `prepare(model)`
without an optimizer waits for `prepare_optimizer(optimizer)` to connect
(the servers run the optimizer's class). A loop that changes the parameters
itself is stopped at its next forward (`guard`).

A worker that is restarted while the servers run (`shoal run --max-restarts`)
rejoins them in `prepare`: the servers answer with its clock (the pushes they
hold from it, `strategy.clock`) and the current parameters, so it never pushes
a clock twice; its loop goes on from that step (`shoal train` does, deriving
its data position from the step). Killed between its pushes to two servers, it
goes on from the lower clock with the values from before that push
(`joining.joined_at`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, overload

import torch
import torch.distributed as dist
from torch import nn

from shoal import env, runtime
from shoal.comm.pubsub import Publisher
from shoal.compress import parse as parse_compression
from shoal.compress.sparse import corrected_momentum
from shoal.config import check_range
from shoal.data.loader import Samples
from shoal.errors import ConfigError, ShoalError
from shoal.ps import optim as ps_optim
from shoal.ps.client import Client, Replies
from shoal.ps.consistency import Mode, parse_mode, resolve
from shoal.ps.pull_codec import PullDecoder
from shoal.state import sub_state, with_prefix
from shoal.strategies.base import LossFn, StrategyOptions
from shoal.strategies.optimizer import Closure, PreparedOptimizer, prepare_optimizer
from shoal.strategies.parameter_server.guard import NO_OPTIMIZER, ForwardHook, Installed, training
from shoal.strategies.parameter_server.joining import find_servers, joined_at, leave_at_exit
from shoal.strategies.parameter_server.layout import (
    Placement,
    check_overrides_match,
    encode_pushes,
    lay_out,
    served_parameters,
    server_hyperparameters,
)
from shoal.strategies.parameter_server.live import LiveRow, StepWindow
from shoal.strategies.parameter_server.overlap import Overlap, overlaps
from shoal.strategies.parameter_server.saving import ServerSaving, Session

log = logging.getLogger(__name__)
COMPRESSION = "compression/"


class ParameterServer(ServerSaving):
    """Parameters on server processes: `ParameterServer(consistency="bsp", staleness=0, servers=None, ...)`."""

    name = "parameter_server"

    @dataclass(frozen=True, kw_only=True, slots=True)
    class Options(StrategyOptions):
        consistency: str = "bsp"
        staleness: int = 0
        overrides: dict[str, str] = field(default_factory=dict)
        """Glob on parameter names -> 'bsp' | 'asp' | 'ssp' | 'ssp:N'; first match wins."""
        servers: int | None = None
        """How many server processes; None: as many as the launcher started (`shoal run --servers S`),
        1 under `shoal train`. A number that differs from the launcher's stops the job."""
        chunk_bytes: int = 4 << 20
        """A parameter bigger than this is split into chunks placed on different servers."""
        timeout_s: float = 60.0
        """How long a server waits for a late worker, or for all to join (and a worker for a server), before
        stopping the job."""
        compression: str = "none"
        """How workers compress the gradients they push (docs/compression.md)."""
        pull_compression: str | None = None
        """How servers compress the parameters they send back (deltas with error feedback on the server,
        `shoal.ps.pull_codec`); None: as `compression`, "none": whole values."""
        max_message_mb: float = 1024.0
        """The largest message a worker or server accepts; servers cap it at SHOAL_PS_MAX_BYTES (2^30)."""
        grad_accum: int = 1
        """Calls of `optimizer.step()` per push: the servers apply the mean of this many micro-batches."""
        clip_norm: float | None = None
        """Refused: no process holds the averaged gradient (the servers hold pieces of it)."""
        overlap: bool | None = None
        """Push each gradient during backward, as soon as it is computed (uncompressed pushes only; see
        `parameter_server.overlap`); False: push everything at `optimizer.step()`. None: during backward
        when the model is on a GPU, at `step()` on a CPU, where pushing during backward measured slower
        (docs/benchmarks-ps.md, section 7)."""
        overlap_bytes: int = 2 << 20
        """With `overlap`: a server's bucket of gradients is sent once it holds this many bytes."""
        replication: int | None = None
        """Processes that hold each server's shard (1 or 2, `shoal.ps.replication`): with 2, a server
        killed or stopped loses no acknowledged update. None: what the launcher started (its default:
        2 with 2 or more servers)."""

        def __post_init__(self) -> None:
            check_range(self.grad_accum, "grad_accum", low=1)
            if self.clip_norm is not None:
                raise ConfigError(
                    "the parameter server cannot clip by global norm because no process holds the averaged "
                    "gradient (each server holds pieces of it); leave clip_norm unset, or use data_parallel",
                    "clip_norm",
                )
            check_range(self.staleness, "staleness", low=0)
            if self.servers is not None:
                check_range(self.servers, "servers", low=1)
            if self.replication is not None:
                check_range(self.replication, "replication", low=1, high=2)
            check_range(self.chunk_bytes, "chunk_bytes", low=1)
            check_range(self.overlap_bytes, "overlap_bytes", low=1)
            check_range(self.timeout_s, "timeout_s", low=0.0, low_open=True)
            check_range(self.max_message_mb, "max_message_mb", low=0.001)
            resolve([], self.mode, self.overrides, self.staleness)  # validates every override
            parse_compression(self.compression)  # ConfigError names the spec
            if self.pull_compression is not None:
                try:
                    parse_compression(self.pull_compression)
                except ConfigError as err:
                    why = str(err).replace("'compression'", "'pull_compression'")
                    raise ConfigError(why, "pull_compression") from None

        @property
        def pulled_with(self) -> str:
            """The pull compression in effect: `pull_compression`, or `compression` when it is None."""
            return self.compression if self.pull_compression is None else self.pull_compression

        @property
        def mode(self) -> Mode:
            """The run's consistency mode (`consistency` with `staleness`)."""
            return parse_mode(self.consistency, self.staleness, "consistency")

        def server_processes(self, workers: int) -> int:
            return 1 if self.servers is None else self.servers

    options: Options
    resumes_on_servers = True
    """The servers outlive a worker's restart and hold its clock: `shoal train` resumes a restarted
    worker at `clock`, its data position and random numbers derived from the step."""
    install_at_forward = False
    """Benchmarks only (benchmarks/ps.py --only pull): leave the pulled parameters out of the model
    until its next forward pass, as shoal did before issue 11, to measure what installing them in
    `optimizer.step()` costs. With it, `step()` leaves the model one step behind."""

    def __init__(self, options: Options | None = None, /, **kwargs: Any) -> None:
        super().__init__(options, **kwargs)
        self._session: Session | None = None
        self._model: nn.Module | None = None
        self._hook: torch.utils.hooks.RemovableHandle | None = None
        self._skipped_before = 0  # restored before prepare()

    @property
    def session(self) -> Session:
        if self._session is None:
            raise self.not_prepared()
        return self._session

    # ------------------------------------------------------------------ setup
    @overload
    def prepare(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, *, example: tuple[Any, Any] | None = None
    ) -> tuple[nn.Module, PreparedOptimizer]: ...
    @overload
    def prepare(
        self, model: nn.Module, optimizer: None = None, *, example: tuple[Any, Any] | None = None
    ) -> tuple[nn.Module, None]: ...
    def prepare(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        example: tuple[Any, Any] | None = None,
    ) -> tuple[nn.Module, PreparedOptimizer | None]:
        """The model (the same object) and the prepared optimizer; without one, `prepare_optimizer`
        connects the servers later (they run the optimizer's class) and training waits for it."""
        if self._model is not None:
            raise ShoalError("this ParameterServer already prepared a model; make one strategy per model")
        model.to(runtime.current().device)
        self._model = model
        self._hook = model.register_forward_pre_hook(ForwardHook(self))
        return model, None if optimizer is None else self.prepare_optimizer(optimizer)

    def prepare_optimizer(self, optimizer: torch.optim.Optimizer) -> PreparedOptimizer:
        """Start training `optimizer`'s parameters on the servers; its state (loaded before, e.g.
        from a snapshot) goes to the servers too. Collective: every worker calls it."""
        from shoal.comm.wire import Codec, job_key

        if self._model is None:
            raise ShoalError("call strategy.prepare(model) before strategy.prepare_optimizer(optimizer)")
        if self._session is not None:
            raise ShoalError("this ParameterServer already trains an optimizer; make one strategy per optimizer")
        model, o, rt = self._model, self.options, runtime.current()
        cls = type(optimizer)
        optim = ps_optim.optimizer_name(cls.__mro__[2] if issubclass(cls, PreparedOptimizer) else cls)
        served = served_parameters(model, optimizer)
        modes = resolve([s.name for s in served], o.mode, o.overrides, o.staleness)
        check_overrides_match([s.name for s in served], o.overrides)
        endpoints = find_servers(o.timeout_s, o.servers, o.replication)
        compressor = parse_compression(o.compression)
        compressor.reseed(1_000 + rt.rank)  # independent rounding noise per worker
        compressor.momentum = corrected_momentum(compressor, optimizer)  # top-k/random-k under momentum SGD
        how = Placement(
            len(endpoints),
            o.chunk_bytes,
            modes,
            optim,
            o.timeout_s,
            o.compression,
            o.pulled_with,
            momentum_corrected=compressor.momentum > 0,
        )
        layout = lay_out(served, optimizer, how)
        codec = Codec(job_key(), int(o.max_message_mb * (1 << 20)))
        for spec in layout.specs:  # the servers refuse bigger messages too (below SHOAL_PS_MAX_BYTES)
            spec["max_bytes"] = codec.max_bytes
        pieces = [sorted({h.key for h in held}) for held in layout.slices]
        client = Client(endpoints, codec, rt.rank, rt.world_size, o.timeout_s, pieces)
        installed = Installed([h for held in layout.slices for h in held])
        s = self._session = Session(client, layout, optimizer, optim, compressor, installed, PullDecoder(o.pulled_with))
        leave_at_exit(self, ParameterServer.close)
        s.totals.skipped = self._skipped_before
        if overlaps(o.overlap, o.compression, [x.param for x in served]):
            s.overlap = Overlap(layout, client, o.grad_accum, s.totals, o.overlap_bytes)
        replies = client.init(layout.specs, layout.values)
        s.clock = joined_at([h for h, _ in replies], rt.rank)
        self._install(replies)
        if any(h.get("rejoined") for h, _ in replies):
            # The values for this worker's clock come when the rule allows (BSP: once the others'
            # replacements pushed); the first forward or step waits for them, not prepare.
            client.request_pull(s.clock, previous=[h["clock"] > s.clock for h, _ in replies])
            s.pending = True
        if os.environ.get(env.PS_EVENTS):
            s.live = LiveRow(Publisher(os.environ[env.PS_EVENTS], codec, client.ctx), rt.rank)
        prepared = prepare_optimizer(optimizer, self)
        if not s.clock:  # a rejoining worker takes the servers' state as it is
            # State loaded before prepare (a snapshot) goes to the servers; no worker pushes before it is there.
            self._restore(optimizer if optimizer.state else None, only_if_state=True)
        return prepared

    @property
    def clock(self) -> int:
        """This worker's pushes the servers hold: its steps so far (> 0 at once after a rejoin)."""
        return self.session.clock

    # ------------------------------------------------------------------ steps
    @property
    def grad_accum(self) -> int:
        return self.options.grad_accum

    def synchronize(self) -> bool:
        raise ShoalError(
            "the parameter server averages gradients on its servers, so a worker has no averaged gradient "
            "to clip or inspect; use data_parallel for that, or work on this worker's own gradient"
        )

    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        """Refused, as `synchronize()` is: the averaged gradient exists only in pieces on the servers."""
        raise ShoalError(
            "the parameter server cannot clip by global norm because no process holds the averaged gradient "
            "(each server holds pieces of it); leave clipping out, or use data_parallel"
        )

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backward passes within only accumulate: none of their gradients is pushed during backward
        (`overlap`); the next `step()` pushes the sum, as DDP's `no_sync()` then all-reduces it."""
        overlap = self._session.overlap if self._session is not None else None
        if overlap is not None:
            overlap.hold += 1
        try:
            yield
        finally:
            if overlap is not None:
                overlap.hold -= 1

    def optimizer_step(self, optimizer: PreparedOptimizer, closure: Closure | None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        s = self.session
        s.installed.stepped()
        s.micro += 1
        if s.micro < self.grad_accum:
            if s.overlap is not None:
                s.overlap.micro_step(last=s.micro == self.grad_accum - 1)
            return loss  # an accumulating micro-step: the gradients add up in .grad
        s.micro = 0
        self.sync()  # a step never starts before the last pull is in
        hp = server_hyperparameters(s.optim, optimizer, s.compressor.momentum > 0)
        if s.overlap is not None and s.overlap.pushing():  # parts went out during backward
            rest, parts = s.overlap.rest()
            s.client.push(s.clock, rest, hp, parts=parts)
            self._divide_accumulated(s)
            return self._pull(s, loss)
        self._divide_accumulated(s)
        pushes, codes, nonfinite = encode_pushes(s.layout, s.compressor, self.options.compression, s.totals)
        if nonfinite:
            # As mixed precision does: a step with an overflow is not applied
            # anywhere (in BSP the servers drop the whole clock).
            s.totals.skipped += 1
            log.warning(
                "non-finite gradient after %s compression: step skipped (%d so far)",
                self.options.compression,
                s.totals.skipped,
            )
            s.client.push(s.clock, [([], [])] * len(pushes), hp, skip=True)
        else:
            s.client.push(s.clock, pushes, hp, codes if self.options.compression != "none" else None)
        return self._pull(s, loss)

    def _divide_accumulated(self, s: Session) -> None:
        """`.grad` becomes the mean over the micro-batches (as one big batch) when `grad_accum` > 1."""
        if self.grad_accum > 1:
            for held in s.installed.params:
                if held.grad is not None:
                    held.grad.div_(self.grad_accum)

    def _pull(self, s: Session, loss: float | None) -> float | None:
        """After a push: the next clock, its pull requested and (unless deferred) installed."""
        s.clock += 1
        if s.overlap is not None:
            s.overlap.clock = s.clock
        s.client.request_pull(s.clock)
        s.pending = True
        if not self.install_at_forward:
            self.sync()  # step() leaves the new parameters in the model, as a local step does
        if s.live is not None:
            self._publish(s)
        return loss

    def before_forward(self, module: nn.Module, inputs: tuple[Any, ...]) -> None:
        """The model's forward pre-hook (`guard.ForwardHook`): refuse to train without an optimizer or
        after the loop changed the parameters itself; install deferred pulls (benchmarks)."""
        if self._session is None:
            if training(module):
                raise ShoalError(NO_OPTIMIZER)
            return
        s = self._session
        if s.pending:  # benchmarks' deferred pulls, and a rejoin's first
            self.sync()
        if training(module):
            s.installed.check()
        if s.live is not None and inputs and isinstance(inputs[0], torch.Tensor) and inputs[0].dim() > 0:
            s.live.batch = inputs[0].shape[0]

    def _publish(self, s: Session, final: bool = False) -> None:
        if s.live is not None:
            staleness = s.window.staleness[-1] if s.window.staleness else 0.0
            s.live.step(s.clock, s.totals, staleness, s.client.bytes_pushed, s.client.bytes_pulled, final)

    def optimizer_zero_grad(self, optimizer: PreparedOptimizer, set_to_none: bool) -> None:
        if self.session.micro:
            return  # gradients of an unfinished accumulation are kept
        if not set_to_none:
            self.session.client.wait_sent()  # ZeroMQ may still be reading the gradients in place
        optimizer.local_zero_grad(set_to_none)

    def sync(self) -> None:
        """Wait for the parameters of the current clock and put them into the model.

        `optimizer.step()` does this itself; an explicit call is never needed (and then does nothing)."""
        s = self.session
        if not s.pending:
            return
        start = time.perf_counter()
        replies = s.client.wait_pull(s.clock)
        if any(h.get("inexact") for h, _ in replies):
            log.warning(
                "the parameter servers no longer hold the values this worker's step %d had (it died mid-push); "
                "it goes on from newer ones, so this run is not bit-identical to a fault-free one",
                s.clock,
            )
        waited = time.perf_counter() - start
        s.window.wait_s += waited
        s.totals.wait_s += waited
        s.pending = False
        self._install(replies)
        s.window.staleness.append(max(float(h.get("staleness", 0.0)) for h, _ in replies))

    def refresh(self) -> None:
        """Pull the newest parameters the consistency rule allows, without pushing (e.g. to evaluate at the end).

        Always whole values, even when pulls are compressed: after it every worker holds exactly
        what the servers hold."""
        self.sync()
        self.session.client.request_pull(self.session.clock, exact=True)
        self.session.pending = True
        self.sync()

    def _install(self, replies: Replies) -> None:
        s = self.session
        for server, ((header, tensors), slices, shapes) in enumerate(
            zip(replies, s.layout.slices, s.layout.code_shapes, strict=True)
        ):
            s.pulls.install(server, header, tensors, slices, shapes)
            s.totals.raw_pulled += sum((h.stop - h.start) * h.param.element_size() for h in slices)
        s.installed.record()

    def step_metrics(self) -> dict[str, float]:
        s = self.session
        m, s.window = s.window, StepWindow()
        pushed, pulled = s.client.bytes_pushed, s.client.bytes_pulled
        out = {
            "ps_wait_s": m.wait_s,
            "ps_wait_frac": m.wait_s / max(time.perf_counter() - m.start, 1e-9),
            "ps_staleness": sum(m.staleness) / len(m.staleness) if m.staleness else 0.0,
            "ps_bytes_pushed": float(pushed - m.pushed0),
            "ps_skipped_steps": float(s.totals.skipped),
            "ps_bytes_pulled": float(pulled - m.pulled0),
        }
        if pushed - m.pushed0:
            out["ps_compression_ratio"] = (s.totals.raw_pushed - m.raw0) / (pushed - m.pushed0)
        if pulled - m.pulled0:
            out["ps_pull_compression_ratio"] = (s.totals.raw_pulled - m.raw_pulled0) / (pulled - m.pulled0)
        s.window.raw0, s.window.pushed0, s.window.pulled0 = s.totals.raw_pushed, pushed, pulled
        s.window.raw_pulled0 = s.totals.raw_pulled
        return out

    # ------------------------------------------------------------- the rest
    def evaluate(self, model: nn.Module, dataset: Samples, loss_fn: LossFn, batch_size: int = 512) -> dict[str, float]:
        """Every rank evaluates the same parameters: the servers' once every worker got here.

        Collective, like every strategy's. Under `asp`/`ssp` each worker holds what its
        last pull returned, which differs between workers; without this the ranks' shares
        of the held-out set would be scored with different models."""
        self.sync()
        if dist.is_initialized():
            dist.barrier()  # each worker's step() returned, so its pushes are applied
        self.refresh()
        return super().evaluate(model, dataset, loss_fn, batch_size)

    def state_dict(self) -> dict[str, Any]:
        if self._session is None:
            return {"skipped_steps": self._skipped_before}
        s = self._session
        state: dict[str, Any] = {"clock": s.clock, "skipped_steps": s.totals.skipped}  # clock: informative only
        state.update(with_prefix(s.compressor.state_dict(), COMPRESSION))
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the skipped-step count and this worker's compressor state (error feedback).

        The clock is not restored: the servers restart at 0.
        """
        skipped = int(state.get("skipped_steps", 0))
        if self._session is None:
            self._skipped_before = skipped
            return
        self._session.totals.skipped = skipped
        compression = sub_state(state, COMPRESSION)
        if compression:
            self._session.compressor.load_state_dict(compression)

    def close(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        s = self._session
        if s is None:
            return
        if s.overlap is not None:
            s.overlap.remove()
        self.sync()
        if s.live is not None:
            self._publish(s, final=True)
            s.live.close()
        s.client.close()
        self._session = None
