"""The optimizers a parameter server can run, and their hyperparameters.

Servers run torch's own optimizer classes, one instance per piece of a
parameter. Every class in `ELEMENTWISE` updates each element from that
element's gradient and state (plus per-parameter scalars that depend only
on the step count), so stepping pieces separately is the same arithmetic as
stepping the whole tensor. A class is named on the wire by its name and
looked up in this allow-list, never imported from a path. Classes that couple
elements are refused at `prepare` with the reason (`REFUSED`). A worker sends
its param groups' current hyperparameters with every push, so LR schedulers
on the worker's optimizer drive the servers; each is checked by the type of
the class's own default and by the range torch's constructor requires.
"""

from __future__ import annotations

import functools
import inspect
import math
from typing import Any

import torch

from shoal.errors import ConfigError, ShoalError
from shoal.finite import all_finite

_O = torch.optim
ELEMENTWISE: dict[str, type[torch.optim.Optimizer]] = {
    c.__name__: c
    for c in (
        _O.SGD,
        _O.Adam,
        _O.AdamW,
        _O.Adadelta,
        _O.Adagrad,
        _O.Adamax,
        _O.ASGD,
        _O.NAdam,
        _O.RAdam,
        _O.RMSprop,
        _O.Rprop,
    )
}
REFUSED = {
    "LBFGS": "it re-evaluates the whole model through a closure",
    "SparseAdam": "it needs sparse gradients, which the servers do not receive",
    "Adafactor": "it factors row and column statistics and scales by the norm of the whole parameter, "
    "which a piece of a parameter does not have",
    "Muon": "it orthogonalizes whole matrices, which a piece of a parameter does not have",
}
"""Why a torch.optim class cannot run on pieces of parameters."""
IMPLEMENTATION = ("foreach", "fused", "capturable", "differentiable")
"""Constructor switches that choose torch's kernels, not the arithmetic: the servers pick their own."""


@functools.cache
def _defaults(name: str) -> dict[str, object]:
    """The hyperparameters `name`'s constructor takes, with its defaults (their types are the rule)."""
    sig = inspect.signature(ELEMENTWISE[name].__init__)
    skip = {"self", "params", *IMPLEMENTATION}
    return {
        k: p.default for k, p in sig.parameters.items() if k not in skip and p.default is not inspect.Parameter.empty
    }


def allowed(name: str) -> tuple[str, ...]:
    """The hyperparameters a param group of `name` may carry over the wire."""
    return tuple(_defaults(name))


def flag_names(name: str) -> tuple[str, ...]:
    """Switches (true/false) that shape the optimizer's state and arithmetic: fixed when the servers start."""
    return tuple(k for k, v in _defaults(name).items() if isinstance(v, bool))


def optimizer_name(cls: type[torch.optim.Optimizer]) -> str:
    """The allow-listed class `cls` runs as; ConfigError in one sentence for any other."""
    base = next(
        (c for c in cls.__mro__ if c.__module__.startswith("torch.optim") and c is not torch.optim.Optimizer), None
    )
    name = base.__name__ if base is not None else ""
    if base is None or name not in ELEMENTWISE or ELEMENTWISE[name] is not base:
        why = REFUSED.get(name)
        shown = f"{cls.__module__}.{cls.__qualname__}"
        raise ConfigError(
            f"the parameter server cannot run {shown} on its servers"
            + (f" because {why}" if why else "")
            + f"; use one of {', '.join(ELEMENTWISE)}, or strategy 'data_parallel'",
            "optimizer",
        )
    own = {k for c in cls.__mro__[: cls.__mro__.index(base)] for k, v in vars(c).items() if callable(v)}
    extra = own - {"__init__", "__init_subclass__"}
    if extra:
        raise ConfigError(
            f"{cls.__module__}.{cls.__qualname__} overrides {', '.join(sorted(extra))} of "
            f"torch.optim.{name}, and only torch's own {name} runs on the servers; use torch.optim.{name} "
            "(a subclass may change only its defaults), or strategy 'data_parallel'",
            "optimizer",
        )
    return name


NONNEGATIVE = ("lr", "momentum", "weight_decay", "eps", "lr_decay", "initial_accumulator_value", "momentum_decay")
NONNEGATIVE += ("alpha", "lambd", "t0")
"""Numbers that must be >= 0 (as torch's constructors require); others (`dampening`) are any finite number."""


def hyperparameters(name: str, group: dict) -> dict:
    """A param group's hyperparameters as plain numbers (for the wire); ShoalError naming
    the first one the servers would refuse (a NaN or negative learning rate, ...)."""
    out = {}
    for k in allowed(name):
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


