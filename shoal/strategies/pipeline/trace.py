"""Pipeline stages of a model that is not an `nn.Sequential`, traced by torch.

torch's own frontend (`torch.distributed.pipelining.pipeline`, on
`torch.export`) cuts the traced forward before the modules that start
stages 2..S. The cut candidates ("units") are the model's top-level children
that hold parameters, with containers (ModuleList, ModuleDict, Sequential)
opened into their entries, in definition order. Each stage keeps the model's
parameter objects under their whole-model names, so optimizers, checkpoints
and `full_state_dict` see the plain model's names.

An exported graph is fixed to its input's shape and to train/eval mode (a
dropout is baked in as on or off), so stages are traced per (mode, shape)
and cached by the caller.
"""

from __future__ import annotations

import inspect
import warnings
from typing import Any

import torch
from torch import nn

from shoal.errors import ConfigError

CONTAINERS = (nn.ModuleList, nn.ModuleDict, nn.Sequential)
RESTRUCTURE = (
    "make the model an nn.Sequential of blocks that each take and return one tensor "
    "(its children are the pipeline's blocks)"
)


def units(model: nn.Module) -> dict[str, nn.Module]:
    """The modules a stage may start at, by qualified name, in definition order (those with parameters)."""
    out: dict[str, nn.Module] = {}
    for name, child in model.named_children():
        if isinstance(child, CONTAINERS):
            for sub, module in child.named_children():
                out[f"{name}.{sub}"] = module
        else:
            out[name] = child
    return {n: m for n, m in out.items() if any(True for _ in m.parameters())}


def check_traceable(model: nn.Module) -> None:
    """Refuse early a forward that needs more than the one input tensor a pipeline feeds it."""
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    required = [p.name for p in params if p.kind in kinds and p.default is inspect.Parameter.empty]
    if len(required) > 1:
        raise ConfigError(
            f"a pipeline feeds one tensor to {type(model).__name__}.forward, which needs {len(required)} "
            f"({', '.join(required)}); {RESTRUCTURE}, and keep state such as a recurrent hidden state "
            "inside the model",
            "strategy.name",
        )


def owner_names(model: nn.Module, chunks: list[list[str]]) -> list[set[str]]:
    """The parameter names each chunk will hold (the root's own parameters with the first chunk)."""
    held: list[set[str]] = [set() for _ in chunks]
    for i, chunk in enumerate(chunks):
        for unit in chunk:
            held[i].update(f"{unit}.{n}" for n, _ in model.get_submodule(unit).named_parameters())
    claimed = set().union(*held)
    held[0].update(n for n, _ in model.named_parameters() if n not in claimed)
    return held


def trace_stages(model: nn.Module, starts: list[str], example: torch.Tensor, training: bool) -> list[nn.Module]:
    """Every stage module of `model` cut before the `starts` modules, traced on `example` in that mode."""
    from torch.distributed.pipelining import SplitPoint, pipeline

    was_training = model.training
    model.train(training)
    try:
        with warnings.catch_warnings():  # torch's own deprecation, inside its frontend
            warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
            pipe = pipeline(model, mb_args=(example,), split_spec=dict.fromkeys(starts, SplitPoint.BEGINNING))
    except Exception as e:  # torch.export's errors have no common base
        cause = e.__cause__ or e
        brief = (str(cause).strip().splitlines() or [type(cause).__name__])[0][:200]
        raise ConfigError(
            f"torch.export cannot trace {type(model).__name__}.forward to split it into pipeline stages "
            f"({type(cause).__name__}: {brief}); {RESTRUCTURE}, or remove data-dependent control flow from forward",
            "strategy.name",
        ) from e
    finally:
        _unannotate(model, starts)
        model.train(was_training)
    if pipe.num_stages != len(starts) + 1:
        raise ConfigError(
            f"splitting {type(model).__name__} before {starts} gave {pipe.num_stages} stages, not {len(starts) + 1}: "
            "a stage must start at a module that forward calls exactly once",
            "split",
        )
    stages = [pipe.get_stage_module(i) for i in range(pipe.num_stages)]
    _check_single_output(model, stages[-1])
    return stages


def check_owners(model: nn.Module, stages: list[nn.Module], expected: list[set[str]]) -> None:
    """The traced stages hold the parameters the split assigned them (else forward calls modules out of order)."""
    seen: set[str] = set()
    for i, (stage, want) in enumerate(zip(stages, expected, strict=True)):
        got = {n for n, _ in stage.named_parameters()}
        shared = sorted(seen & got)
        seen |= got
        if shared or any(p is not model.get_parameter(n) for n, p in stage.named_parameters()):
            raise ConfigError(
                f"{type(model).__name__} uses parameters in more than one pipeline stage ({', '.join(shared[:4])}), "
                "e.g. tied embedding and output weights; untie them, or keep their users in one stage with "
                "split = [...]",
                "split",
            )
        if got != want:
            moved = sorted(got ^ want)[:4]
            raise ConfigError(
                f"{type(model).__name__}.forward calls its modules in another order than it defines them, so "
                f"pipeline stage {i} would not hold the expected parameters ({', '.join(moved)}); define the "
                "modules in the order forward uses them, or give split = [names of the modules where stages start]",
                "split",
            )


def loose_state(model: nn.Module, chunks: list[list[str]]) -> list[str]:
    """Parameters and buffers outside every block (the root's own): the first chunk keeps them."""
    blocks = tuple(f"{u}." for chunk in chunks for u in chunk)
    names = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]
    return [n for n in names if not n.startswith(blocks)]


def _unannotate(model: nn.Module, starts: list[str]) -> None:
    """Undo torch's split-point annotation (it replaces `forward` on the instance)."""
    for name in starts:
        module = model.get_submodule(name)
        if "_orig_forward" in vars(module):
            del module._orig_forward
            vars(module).pop("forward", None)


def _check_single_output(model: nn.Module, last: nn.Module) -> None:
    graph: Any = getattr(last, "graph", None)
    if graph is None:
        return
    out = next(n for n in graph.nodes if n.op == "output").args[0]
    if isinstance(out, (tuple, list)) and len(out) != 1:
        raise ConfigError(
            f"a pipeline needs {type(model).__name__}.forward to return one tensor (the loss is computed from it "
            f"on the last stage), not {len(out)} values; return only the output and compute the loss outside",
            "strategy.name",
        )
