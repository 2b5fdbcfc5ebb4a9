"""The servers' part of a checkpoint, in torch's own layout.

A checkpoint holds each parameter whole, with its optimizer state as torch
keeps it (`optimizer.state[p]`), whatever the placement: `take_server_state`
assembles the servers' slices into the worker's optimizer before saving,
`server_state` cuts the loaded state into the slices each server holds.
`by_name`/`by_index` turn torch's optimizer state dict (keyed by position)
into the full state dict format keyed by parameter names, and back.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from shoal.errors import ShoalError
from shoal.ps import optim as ps_optim
from shoal.ps.client import Replies
from shoal.strategies.parameter_server.layout import Slice


@torch.no_grad()
def take_server_state(replies: Replies, slices: list[list[Slice]], optimizer: torch.optim.Optimizer | None) -> None:
    """Copy the servers' values into the parameters and their optimizer state into `optimizer` (if given)."""
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
    if (
        full and optimizer is not None
    ):  # else torch makes the empty state itself, as for any optimizer before its first step
        optimizer.state.clear()
        for p, state in full.items():
            optimizer.state[p] = state


def server_state(
    slices: list[list[Slice]], optimizer: torch.optim.Optimizer | None
) -> tuple[list[list[Any]], list[list[torch.Tensor]]]:
    """Per server: the layout ([key, [state names]] per slice) and tensors (value, then state) to restore;
    without `optimizer`, no state (the servers' optimizers start afresh)."""
    layouts, tensors = [], []
    for held in slices:
        layout, ts = [], []
        for h in held:
            state = ps_optim.export_state(optimizer, h.param) if optimizer is not None else []
            items = [(n, t if t.dim() == 0 else h.flat(t)) for n, t in state]
            layout.append([h.key, [n for n, _ in items]])
            ts += [h.flat(h.param.detach()).cpu(), *(t.detach().cpu() for _, t in items)]
        layouts.append(layout)
        tensors.append(ts)
    return layouts, tensors


def by_name(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> dict[str, Any]:
    """torch's optimizer state dict (parameters by position) keyed by parameter names instead, on the CPU,
    as `get_optimizer_state_dict(..., full_state_dict=True)` gives it."""
    names = _names(model, optimizer)
    return {
        "state": {
            names[i]: {k: v.detach().cpu().clone() if isinstance(v, torch.Tensor) else v for k, v in s.items()}
            for i, s in state["state"].items()
        },
        "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]],
    }


def by_index(model: nn.Module, optimizer: torch.optim.Optimizer, named: dict[str, Any]) -> dict[str, Any]:
    """The reverse of `by_name`: what `optimizer.load_state_dict` takes; ShoalError for a name
    the optimizer does not hold."""
    index = {n: i for i, n in enumerate(_names(model, optimizer))}
    try:
        return {
            "state": {index[n]: s for n, s in named["state"].items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in named["param_groups"]],
        }
    except KeyError as missing:
        raise ShoalError(
            f"the saved optimizer state names parameter {missing}, which this optimizer does not hold; "
            "load a state saved from the same model and optimizer"
        ) from None


def _names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The model's name of each optimizer parameter, in the optimizer's order (torch's indices)."""
    names = {p: n for n, p in model.named_parameters()}
    return [names[p] for g in optimizer.param_groups for p in g["params"]]
