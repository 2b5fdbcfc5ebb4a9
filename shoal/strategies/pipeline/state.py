"""The whole model's state from pipeline stages, and back: tensors and JSON only, never pickle.

Each pipeline rank in turn broadcasts a JSON header (names, dtypes, shapes,
plain values, optimizer groups) as a uint8 tensor, then its tensors, over
the pipeline group; every rank merges them into torch's full state dict
format under the plain model's names: `{"model": {name: tensor}, "optimizer":
{"state": {param: {...}}, "param_groups": [{..., "params": [param, ...]}]}}`.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from shoal import runtime
from shoal.errors import ShoalError

if TYPE_CHECKING:
    from shoal.strategies.pipeline.strategy import Pipeline

DTYPES = {str(t): t for t in (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32)}
DTYPES.update({str(torch.bool): torch.bool, str(torch.uint8): torch.uint8, str(torch.int8): torch.int8})


def _plain(v: Any) -> Any:
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        return v.item()
    raise TypeError(f"an optimizer setting of type {type(v).__name__} cannot be gathered")


def _local(strategy: Pipeline, optimizer: torch.optim.Optimizer | None) -> tuple[dict[str, Any], list[torch.Tensor]]:
    """This rank's header and tensors."""
    module = strategy.stages.by_name
    tensors: list[torch.Tensor] = []
    entries: list[list[Any]] = []  # [key, name, state key or "", dtype, shape]
    values: list[list[Any]] = []  # [name, state key, plain value]
    for name, t in module.state_dict().items():
        entries.append(["model", name, "", str(t.dtype), list(t.shape)])
        tensors.append(t.detach())
    groups: list[dict[str, Any]] = []
    if optimizer is not None:
        names = {id(p): n for n, p in module.named_parameters()}
        for group in optimizer.param_groups:
            settings = {k: v for k, v in group.items() if k != "params"}
            groups.append({"settings": json.dumps(settings, sort_keys=True, default=_plain)})
            groups[-1]["params"] = [names[id(p)] for p in group["params"]]
            for p in group["params"]:
                for key, v in optimizer.state.get(p, {}).items():
                    if isinstance(v, torch.Tensor):
                        entries.append(["optim", names[id(p)], key, str(v.dtype), list(v.shape)])
                        tensors.append(v.detach())
                    else:
                        values.append([names[id(p)], key, v])
    return {"entries": entries, "values": values, "groups": groups}, tensors


def _broadcast_json(header: dict[str, Any] | None, src: int, group: Any, device: torch.device) -> dict[str, Any]:
    size = torch.zeros(1, dtype=torch.int64, device=device)
    data = None
    if header is not None:
        data = torch.frombuffer(bytearray(json.dumps(header).encode()), dtype=torch.uint8).to(device)
        size[0] = data.numel()
    dist.broadcast(size, src=src, group=group)
    if data is None:
        data = torch.empty(int(size), dtype=torch.uint8, device=device)
    dist.broadcast(data, src=src, group=group)
    return json.loads(bytes(data.cpu().tolist()).decode())


def gather(strategy: Pipeline, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    """Every stage's state, merged, on every rank of the pipeline group (collective)."""
    device = runtime.current().device
    group = strategy.mesh.group("pp")
    own_header, own_tensors = _local(strategy, optimizer)
    model: dict[str, torch.Tensor] = {}
    optim_state: dict[str, dict[str, Any]] = {}
    groups: dict[str, list[str]] = {}  # settings (JSON) -> parameter names
    for pp_rank in range(strategy.options.stages):
        src = dist.get_global_rank(group, pp_rank)
        mine = src == dist.get_rank()
        header = _broadcast_json(own_header if mine else None, src, group, device)
        for i, (kind, name, key, dtype, shape) in enumerate(header["entries"]):
            t = own_tensors[i].to(device) if mine else torch.empty(shape, dtype=DTYPES[dtype], device=device)
            dist.broadcast(t, src=src, group=group)
            if kind == "model":
                model[name] = t.cpu()
            else:
                optim_state.setdefault(name, {})[key] = t.cpu()
        for name, key, value in header["values"]:
            optim_state.setdefault(name, {})[key] = value
        for g in header["groups"]:
            groups.setdefault(g["settings"], []).extend(g["params"])
    out: dict[str, Any] = {"model": model}
    if optimizer is not None:
        order = {n: i for i, n in enumerate(strategy.all_names)}
        own = {json.dumps(_settings(g), sort_keys=True, default=_plain): _settings(g) for g in optimizer.param_groups}
        param_groups: list[dict[str, Any]] = []
        for settings, names in groups.items():
            values: dict[str, Any] = own[settings] if settings in own else json.loads(settings)
            param_groups.append({**values, "params": sorted(names, key=order.__getitem__)})
        param_groups.sort(key=lambda g: order[g["params"][0]] if g["params"] else len(order))
        state = {n: optim_state[n] for n in sorted(optim_state, key=order.__getitem__)}
        out["optimizer"] = {"state": state, "param_groups": param_groups}
    return out


def _settings(group: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in group.items() if k != "params"}


def scatter(strategy: Pipeline, full: dict[str, Any], optimizer: torch.optim.Optimizer | None) -> None:
    """This rank's part of a full state dict into its stage (and optimizer); no communication."""
    module = strategy.stages.by_name
    wanted = module.state_dict().keys()
    missing = [k for k in wanted if k not in full["model"]]
    if missing:
        raise ShoalError(
            f"the state to load lacks {len(missing)} of this pipeline stage's entries (e.g. {missing[0]}); "
            "load a full_state_dict of the same model"
        )
    module.load_state_dict({k: full["model"][k] for k in wanted})
    if optimizer is None or "optimizer" not in full:
        return
    saved = full["optimizer"]
    names = {id(p): n for n, p in module.named_parameters()}
    index: dict[str, int] = {}
    param_groups = []
    for group in optimizer.param_groups:
        ids = []
        for p in group["params"]:
            index[names[id(p)]] = len(index)
            ids.append(index[names[id(p)]])
        first = names[id(group["params"][0])] if group["params"] else None
        source = next((g for g in saved["param_groups"] if first in g["params"]), None)
        settings = _settings(source) if source is not None else _settings(group)
        param_groups.append({**settings, "params": ids})
    state = {index[n]: v for n, v in saved["state"].items() if n in index}
    optimizer.load_state_dict({"state": state, "param_groups": param_groups})
