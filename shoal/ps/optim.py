"""The optimizers a parameter server can run, and their hyperparameters.

Servers run torch's own optimizer classes, one instance per piece of a
parameter: SGD, Adam and AdamW update each element from that element's
gradient and state alone, so stepping pieces separately is the same
arithmetic as stepping the whole tensor. Only these per-element optimizers
are accepted; one that couples elements (LBFGS, Adafactor, ...) is refused at
`prepare`. A worker sends its param groups' current hyperparameters with
every push, so LR schedulers on the worker's optimizer drive the servers.
"""

from __future__ import annotations

import torch

from shoal.errors import ConfigError
from shoal.finite import all_finite

_ADAM = ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize")
HYPER: dict[str, tuple[type, tuple[str, ...]]] = {
    "SGD": (torch.optim.SGD, ("lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize")),
    "Adam": (torch.optim.Adam, (*_ADAM, "decoupled_weight_decay")),
    "AdamW": (torch.optim.AdamW, _ADAM),
}


def optimizer_name(optimizer: torch.optim.Optimizer) -> str:
    name = type(optimizer).__name__
    if name not in HYPER or type(optimizer) is not HYPER[name][0]:
        raise ConfigError(
            "the parameter server runs the optimizer on its servers and supports torch.optim.SGD, Adam and AdamW, "
            f"not {type(optimizer).__module__}.{type(optimizer).__qualname__}; "
            "use one of those or strategy 'data_parallel'",
            "optimizer",
        )
    return name


def hyperparameters(name: str, group: dict) -> dict:
    """A param group's hyperparameters as plain numbers (for the wire)."""
    out = {}
    for k in HYPER[name][1]:
        if k not in group:
            continue
        v = group[k]
        if isinstance(v, torch.Tensor):
            v = v.item()
        out[k] = [float(x) for x in v] if isinstance(v, (tuple, list)) else v
    return out


def check_hyperparameters(name: str, hp: object) -> dict:
    """The received hyperparameters if they are well formed, else ValueError."""
    allowed = HYPER[name][1]
    if not isinstance(hp, dict) or not set(hp) <= set(allowed):
        raise ValueError("unknown hyperparameters")
    out = {}
    for k, v in hp.items():
        if k == "betas":
            if not (isinstance(v, list) and len(v) == 2 and all(isinstance(x, float) for x in v)):
                raise ValueError("bad betas")
            out[k] = tuple(v)
        elif isinstance(v, (bool, int, float)):
            out[k] = v
        else:
            raise ValueError(f"bad {k}")
    return out


def build(name: str, param: torch.Tensor, hp: dict) -> torch.optim.Optimizer:
    cls = HYPER[name][0]
    return cls([param], **hp, foreach=False)


# What each optimizer keeps per parameter, as torch names it: a checkpoint
# carries these for every piece, so a resumed server continues exactly.
STATE: dict[str, tuple[str, ...]] = {
    "SGD": ("momentum_buffer",),
    "Adam": ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"),
    "AdamW": ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"),
}
SCALARS = ("step",)


def export_state(name: str, opt: torch.optim.Optimizer, param: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """One piece's optimizer state as (torch's name, tensor) pairs, in a fixed order."""
    state = opt.state.get(param, {})
    return [(k, state[k]) for k in STATE[name] if isinstance(state.get(k), torch.Tensor)]


def import_state(
    name: str, opt: torch.optim.Optimizer, param: torch.Tensor, items: list[tuple[str, torch.Tensor]]
) -> None:
    """Check (ValueError) then install state as `export_state` gives it; nothing changes on error."""
    state = {}
    for key, value in items:
        if key not in STATE[name] or key in state:
            raise ValueError(f"{name} keeps no state named {key!r}")
        if key in SCALARS:
            if value.numel() != 1 or not value.is_floating_point() or not all_finite(value) or float(value) < 0:
                raise ValueError(f"{key} must be one finite number >= 0")
            state[key] = value.detach().reshape(()).to(torch.float32).clone()
        elif value.dtype != param.dtype or value.shape != param.shape:
            raise ValueError(
                f"{key} has {value.dtype}{list(value.shape)}, the parameter {param.dtype}{list(param.shape)}"
            )
        else:
            state[key] = value.detach().clone()
    opt.state[param] = state
