"""What a pipeline `prepare` builds: this rank's chunks, and the model object the user's loop calls."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from shoal.errors import ConfigError

if TYPE_CHECKING:
    from shoal.strategies.base import LossFn
    from shoal.strategies.pipeline.strategy import Pipeline


class Chunk(nn.Module):
    """Some consecutive children of a Sequential, under their original names."""

    def __init__(self, children: dict[str, nn.Module]) -> None:
        super().__init__()
        for name, module in children.items():
            self.add_module(name, module)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for module in self.children():
            x = module(x)
        return x


def shell(model: nn.Module, names: list[str]) -> nn.Module:
    """A module holding `names` (submodules, parameters or buffers of `model`) at their dotted paths.

    What this rank holds of a traced model, under the whole model's names
    (for `state_dict`, checkpoints, and an optimizer made after `prepare`).
    """
    root = nn.Module()
    for name in names:
        *path, leaf = name.split(".")
        node = root
        for part in path:
            if not hasattr(node, part):
                node.add_module(part, nn.Module())
            node = getattr(node, part)
        owner = model.get_submodule(".".join(path))
        if leaf in owner._modules:
            node.add_module(leaf, owner._modules[leaf])
        elif leaf in owner._parameters:
            node.register_parameter(leaf, owner._parameters[leaf])
        else:
            node.register_buffer(leaf, owner._buffers[leaf], persistent=leaf not in owner._non_persistent_buffers_set)
    return root


@dataclass
class Runner:
    """Stage modules for one kind of call, and torch's schedule over them (built at the first training step)."""

    by_index: nn.ModuleDict
    """This rank's chunks by index, as the schedule runs them."""
    schedule: Any = None


@dataclass
class Stages:
    """The cut, and this rank's part of it."""

    chunks: list[list[str]]
    """Block names of every chunk, in model order (children of a Sequential, or traced units)."""
    imbalance: float
    held: list[int]
    """Indices of the chunks on this rank (chunk c sits on pipeline rank c mod stages)."""
    by_name: nn.Module
    """This rank's blocks under the whole model's names (for checkpoints)."""
    source: nn.Module | None = None
    """The whole model, kept to trace stages for a new input shape or mode; None for a Sequential."""
    owners: list[set[str]] = field(default_factory=list)
    """Parameter names each chunk holds (traced models)."""
    runners: dict[Any, Runner] = field(default_factory=dict)
    """Runners by (training, input shape, dtype); one under None for a Sequential."""


class PipelinedModel(nn.Module):
    """What `prepare` returns: `model(x, y)` trains through the schedule (in eval mode or without
    gradients it returns the loss of a plain forward); `model(x)` in eval mode predicts, returning the
    output on every rank.

    It holds this rank's blocks under the whole model's names, so its
    `parameters()` (for an optimizer made after `prepare`) are this stage's and
    its `state_dict()` keys are the plain model's.
    """

    def __init__(self, strategy: Pipeline, held: nn.Module) -> None:
        super().__init__()
        self._pipeline = strategy
        for name, child in held.named_children():
            self.add_module(name, child)
        for name, p in held.named_parameters(recurse=False):
            self.register_parameter(name, p)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None, loss_fn: LossFn | None = None) -> Any:
        s = self._pipeline
        if self.training and torch.is_grad_enabled() and y is not None:
            loss = s.run_schedule(x, y, loss_fn or s.loss_fn)
            return loss.detach().requires_grad_()  # backward already ran inside the schedule
        if self.training and torch.is_grad_enabled():
            # `loss_fn(model(x), y)` cannot work: the output exists only on the last
            # stage and backward must run in the schedule.
            raise ConfigError(
                "a pipelined model trains through its schedule: write `loss = model(x, y)` (the loss is computed "
                "on the last stage), or call model.eval() / torch.no_grad() to predict with model(x)",
                "strategy.name",
            )
        out = s.predict(x, training=self.training)
        if y is None or out is None:
            return out
        return (loss_fn or s.loss_fn)(out, y)  # evaluating with a target: the loss, as in training
