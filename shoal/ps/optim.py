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

import math

import torch

from shoal.errors import ConfigError, ShoalError
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


FLAGS = ("nesterov", "maximize", "amsgrad", "decoupled_weight_decay")
"""Switches that shape an optimizer's state and arithmetic: fixed when the servers start."""
NONNEGATIVE = ("lr", "momentum", "weight_decay", "eps")
"""Numbers that must be finite and >= 0 (as torch's constructors require); `dampening` is any finite number."""


def hyperparameters(name: str, group: dict) -> dict:
    """A param group's hyperparameters as plain numbers (for the wire); ShoalError naming
    the first one the servers would refuse (a NaN or negative learning rate, ...)."""
    out = {}
    for k in HYPER[name][1]:
        if k not in group:
            continue
        v = group[k]
        if isinstance(v, torch.Tensor):
            v = v.item()
        out[k] = [float(x) for x in v] if isinstance(v, (tuple, list)) else v
    try:
        check_hyperparameters(name, out)
    except ValueError as exc:
        raise ShoalError(
            f"the parameter server cannot apply this {name} param group: {exc} "
            "(check the LR schedule or whatever changes the optimizer's param_groups)"
        ) from None
    return out


def _number(key: str, v: object) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"{key} must be a finite number, not {v!r}")
    v = float(v)
    if key in NONNEGATIVE and v < 0:
        raise ValueError(f"{key} must be >= 0, not {v!r}")
    return v


def check_hyperparameters(name: str, hp: object, fixed: dict | None = None) -> dict:
    """The received hyperparameters if every one is well formed and in range, else ValueError.

    With `fixed` (the group's hyperparameters when the servers started), a
    switch in `FLAGS` must keep its value: changing e.g. `amsgrad` mid-run
    would need optimizer state the servers do not have.
    """
    allowed = HYPER[name][1]
    if not isinstance(hp, dict) or not set(hp) <= set(allowed):
        raise ValueError(f"hyperparameters must be some of {', '.join(allowed)}")
    out: dict = {}
    for k, v in hp.items():
        if k == "betas":
            if not (isinstance(v, (list, tuple)) and len(v) == 2):
                raise ValueError(f"betas must be two numbers in [0, 1), not {v!r}")
            betas = tuple(_number(k, x) for x in v)
            if not all(0.0 <= b < 1.0 for b in betas):
                raise ValueError(f"betas must be two numbers in [0, 1), not {v!r}")
            out[k] = betas
        elif k in FLAGS:
            if not isinstance(v, bool):
                raise ValueError(f"{k} must be true or false, not {v!r}")
            if fixed is not None and v != fixed.get(k, v):
                raise ValueError(f"{k} cannot change after the servers started (it was {fixed[k]})")
            out[k] = v
        else:
            out[k] = _number(k, v)
    return out


def build(name: str, param: torch.Tensor, hp: dict) -> torch.optim.Optimizer:
    cls = HYPER[name][0]
    return cls([param], **hp, foreach=False)


def flags(name: str, hp: dict) -> dict:
    """The `FLAGS` an optimizer built with `hp` runs with (torch's defaults filled in);
    ValueError if torch refuses `hp`."""
    group = build(name, torch.zeros(1), hp).param_groups[0]
    return {k: group[k] for k in FLAGS if k in group and k in HYPER[name][1]}


# What each optimizer keeps per parameter, as torch names it: a checkpoint
# carries these for every piece, so a resumed server continues exactly.
STATE: dict[str, tuple[str, ...]] = {
    "SGD": ("momentum_buffer",),
    "Adam": ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"),
    "AdamW": ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"),
}
SCALARS = ("step",)
REQUIRED: dict[str, tuple[str, ...]] = {
    "SGD": (),
    "Adam": ("step", "exp_avg", "exp_avg_sq"),
    "AdamW": ("step", "exp_avg", "exp_avg_sq"),
}
"""What a piece's state must hold if it holds anything (torch's step needs all of it; amsgrad adds max_exp_avg_sq)."""


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
        if not all_finite(value):
            raise ValueError(f"{key} holds inf or NaN")
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
    need = set(REQUIRED[name]) | ({"max_exp_avg_sq"} if opt.param_groups[0].get("amsgrad") else set())
    if state and not need <= set(state):
        raise ValueError(f"{name}'s state needs {', '.join(sorted(need))} together, not only {', '.join(state)}")
    opt.state[param] = state
