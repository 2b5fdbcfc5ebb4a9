"""The parameter-server strategy: data split over workers, parameters sharded
over server processes, consistency chosen per run or per parameter.

    strategy = ParameterServer(consistency="ssp", staleness=3, overrides={"embedding.*": "asp"})
    model, optimizer = strategy.prepare(model, optimizer)
    # loss.backward(); optimizer.step()   # pushes gradients, asks for fresh parameters
    # optimizer.zero_grad()

`optimizer.step()` does not update parameters locally: it queues the
gradients for the servers that hold each piece (the user's optimizer runs
there, see `shoal.ps.optim`) and requests the next parameters. The model
waits for them at its next forward pass (a forward pre-hook), so the push
and the pull overlap with whatever the loop does in between. Guarantees per
mode are in `shoal.ps.consistency` and docs/consistency.md; with `bsp` the
run equals one process with the combined batch.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.distributed as dist
from torch import nn

from shoal import runtime
from shoal.comm.pubsub import EVENTS_ENV, Publisher
from shoal.compress import parse as parse_compression
from shoal.config import check_range
from shoal.errors import ConfigError, ShoalError
from shoal.ps.consistency import parse_mode, resolve
from shoal.strategies.base import Strategy, wrap_optimizer

log = logging.getLogger(__name__)


@dataclass
class ParameterServer(Strategy):
    consistency: str = "bsp"
    staleness: int = 0
    overrides: dict[str, str] = field(default_factory=dict)
    """Glob on parameter names -> 'bsp' | 'asp' | 'ssp' | 'ssp:N'; first match wins."""
    servers: int = 1
    chunk_bytes: int = 4 << 20
    """A parameter bigger than this is split into chunks placed on different servers."""
    timeout_s: float = 60.0
    """How long a server waits for a late worker (and a worker for a server) before stopping the job."""
    compression: str = "none"
    max_message_mb: float = 1024.0

    name: ClassVar[str] = "parameter_server"

    def __post_init__(self):
        self.default_mode = parse_mode(self.consistency, self.staleness, "consistency")
        check_range(self.staleness, "staleness", low=0)
        check_range(self.servers, "servers", low=1)
        check_range(self.chunk_bytes, "chunk_bytes", low=1)
        check_range(self.timeout_s, "timeout_s", low=0.0, low_open=True)
        check_range(self.max_message_mb, "max_message_mb", low=0.0, low_open=True)
        resolve([], self.default_mode, self.overrides, self.staleness)  # validates every override
        self._compressor = parse_compression(self.compression)  # ConfigError names the spec
        self._raw_pushed = 0
        self._skipped = 0
        self._client = None
        self._clock = 0
        self._pending = False
        self._metrics = _Window()
        self._metrics_wait_total = 0.0

    def server_processes(self, workers: int) -> int:
        return self.servers

    # ------------------------------------------------------------------ setup
    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        from shoal.comm.wire import Codec, job_key
        from shoal.ps import optim as ps_optim
        from shoal.ps.client import Client
        from shoal.ps.launch import connect_store, read_endpoints
        from shoal.ps.placement import plan

        rt = runtime.current()
        self._optim_name = ps_optim.optimizer_name(optimizer)
        model.to(rt.device)
        names = {p: n for n, p in model.named_parameters()}
        self._groups, served = [], []
        for gi, group in enumerate(optimizer.param_groups):
            for p in group["params"]:
                if p not in names:
                    raise ConfigError(
                        "the optimizer holds a parameter that is not in the model; build the optimizer from model.parameters()",
                        "optimizer",
                    )
                if p.dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
                    raise ConfigError(
                        f"parameter {names[p]} has dtype {p.dtype}; the parameter server trains floating-point parameters only",
                        "optimizer",
                    )
                served.append((names[p], p, gi))
        modes = resolve([n for n, _, _ in served], self.default_mode, self.overrides, self.staleness)
        store, count = connect_store(self.timeout_s)
        if count != self.servers:
            raise ShoalError(
                f"the launcher started {count} parameter server(s) but the strategy asks for servers={self.servers}; make them agree (shoal run --servers {self.servers})"
            )
        endpoints = read_endpoints(store, count, self.timeout_s)
        self.plan = plan([(n, p.numel(), p.element_size()) for n, p, _ in served], count, self.chunk_bytes)
        by_name = {n: (p, gi) for n, p, gi in served}
        self._pieces: list[list[tuple[str, torch.Tensor, int, int]]] = [[] for _ in range(count)]
        specs = [
            {
                "optim": self._optim_name,
                "timeout_s": self.timeout_s,
                "keys": [],
                "compression": self.compression,
                "code_shapes": [],
                "groups": [ps_optim.hyperparameters(self._optim_name, g) for g in optimizer.param_groups],
            }
            for _ in range(count)
        ]
        values: list[list[torch.Tensor]] = [[] for _ in range(count)]
        for piece in self.plan.pieces:
            p, gi = by_name[piece.name]
            mode = modes[piece.name]
            self._pieces[piece.server].append((piece.key, p, piece.start, piece.stop))
            specs[piece.server]["code_shapes"].append(list(code_shape(p, piece.start, piece.stop)))
            specs[piece.server]["keys"].append(
                [
                    piece.key,
                    str(p.dtype).removeprefix("torch."),
                    [piece.stop - piece.start],
                    mode.kind,
                    mode.staleness,
                    gi,
                ]
            )
            values[piece.server].append(p.detach().reshape(-1)[piece.start : piece.stop].cpu())
        codec = Codec(job_key(), int(self.max_message_mb * (1 << 20)))
        self._client = Client(endpoints, codec, rt.rank, rt.world_size, self.timeout_s)
        self._code_shapes = [spec["code_shapes"] for spec in specs]
        self._compressor.reseed(1_000 + rt.rank)  # independent rounding noise per worker
        self._install(self._client.init(specs, values))
        self._model = model
        self._optimizer = optimizer
        self._hook = model.register_forward_pre_hook(self._before_forward)
        self._pub = None
        if os.environ.get(EVENTS_ENV):
            self._pub = Publisher(os.environ[EVENTS_ENV], codec)
        self._live = {"t": time.perf_counter(), "steps": 0, "samples": 0, "wait": 0.0, "batch": 0}
        return model, wrap_optimizer(optimizer, self._step, self._zero_grad)

    # ------------------------------------------------------------------ steps
    def _step(self, original_step, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.sync()  # a step never starts before the last pull is in
        per_server, codes, nonfinite = [], [], False
        for pieces, shapes in zip(self._pieces, self._code_shapes):
            keys, grads, headers = [], [], []
            for (key, p, start, stop), shape in zip(pieces, shapes):
                if p.grad is None:
                    continue
                grad = p.grad.detach().reshape(-1)[start:stop].cpu()
                keys.append(key)
                self._raw_pushed += grad.numel() * grad.element_size()
                if self.compression == "none":
                    grads.append(grad)  # sent without a copy
                    continue
                payload = self._compressor.encode(key, grad.view(shape))
                nonfinite |= bool(payload.header.get("nonfinite"))
                headers.append(payload.header)
                grads += payload.tensors
            per_server.append((keys, grads))
            codes.append(headers)
        hp = [_hp(self._optim_name, g) for g in self._optimizer.param_groups]
        if nonfinite:
            # As mixed precision does: a step with an overflow is not applied
            # anywhere (in BSP the servers drop the whole clock).
            self._skipped += 1
            log.warning(
                "non-finite gradient after %s compression: step skipped (%d so far)", self.compression, self._skipped
            )
            self._client.push(self._clock, [([], [])] * len(per_server), hp, skip=True)
        else:
            self._client.push(self._clock, per_server, hp, codes if self.compression != "none" else None)
        self._clock += 1
        self._client.request_pull(self._clock)
        self._pending = True
        if self._pub is not None:
            self._publish()
        return loss

    def _before_forward(self, module, inputs) -> None:
        self.sync()
        if inputs and isinstance(inputs[0], torch.Tensor) and inputs[0].dim() > 0:
            self._live["batch"] = inputs[0].shape[0]

    def _publish(self, final: bool = False) -> None:
        """Every half second (and at the end), this worker's row of the launcher's live table."""
        live = self._live
        live["steps"] += 0 if final else 1
        live["samples"] += 0 if final else live["batch"]
        now = time.perf_counter()
        if now - live["t"] < 0.5 and not (final and live["steps"]):
            return
        elapsed = now - live["t"]
        wait = self._metrics_wait_total - live["wait"]
        self._pub.publish(
            "metrics",
            {
                "rank": runtime.current().rank,
                "step": self._clock,
                "samples_per_s": live["samples"] / elapsed,
                "steps_per_s": live["steps"] / elapsed,
                "wait_frac": wait / elapsed,
                "staleness": self._metrics.staleness[-1] if self._metrics.staleness else 0.0,
                "bytes_pushed": self._client.bytes_pushed,
                "bytes_pulled": self._client.bytes_pulled,
            },
        )
        live.update(t=now, steps=0, samples=0, wait=self._metrics_wait_total)

    def _zero_grad(self, original_zero_grad, set_to_none: bool = True):
        if not set_to_none:
            self._client.wait_sent()  # ZeroMQ may still be reading the gradients in place
        original_zero_grad(set_to_none)

    def sync(self) -> None:
        """Wait for the parameters of the current clock and put them into the model."""
        if not self._pending:
            return
        start = time.perf_counter()
        replies = self._client.wait_pull(self._clock)
        waited = time.perf_counter() - start
        self._metrics.wait_s += waited
        self._metrics_wait_total += waited
        self._pending = False
        self._install(replies)
        self._metrics.staleness.append(max(float(h.get("staleness", 0.0)) for h, _ in replies))

    def refresh(self) -> None:
        """Pull the newest parameters the consistency rule allows, without pushing (e.g. to evaluate at the end)."""
        self.sync()
        self._client.request_pull(self._clock)
        self._pending = True
        self.sync()

    @torch.no_grad()
    def _install(self, replies) -> None:
        for (header, tensors), pieces in zip(replies, self._pieces):
            if len(tensors) != len(pieces):
                raise ShoalError(
                    f"parameter server {header.get('index', '?')} sent {len(tensors)} pieces, expected {len(pieces)}; were the servers restarted?"
                )
            for (_, p, start, stop), value in zip(pieces, tensors):
                p.view(-1)[start:stop].copy_(value)

    def step_metrics(self) -> dict[str, float]:
        m, self._metrics = self._metrics, _Window()
        now = time.perf_counter()
        out = {
            "ps_wait_s": m.wait_s,
            "ps_wait_frac": m.wait_s / max(now - m.start, 1e-9),
            "ps_staleness": sum(m.staleness) / len(m.staleness) if m.staleness else 0.0,
        }
        if self._client is not None:
            pushed = self._client.bytes_pushed - m.pushed0
            out["ps_bytes_pushed"] = float(pushed)
            if pushed:
                out["ps_compression_ratio"] = (self._raw_pushed - m.raw0) / pushed
            out["ps_skipped_steps"] = float(self._skipped)
            self._metrics.raw0 = self._raw_pushed
            out["ps_bytes_pulled"] = float(self._client.bytes_pulled - m.pulled0)
            self._metrics.pushed0, self._metrics.pulled0 = self._client.bytes_pushed, self._client.bytes_pulled
        return out

    # ------------------------------------------------------------- the rest
    def evaluate(self, model, dataset, loss_fn, batch_size: int = 512):
        self.sync()
        return super().evaluate(model, dataset, loss_fn, batch_size)

    def checkpoint_state(self, model, optimizer):
        """The servers' values and optimizer state, as torch's own state dicts.

        Every worker must call this at the same step (the trainer does): the
        servers answer once all workers have pushed that many clocks, so every
        worker holds the same cut. The optimizer state is put into the local
        optimizer in torch's layout, which makes the checkpoint independent of
        placement: it resumes with other server counts, or as data_parallel.
        """
        self.sync()
        replies = self._client.state(self._clock)
        full: dict[torch.Tensor, dict[str, torch.Tensor]] = {}
        with torch.no_grad():
            for s, ((header, tensors), pieces) in enumerate(zip(replies, self._pieces)):
                layout, it = header.get("state"), iter(tensors)
                if not isinstance(layout, list) or [e[0] for e in layout] != [k for k, *_ in pieces]:
                    raise ShoalError(
                        f"parameter server {s} answered a checkpoint request for other pieces; were the servers restarted?"
                    )
                for (_, p, start, stop), (_, names) in zip(pieces, layout):
                    p.view(-1)[start:stop].copy_(next(it))
                    state = full.setdefault(p, {})
                    for name in names:
                        value = next(it)
                        if value.dim() == 0:
                            state[name] = value.clone()
                        else:
                            state.setdefault(name, torch.zeros_like(p)).view(-1)[start:stop].copy_(value)
        full = {p: state for p, state in full.items() if state}
        if full:  # else torch makes the empty state itself, as for any optimizer before its first step
            optimizer.state.clear()
            for p, state in full.items():
                optimizer.state[p] = state
        return super().checkpoint_state(model, optimizer)

    def load_checkpoint_state(self, model, optimizer, state) -> None:
        """Load into the local copies, then worker 0 puts them on the servers."""
        from shoal.ps import optim as ps_optim

        super().load_checkpoint_state(model, optimizer, state)
        if runtime.current().rank == 0:
            layouts, tensors = [], []
            for pieces in self._pieces:
                layout, ts = [], []
                for key, p, start, stop in pieces:
                    items = [
                        (n, t if t.dim() == 0 else t.reshape(-1)[start:stop])
                        for n, t in ps_optim.export_state(self._optim_name, optimizer, p)
                    ]
                    layout.append([key, [n for n, _ in items]])
                    ts += [p.detach().reshape(-1)[start:stop].cpu(), *(t.detach().cpu() for _, t in items)]
                layouts.append(layout)
                tensors.append(ts)
            self._client.restore(layouts, tensors)
        if dist.is_initialized():
            dist.barrier()  # no worker pulls before the servers hold the checkpoint
        optimizer.state.clear()  # the servers own it; a checkpoint fetches it again
        self.refresh()

    def state_dict(self):
        return {"clock": self._clock, "skipped_steps": self._skipped}  # the clock is informative: servers restart at 0

    def load_state_dict(self, state):
        self._skipped = int(state.get("skipped_steps", 0))

    def rank_tensors(self) -> dict[str, torch.Tensor]:
        """This worker's compressor state (error feedback), into the DCP checkpoint under its rank."""
        return {f"compression/{k}": v for k, v in self._compressor.state_dict().items()}

    def load_rank_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self._compressor.load_state_dict(
            {k[len("compression/") :]: v for k, v in tensors.items() if k.startswith("compression/")}
        )

    def close(self) -> None:
        if self._client is not None:
            self.sync()
            self._hook.remove()
            if self._pub is not None:
                self._publish(final=True)
                self._pub.close()
            self._client.close()
            self._client = None


@dataclass
class _Window:
    wait_s: float = 0.0
    staleness: list = field(default_factory=list)
    start: float = field(default_factory=time.perf_counter)
    pushed0: int = 0
    pulled0: int = 0
    raw0: int = 0


def code_shape(p: torch.Tensor, start: int, stop: int) -> tuple[int, ...]:
    """The shape a piece is compressed in: whole rows of a matrix keep their shape
    (so PowerSGD sees a matrix), anything else is a flat vector."""
    row = p[0].numel() if p.dim() >= 2 and p.shape[0] else 0
    if row and start % row == 0 and stop % row == 0:
        return ((stop - start) // row, *p.shape[1:])
    return (stop - start,)


def _hp(name: str, group: dict) -> dict:
    from shoal.ps.optim import hyperparameters

    return hyperparameters(name, group)
