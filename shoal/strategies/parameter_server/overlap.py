"""Push gradients while backward still runs (issue 11 section 4).

Pushing at `optimizer.step()` leaves the servers idle during backward and
the worker idle while they check what it sent. With `overlap` (uncompressed
pushes) each parameter's post-accumulate-grad hook puts its slices into
per-server buckets, and a bucket goes out as a part of the clock's push
(`Client.push_part`) once it holds `overlap_bytes` (2 MiB): the servers check the MAC,
shapes and finiteness of early gradients while the worker computes the
later ones. Backward produces the last layers first, so parts go out in
that order. `step()` sends the rest with the hyperparameters; only that last
message makes the server count the clock (`shoal.ps.parts`), so a backward
that no `step()` follows changes nothing there.

A gradient sent early must be the one `step()` would have sent, which holds
unless the loop changes `.grad` between backward and `step()`: torch's
`clip_grad_norm_`, `GradScaler.unscale_`, a second backward (accumulating by
hand without `no_sync`), an edit. So a run's first push is made at `step()`
while the hooks only watch: if every gradient came from one hook call and
is still that tensor at the same `_version` (every in-place change bumps it),
later steps push early; otherwise the whole run pushes at `step()` (logged
once), as with `overlap=False`. If a loop that passed changes its gradients
later, `step()` sees the new version and stops the run in one sentence (what
was sent cannot be taken back); a second backward before `step()` is stopped
in that backward. An in-place change through `.grad.data` escapes the
version counter and is not seen. Backward passes inside `strategy.no_sync()`
and the accumulating micro-steps of `grad_accum` only accumulate.
"""

from __future__ import annotations

import logging
from enum import Enum

import torch

from shoal.errors import ShoalError
from shoal.ps.client import Client
from shoal.strategies.parameter_server.layout import Layout, Slice
from shoal.strategies.parameter_server.live import Totals

log = logging.getLogger(__name__)

CHANGED = (
    "a gradient changed between backward() and optimizer.step() (clipping, scaling, a second backward or an "
    "edit of .grad) after this run had been pushing gradients during backward, so the servers got the old "
    "value; make the loop change gradients at every step or at none, or use ParameterServer(overlap=False)"
)
AGAIN = (
    "a second backward() ran before optimizer.step() after this run had been pushing gradients during "
    "backward, so the servers got only the first; accumulate inside `with strategy.no_sync():`, use "
    "ParameterServer(grad_accum=k), or ParameterServer(overlap=False)"
)


def overlaps(overlap: bool | None, compression: str, params: list[torch.Tensor]) -> bool:
    """Whether a worker pushes during backward: as asked, else (None) when the model is on a GPU.

    On a CPU the pushes' copies and messages take the cores backward needs: every run on the
    2-core machine here was slower with them, with a core per process too (docs/benchmarks-ps.md,
    section 7). On a GPU backward runs on the device while the CPU sends (not measured here)."""
    if compression != "none":  # a compressed push is encoded whole, at step()
        return False
    return overlap if overlap is not None else any(p.device.type == "cuda" for p in params)


class State(Enum):
    WATCH = "watch"
    """The first push: made at step(), while the hooks check that nothing changes gradients in between."""
    ON = "on"
    OFF = "off"


