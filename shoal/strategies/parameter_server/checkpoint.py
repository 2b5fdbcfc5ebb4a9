"""The servers' part of a checkpoint, in torch's own layout.

A checkpoint holds each parameter whole, with its optimizer state as torch
keeps it (`optimizer.state[p]`), whatever the placement: `take_server_state`
assembles the servers' slices into the worker's optimizer before saving,
`server_state` cuts the loaded state into the slices each server holds.
"""

from __future__ import annotations

from typing import Any

import torch

from shoal.errors import ShoalError
from shoal.ps import optim as ps_optim
from shoal.strategies.parameter_server.layout import Slice

Replies = list[tuple[dict[str, Any], list[torch.Tensor]]]


@torch.no_grad()
def take_server_state(replies: Replies, slices: list[list[Slice]], optimizer: torch.optim.Optimizer) -> None:
    """Copy the servers' values into the parameters and their optimizer state into `optimizer`."""
    full: dict[torch.Tensor, dict[str, torch.Tensor]] = {}
    for server, ((header, tensors), held) in enumerate(zip(replies, slices, strict=True)):
        layout, it = header.get("state"), iter(tensors)
        if not isinstance(layout, list) or [e[0] for e in layout] != [h.key for h in held]:
            raise ShoalError(
                f"parameter server {server} answered a checkpoint request for other pieces; were the servers restarted?"
            )
        for h, (_, names) in zip(held, layout, strict=True):
            h.flat(h.param).copy_(next(it))
            state = full.setdefault(h.param, {})
            for name in names:
                value = next(it)
                if value.dim() == 0:
                    state[name] = value.clone()
                else:
                    h.flat(state.setdefault(name, torch.zeros_like(h.param))).copy_(value)
    full = {p: state for p, state in full.items() if state}
    if full:  # else torch makes the empty state itself, as for any optimizer before its first step
        optimizer.state.clear()
        for p, state in full.items():
            optimizer.state[p] = state


def server_state(
    slices: list[list[Slice]], optim: str, optimizer: torch.optim.Optimizer
) -> tuple[list[list[Any]], list[list[torch.Tensor]]]:
    """Per server: the layout ([key, [state names]] per slice) and tensors (value, then state) to restore."""
    layouts, tensors = [], []
    for held in slices:
        layout, ts = [], []
        for h in held:
            items = [(n, t if t.dim() == 0 else h.flat(t)) for n, t in ps_optim.export_state(optim, optimizer, h.param)]
            layout.append([h.key, [n for n, _ in items]])
            ts += [h.flat(h.param.detach()).cpu(), *(t.detach().cpu() for _, t in items)]
        layouts.append(layout)
        tensors.append(ts)
    return layouts, tensors
