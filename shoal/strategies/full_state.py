"""What a full state dict is (`Strategy.full_state_dict`), and the copies torch's
state-dict helpers need: they rewrite the dicts they are given and hand back
tensors that training goes on changing."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from shoal.errors import ShoalError


def full_options(whole: bool = True) -> Any:
    """torch's options for whole tensors on every rank (`whole=False`: as they are)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # Not cpu_offload: with it torch gathers onto rank 0 only.
    return StateDictOptions(full_state_dict=whole)


def has_arrays(tree: Any) -> bool:
    """Whether `tree` holds a tensor of one or more dimensions."""
    if isinstance(tree, torch.Tensor):
        return tree.dim() > 0
    if isinstance(tree, dict):
        return any(has_arrays(v) for v in tree.values())
    if isinstance(tree, list | tuple):
        return any(has_arrays(v) for v in tree)
    return False


def cpu_copy(tree: Any) -> Any:
    """`tree` with every tensor copied to the CPU (a snapshot: training on does not change it)."""
    if isinstance(tree, torch.Tensor):
        return tree.detach().to("cpu", copy=True)
    if isinstance(tree, dict):
        return {k: cpu_copy(v) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return type(tree)(cpu_copy(v) for v in tree)
    return tree


def copy_containers(tree: Any) -> Any:
    """`tree` with new dicts and lists around the same leaves."""
    if isinstance(tree, dict):
        return {k: copy_containers(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [copy_containers(v) for v in tree]
    return tree


def check_full_state(module: nn.Module, state: Any, with_optimizer: bool) -> None:
    """A ShoalError in one sentence if `state` is not a full state dict of this model."""
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise ShoalError(
            "load_full_state_dict takes what full_state_dict returned ({'model': ..., 'optimizer': ...}); "
            "load a plain model state dict with the unprepared model's load_state_dict"
        )
    expected, given = set(module.state_dict()), set(state["model"])
    if expected != given:
        missing, unexpected = sorted(expected - given)[:5], sorted(given - expected)[:5]
        raise ShoalError(
            f"the saved model state does not fit this model (missing {missing}, unexpected {unexpected}): "
            "load it into the model it was saved from"
        )
    if with_optimizer and not isinstance(state.get("optimizer"), dict):
        raise ShoalError(
            "this state holds no optimizer state: save it with full_state_dict(model, optimizer), "
            "or load the model alone with load_full_state_dict(model, state)"
        )