class Overlap:
    """The hooks and buckets of one worker's pushes during backward."""

    def __init__(self, layout: Layout, client: Client, grad_accum: int, totals: Totals, part_bytes: int) -> None:
        self.client, self.grad_accum, self.totals, self.part_bytes = client, grad_accum, totals, part_bytes
        self.servers = len(layout.slices)
        self.where: dict[int, list[tuple[int, Slice]]] = {}
        for server, slices in enumerate(layout.slices):
            for held in slices:
                self.where.setdefault(id(held.param), []).append((server, held))
        self.layout = layout
        self.params = list({id(h.param): h.param for slices in layout.slices for h in slices}.values())
        self.state = State.WATCH
        self.hold = 0
        """> 0 inside `no_sync()`: backward only accumulates."""
        self.last_micro = grad_accum == 1
        """The coming backward is the last before a push (not an accumulating micro-step)."""
        self.clock = 0
        """The clock being pushed (the strategy keeps it)."""
        self.parts_sent = 0
        """Parts sent during backward since `prepare`."""
        self._reset()
        self.handles = [p.register_post_accumulate_grad_hook(self._ready) for p in self.params]

    def _reset(self) -> None:
        self.fired: dict[int, tuple[int, int] | None] = {}
        """Per parameter: (id, _version) of its `.grad` when its hook last ran."""
        self.calls: dict[int, int] = {}
        self.sent: set[int] = set()
        self.buckets: list[list[Slice]] = [[] for _ in range(self.servers)]
        self.bucket_bytes = [0] * self.servers
        self.parts = [0] * self.servers

    def _ready(self, p: torch.Tensor) -> None:
        if self.hold or self.state is State.OFF:
            return
        pid = id(p)
        self.calls[pid] = self.calls.get(pid, 0) + 1
        self.fired[pid] = None if p.grad is None else (id(p.grad), p.grad._version)
        if self.state is not State.ON or not self.last_micro or p.grad is None:
            return
        if pid in self.sent:
            raise ShoalError(AGAIN)
        self.sent.add(pid)
        for server, held in self.where[pid]:
            self.buckets[server].append(held)
            self.bucket_bytes[server] += (held.stop - held.start) * p.element_size()
            if self.bucket_bytes[server] >= self.part_bytes:
                self._flush(server)

    def _grad(self, held: Slice) -> torch.Tensor:
        grad = held.param.grad
        assert grad is not None
        flat = held.flat(grad.detach()).cpu()
        self.totals.raw_pushed += flat.numel() * flat.element_size()
        return flat / self.grad_accum if self.grad_accum > 1 else flat  # the mean over the micro-batches

    def _flush(self, server: int) -> None:
        slices = self.buckets[server]
        if slices:
            self.client.push_part(server, self.clock, [h.key for h in slices], [self._grad(h) for h in slices])
            self.parts[server] += 1
            self.parts_sent += 1
        self.buckets[server], self.bucket_bytes[server] = [], 0

    def micro_step(self, last: bool) -> None:
        """An accumulating micro-step's `step()`: what its backward did is not a push;
        `last`: the next backward's is."""
        self.calls, self.fired = {}, {}
        self.last_micro = last

    def pushing(self) -> bool:
        """At the push's `step()`: whether this push went out in parts during backward (then `rest`
        sends the remainder); otherwise the caller pushes as without overlap. Decides, at the first
        push, whether later ones overlap; ShoalError if gradients changed after they were sent."""
        if self.state is State.ON:  # a gradient sent early and since changed, or dropped, is an error
            if not all(self._same(p) for p in self.params if id(p) in self.sent):
                raise ShoalError(CHANGED)
            return True
        unchanged = all(self._same(p) for p in self.params if p.grad is not None)
        if self.state is State.WATCH:
            self.state = State.ON if unchanged else State.OFF
            if not unchanged:
                log.info("gradients change between backward() and step(): this run pushes them at step()")
        self._reset()
        self.last_micro = self.grad_accum == 1
        return False

    def _same(self, p: torch.Tensor) -> bool:
        """Whether `p.grad` is what its one hook call this step saw (same tensor, same version)."""
        g = p.grad
        return g is not None and self.fired.get(id(p)) == (id(g), g._version) and self.calls.get(id(p)) == 1

    def rest(self) -> tuple[list[tuple[list[str], list[torch.Tensor]]], list[int]]:
        """Per server, the keys and gradients not sent yet, and how many parts were sent before."""
        per_server = []
        for server, slices in enumerate(self.layout.slices):
            held = self.buckets[server] + [
                h for h in slices if id(h.param) not in self.sent and h.param.grad is not None
            ]
            per_server.append(([h.key for h in held], [self._grad(h) for h in held]))
        parts = self.parts
        self._reset()
        self.last_micro = self.grad_accum == 1
        return per_server, parts

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
