"""Which slices of which parameters a worker exchanges with which server.

Every worker computes the same layout from the same model and optimizer
(`shoal.ps.placement` decides the servers): the slices each server holds,
the spec that tells a server what to keep (dtype, size, consistency mode,
param group, compression shape) and the initial values it starts from.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import nn

from shoal.compress import Compressor
from shoal.errors import ConfigError
from shoal.ps import optim as ps_optim
from shoal.ps.consistency import Mode
from shoal.ps.placement import plan
from shoal.strategies.parameter_server.live import Totals

FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


class Slice(NamedTuple):
    """Elements [start, stop) of the flattened parameter `param`, under the server's `key`."""

    key: str
    param: torch.Tensor
    start: int
    stop: int

    def flat(self, t: torch.Tensor) -> torch.Tensor:
        """This slice of `t` (the parameter or a tensor of its shape), flattened."""
        return t.reshape(-1)[self.start : self.stop]


class Served(NamedTuple):
    """A parameter the servers train: its name, the tensor and its optimizer param group."""

    name: str
    param: torch.Tensor
    group: int


@dataclass
class Layout:
    """Per server: the slices it holds, their compression shapes, its spec and initial values."""

    slices: list[list[Slice]]
    code_shapes: list[list[tuple[int, ...]]]
    specs: list[dict[str, Any]]
    values: list[list[torch.Tensor]] = field(default_factory=list)


def served_parameters(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[Served]:
    """The optimizer's parameters by model name; ConfigError for one the servers cannot train."""
    names = {p: n for n, p in model.named_parameters()}
    served = []
    for gi, group in enumerate(optimizer.param_groups):
        for p in group["params"]:
            if p not in names:
                raise ConfigError(
                    "the optimizer holds a parameter that is not in the model; "
                    "build the optimizer from model.parameters()",
                    "optimizer",
                )
            if p.dtype not in FLOATS:
                raise ConfigError(
                    f"parameter {names[p]} has dtype {p.dtype}; "
                    "the parameter server trains floating-point parameters only",
                    "optimizer",
                )
            served.append(Served(names[p], p, gi))
    return served


@dataclass(frozen=True)
class Placement:
    """How to spread the served parameters: server count, chunk size, modes, what runs there."""

    servers: int
    chunk_bytes: int
    modes: dict[str, Mode]
    optim: str
    timeout_s: float
    compression: str
    pull_compression: str = "none"
    momentum_corrected: bool = False
    """The workers apply SGD's momentum before sparsifying (DGC): the servers step without it."""


def server_hyperparameters(optim: str, optimizer: torch.optim.Optimizer, momentum_corrected: bool) -> list[dict]:
    """What the servers step each param group with: its hyperparameters, with momentum 0 where the
    workers' compressor applied it before sparsifying (`shoal.compress.sparse.corrected_momentum`)."""
    groups = [ps_optim.hyperparameters(optim, g) for g in optimizer.param_groups]
    return [{**g, "momentum": 0.0} for g in groups] if momentum_corrected else groups


def lay_out(served: list[Served], optimizer: torch.optim.Optimizer, how: Placement) -> Layout:
    """The layout of `served` over `how.servers` servers."""
    count = how.servers
    placed = plan([(s.name, s.param.numel(), s.param.element_size()) for s in served], count, how.chunk_bytes)
    groups = server_hyperparameters(how.optim, optimizer, how.momentum_corrected)
    spec = {
        "optim": how.optim,
        "timeout_s": how.timeout_s,
        "compression": how.compression,
        "pull_compression": how.pull_compression,
        "groups": groups,
    }
    layout = Layout(
        [[] for _ in range(count)],
        [[] for _ in range(count)],
        [{**spec, "keys": [], "code_shapes": []} for _ in range(count)],
        [[] for _ in range(count)],
    )
    by_name = {s.name: s for s in served}
    for piece in placed.pieces:
        s, mode, server = by_name[piece.name], how.modes[piece.name], piece.server
        held = Slice(piece.key, s.param, piece.start, piece.stop)
        shape = code_shape(s.param, piece.start, piece.stop)
        dtype = str(s.param.dtype).removeprefix("torch.")
        layout.slices[server].append(held)
        layout.code_shapes[server].append(shape)
        layout.specs[server]["code_shapes"].append(list(shape))
        layout.specs[server]["keys"].append(
            [piece.key, dtype, [piece.stop - piece.start], mode.kind, mode.staleness, s.group]
        )
        layout.values[server].append(held.flat(s.param.detach()).cpu())
    return layout


def code_shape(p: torch.Tensor, start: int, stop: int) -> tuple[int, ...]:
    """The shape a piece is compressed in: whole rows of a matrix keep their shape
    (so PowerSGD sees a matrix), anything else is a flat vector."""
    row = p[0].numel() if p.dim() >= 2 and p.shape[0] else 0
    if row and start % row == 0 and stop % row == 0:
        return ((stop - start) // row, *p.shape[1:])
    return (stop - start,)


def check_overrides_match(names: list[str], overrides: dict[str, str]) -> None:
    """ConfigError for an override glob that matches none of the model's parameters (a typo
    would otherwise leave those parameters in the run's mode without a word)."""
    for glob in overrides:
        if not any(fnmatch.fnmatchcase(n, glob) for n in names):
            shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
            raise ConfigError(
                f"override '{glob}' matches no parameter of the model; patterns match the names of "
                f"model.named_parameters(): {shown}",
                f"overrides.{glob}",
            )


def encode_pushes(
    layout: Layout, compressor: Compressor, compression: str, totals: Totals
) -> tuple[list[tuple[list[str], list[torch.Tensor]]], list[list[dict]], bool]:
    """Per server: the keys and (compressed) gradient tensors to push, their headers, and
    whether any gradient was not finite."""
    pushes, codes, nonfinite = [], [], False
    for slices, shapes in zip(layout.slices, layout.code_shapes, strict=True):
        keys, grads, headers = [], [], []
        for held, shape in zip(slices, shapes, strict=True):
            if held.param.grad is None:
                continue
            grad = held.flat(held.param.grad.detach()).cpu()
            keys.append(held.key)
            totals.raw_pushed += grad.numel() * grad.element_size()
            if compression == "none":
                grads.append(grad)  # sent without a copy
                continue
            payload = compressor.encode(held.key, grad.view(shape))
            nonfinite |= payload.nonfinite
            headers.append(payload.header)
            grads += payload.tensors
        pushes.append((keys, grads))
        codes.append(headers)
    return pushes, codes, nonfinite