def _pair(key: str, v: object) -> tuple[float, float]:
    if not (isinstance(v, (list, tuple)) and len(v) == 2):
        raise ValueError(f"{key} must be two numbers, not {v!r}")
    a, b = (_number(key, x) for x in v)
    if key == "betas" and not (0.0 <= a < 1.0 and 0.0 <= b < 1.0):
        raise ValueError(f"betas must be two numbers in [0, 1), not {v!r}")
    if key == "etas" and not 0.0 < a < 1.0 < b:
        raise ValueError(f"etas must be (minus, plus) with 0 < minus < 1 < plus, not {v!r}")
    if key == "step_sizes" and not 0.0 <= a <= b:
        raise ValueError(f"step_sizes must be (min, max) with 0 <= min <= max, not {v!r}")
    return a, b


def check_hyperparameters(name: str, hp: object, fixed: dict | None = None) -> dict:
    """The received hyperparameters if every one is well formed and in range, else ValueError.

    Each is checked by the type of the class's default (switch, number, pair).
    With `fixed` (the group's switches when the servers started), a switch must
    keep its value: changing e.g. `amsgrad` mid-run would need optimizer state
    the servers do not have; so must whether RMSprop's momentum is zero.
    """
    defaults = _defaults(name)
    if not isinstance(hp, dict) or not set(hp) <= set(defaults):
        raise ValueError(f"hyperparameters must be some of {', '.join(defaults)}")
    out: dict = {}
    for k, v in hp.items():
        default = defaults[k]
        if isinstance(default, bool):
            if not isinstance(v, bool):
                raise ValueError(f"{k} must be true or false, not {v!r}")
            if fixed is not None and v != fixed.get(k, v):
                raise ValueError(f"{k} cannot change after the servers started (it was {fixed[k]})")
            out[k] = v
        elif isinstance(default, tuple):
            out[k] = _pair(k, v)
        else:
            out[k] = _number(k, v)
            if k == "rho" and out[k] > 1:
                raise ValueError(f"rho must be in [0, 1], not {v!r}")
    switched = fixed is not None and "momentum" in out and (out["momentum"] > 0) != (fixed.get("momentum", 0) > 0)
    if name == "RMSprop" and switched:
        raise ValueError("RMSprop's momentum cannot turn on or off after the servers started")
    return out


def build(name: str, param: torch.Tensor, hp: dict) -> torch.optim.Optimizer:
    cls: Any = ELEMENTWISE[name]  # every class here takes `foreach`
    return cls([param], **hp, foreach=False)


def flags(name: str, hp: dict) -> dict:
    """What must stay fixed in an optimizer built with `hp` (torch's defaults filled in);
    ValueError if torch refuses `hp`."""
    group = build(name, torch.zeros(1), hp).param_groups[0]
    fixed = {k: group[k] for k in flag_names(name) if k in group}
    if name == "RMSprop":
        fixed["momentum"] = group["momentum"]
    return fixed


def export_state(opt: torch.optim.Optimizer, param: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """One piece's optimizer state as (torch's name, tensor) pairs, in name order."""
    state = opt.state.get(param, {})
    return [(k, state[k]) for k in sorted(state) if isinstance(state[k], torch.Tensor)]


def state_template(name: str, hp: dict) -> dict[str, torch.Tensor]:
    """The state `name` keeps for a parameter under the group's `hp`: what one step
    with a zero gradient creates, on a probe of one element."""
    probe = torch.zeros(1)
    made = build(name, probe, {k: v for k, v in hp.items() if k in _defaults(name)})
    probe.grad = torch.zeros(1)
    made.step()
    return dict(made.state[probe])


def import_state(
    name: str, opt: torch.optim.Optimizer, param: torch.Tensor, items: list[tuple[str, torch.Tensor]]
) -> None:
    """Check (ValueError) then install state as `export_state` gives it; nothing changes on error.

    The names must be exactly what the class keeps under the group's settings
    (or none: the optimizer's own fresh state), scalars one finite number, the
    rest the parameter's dtype and shape, every value finite."""
    if not items:
        return
    template = state_template(name, opt.param_groups[0])
    state: dict[str, torch.Tensor] = {}
    for key, value in items:
        if key not in template or key in state:
            raise ValueError(f"{name} keeps no state named {key!r} here (it keeps {', '.join(sorted(template))})")
        if not all_finite(value):
            raise ValueError(f"{key} holds inf or NaN")
        if template[key].dim() == 0:
            if value.numel() != 1 or not value.is_floating_point() or (key == "step" and float(value) < 0):
                raise ValueError(f"{key} must be one finite number" + (" >= 0" if key == "step" else ""))
            state[key] = value.detach().reshape(()).to(template[key].dtype).clone()
        elif value.dtype != param.dtype or value.shape != param.shape:
            raise ValueError(
                f"{key} has {value.dtype}{list(value.shape)}, the parameter {param.dtype}{list(param.shape)}"
            )
        else:
            state[key] = value.detach().clone()
    if set(state) != set(template):
        raise ValueError(f"{name}'s state needs {', '.join(sorted(template))} together, not only {', '.join(state)}")
    opt.state[param] = state
