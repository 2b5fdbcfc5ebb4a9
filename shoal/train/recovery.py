"""Recovery points: each rank's whole training state, every few steps, on local disk.

A checkpoint is durable and shared, and costs a collective write with
checksums; a recovery point only has to outlive a killed process until the
elastic agent restarts it. So each rank writes its own, with no collective:
the same state a checkpoint holds (the shared model and optimizer state,
the per-rank parts, the step) as one tensor file (`tensors.pt`) and one
JSON file (`state.json`) in `RUN_DIR/recovery/rank{r}/step-N`, written
into `step-N.tmp` and renamed, not fsynced (the page cache outlives a
process; a machine that dies loses them, and the checkpoints remain).
The newest two are kept, so that whichever step the ranks agree on, each
has it.

On a restart every rank loads the newest step that every rank has (an
all-reduce MIN of each rank's newest), if it is newer than the checkpoint
the run would resume from. The tensor file is read with
`torch.load(weights_only=True)` and must hold only tensors; nothing is
unpickled otherwise.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from shoal import runtime
from shoal.errors import CheckpointError
from shoal.train.checkpoint import Stateful, split_flat, split_tensors

TENSORS = "tensors.pt"
STATE = "state.json"
KEEP = 2


class RecoveryPoints:
    """One rank's recovery points: `save` every `every` steps, `newest_common` and `load` on a restart."""

    def __init__(self, root: Path, every: int, *, shared: Stateful, parts: Mapping[str, Stateful]) -> None:
        self.root = Path(root) / f"rank{runtime.current().rank}"
        self.every = every
        self.shared = shared
        self.parts = dict(parts)

    def clear(self) -> None:
        """Forget an earlier attempt's points (a fresh start must not resume from them)."""
        shutil.rmtree(self.root, ignore_errors=True)

    def save(self, step: int) -> Path | None:
        """Write the point of `step` if one is due; its folder."""
        if not self.every or step % self.every:
            return None
        tensors, plain = split_tensors(self.shared.state_dict())
        record: dict[str, Any] = {"step": step, "shared": plain, "parts": {}}
        own: dict[str, Any] = {}
        for name, part in self.parts.items():
            part_tensors, values = split_flat(name, part.state_dict())
            record["parts"][name] = values
            own[name] = {k: v.detach().cpu() for k, v in part_tensors.items()}
        final = self.root / f"step-{step:08d}"
        tmp = final.with_name(final.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        torch.save({"shared": _cpu(tensors), "parts": own}, tmp / TENSORS)
        (tmp / STATE).write_text(json.dumps(record))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in self.steps()[:-KEEP]:
            shutil.rmtree(self.root / f"step-{old:08d}", ignore_errors=True)
        return final

    def steps(self) -> list[int]:
        """The steps of this rank's complete points, oldest first."""
        if not self.root.is_dir():
            return []
        return sorted(
            int(p.name[5:])
            for p in self.root.iterdir()
            if p.name.startswith("step-") and p.name[5:].isdigit() and (p / STATE).is_file()
        )

    def newest_common(self) -> int:
        """Collective: the newest step whose point every rank has (0: none)."""
        mine = self.steps()
        newest = _all_min(mine[-1] if mine else 0)
        if newest and _all_min(int(newest in mine)) == 1:
            return newest
        return 0

    def load(self, step: int) -> int:
        """Put this rank's point of `step` into every component; the step."""
        folder = self.root / f"step-{step:08d}"
        try:
            record = json.loads((folder / STATE).read_text())
            saved = torch.load(folder / TENSORS, map_location="cpu", weights_only=True)
        except (OSError, ValueError, RuntimeError) as err:
            raise CheckpointError(
                f"recovery point {str(folder)!r} cannot be read ({type(err).__name__}); "
                f"delete {str(self.root.parent)!r} and resume from a checkpoint with --resume"
            ) from None
        if not _only_tensors(saved) or int(record["step"]) != step:
            raise CheckpointError(
                f"recovery point {str(folder)!r} holds something shoal did not write; "
                f"delete {str(self.root.parent)!r} and resume from a checkpoint with --resume"
            )
        template = self.shared.state_dict()
        _fill(template, saved["shared"])
        for keys, value in record["shared"]:
            _put(template, keys, value)
        self.shared.load_state_dict(template)
        for name, part in self.parts.items():
            part.load_state_dict({**record["parts"].get(name, {}), **saved["parts"].get(name, {})})
        return step


def _cpu(tree: dict[str, Any]) -> dict[str, Any]:
    return {k: _cpu(v) if isinstance(v, dict) else v.detach().cpu() for k, v in tree.items()}


def _fill(template: dict[str, Any], saved: dict[str, Any]) -> None:
    """Copy saved tensors into the template's, in place (the template's own tensors keep their device)."""
    for key, value in saved.items():
        if isinstance(value, dict):
            _fill(template.setdefault(key, {}), value)
        elif isinstance(template.get(key), torch.Tensor):
            template[key].copy_(value)
        else:
            template[key] = value


def _put(tree: dict[str, Any], keys: list[Any], value: Any) -> None:
    for key in keys[:-1]:
        tree = tree.setdefault(key, {})
    tree[keys[-1]] = value


def _only_tensors(tree: Any) -> bool:
    if isinstance(tree, dict):
        return all(isinstance(k, str) and _only_tensors(v) for k, v in tree.items())
    return isinstance(tree, torch.Tensor)


def _all_min(value: int) -> int:
    """The smallest `value` over all ranks (itself without a process group)."""
    if not dist.is_initialized():
        return value
    rt = runtime.current()
    device = rt.device if rt.backend == "nccl" else torch.device("cpu")
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())
