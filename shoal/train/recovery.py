"""Recovery points: each rank's whole training state, every few steps, in memory-backed files.

A checkpoint is durable and shared, and costs a collective write with
checksums; a recovery point only has to outlive a killed process until the
elastic agent restarts it. So each rank writes its own, with no collective:
the same state a checkpoint holds (the shared model and optimizer state,
the per-rank parts, the step) as one tensor file (`tensors.pt`) and one
JSON file (`state.json`) in `ROOT/rank{r}/step-N`, written into
`step-N.tmp` and renamed, not fsynced (the page cache outlives a process;
a machine that dies loses them, and the checkpoints remain). ROOT is the
job's folder in /dev/shm that the launcher makes and removes at the end
(`SHOAL_RECOVERY_DIR`), else the run directory's `recovery/`.
The newest two are kept, so that whichever step the ranks agree on, each
has it.

On a restart every rank loads the newest step that every rank has (an
all-reduce MIN of each rank's newest), if it is newer than the checkpoint
the run would resume from. The tensor file is read with
`torch.load(weights_only=True)` and must hold only plain tensors; nothing is
unpickled otherwise. A DTensor (tensor-parallel and sharded parameters and
optimizer state) is saved as this rank's local shard and loaded back into
it: a restarted rank has the same layout, and no device mesh is unpickled.

`Recovery` gives a user's own loop the same in three lines: make it,
`start = recovery.resume()`, `recovery.save()` after each step.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from shoal import env, runtime
from shoal.errors import CheckpointError
from shoal.strategies.optimizer import PreparedOptimizer, count_steps_from, steps_called
from shoal.train.checkpoint import Stateful, split_flat, split_tensors
from shoal.train.rng import RNGState

if TYPE_CHECKING:
    from shoal.strategies.base import Strategy

log = logging.getLogger(__name__)

TENSORS = "tensors.pt"
STATE = "state.json"
KEEP = 2


def restarted() -> int:
    """Collective: how many times torch's elastic agent has restarted this job's workers (0: a fresh start),
    the most any rank was told. A machine whose launcher was started again (`shoal.launch.supervisor`)
    counts from 0 while the others count on, and its workers must still resume with theirs."""
    return all_ranks_int(int(os.environ.get(env.RESTART_COUNT, "0") or 0), dist.ReduceOp.MAX)


def recovery_root(run_dir: Path | None = None) -> Path | None:
    """Where recovery points go: the launcher's folder for this job, else `run_dir/recovery` (None: nowhere)."""
    given = os.environ.get(env.RECOVERY_DIR)
    if given:
        return Path(given)
    return Path(run_dir) / "recovery" if run_dir is not None else None


@dataclass
class ModelState:
    """The model and optimizer as one checkpoint component: the strategy knows their layout."""

    strategy: Strategy
    model: nn.Module
    optimizer: torch.optim.Optimizer

    def state_dict(self) -> dict[str, Any]:
        return self.strategy.checkpoint_state(self.model, self.optimizer)

    def load_state_dict(self, state: dict[str, Any], /) -> None:
        self.strategy.load_checkpoint_state(self.model, self.optimizer, state)


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
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            torch.save({"shared": _cpu(tensors), "parts": own}, tmp / TENSORS)
            (tmp / STATE).write_text(json.dumps(record))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
        except OSError as err:  # a full /dev/shm must not stop training: the older point stays
            shutil.rmtree(tmp, ignore_errors=True)
            log.warning("recovery point of step %d not written (%s); the previous one stays", step, err)
            return None
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


class Recovery:
    """A user's own loop that survives a restart (`shoal run --max-restarts N`), in three lines:

        recovery = shoal.Recovery(strategy, model, optimizer, loader=loader, schedule=scheduler)
        start = recovery.resume()          # 0 on a fresh start; after a restart, the step it goes on from
        for step in range(start, steps):   # batches from loader.forever(), made after resume()
            ...; optimizer.step(); scheduler.step()
            recovery.save()                # a recovery point every `every` steps

    The step comes from the strategy (the prepared optimizer counts its
    updates), so a loop needs no counter of its own to save. What is saved:
    the model and optimizer (as the strategy lays them out), the strategy's
    own state, the loader's position, the LR schedule, torch's CPU random
    state, and any `extra` part with `state_dict`/`load_state_dict`
    (tensors and plain JSON values only). Points go to the job's folder
    that `shoal run`/`shoal train` make in /dev/shm (`SHOAL_RECOVERY_DIR`;
    removed when the job ends) or to `root`; with neither, none are
    written and a restart starts again at step 0.
    """

    def __init__(
        self,
        strategy: Strategy,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        loader: Stateful | None = None,
        schedule: Stateful | None = None,
        every: int = 5,
        root: str | Path | None = None,
        extra: Mapping[str, Stateful] | None = None,
    ) -> None:
        if not isinstance(optimizer, PreparedOptimizer):
            raise CheckpointError(
                "Recovery needs the optimizer that strategy.prepare(model, optimizer) returned: "
                "it counts the steps that recovery points are taken at"
            )
        parts: dict[str, Stateful] = {"strategy": strategy, "rng": RNGState()}
        parts.update({name: part for name, part in (("loader", loader), ("schedule", schedule)) if part is not None})
        parts.update(extra or {})
        where = Path(root) if root else recovery_root()
        self.strategy = strategy
        self.optimizer = optimizer
        self.points = RecoveryPoints(
            where or Path("."), every if where else 0, shared=ModelState(strategy, model, optimizer), parts=parts
        )

    @property
    def step(self) -> int:
        """Updates applied so far (the prepared optimizer's `step()` calls over `grad_accum`)."""
        return steps_called(self.optimizer) // self.strategy.grad_accum

    def resume(self) -> int:
        """Collective on a restart: load the newest point every rank has; the step to go on from (0: none)."""
        if not restarted():
            if self.points.every:
                self.points.clear()
            return 0
        newest = self.points.newest_common() if self.points.every else 0
        step = self.points.load(newest) if newest else 0
        count_steps_from(self.optimizer, step * self.strategy.grad_accum)
        return step

    def save(self) -> int:
        """After a step: write this rank's point if one is due (every `every` updates); the step."""
        step = self.step
        if steps_called(self.optimizer) % self.strategy.grad_accum == 0:
            self.points.save(step)
        return step


def _cpu(tree: dict[str, Any]) -> dict[str, Any]:
    """The tensors on the CPU; a DTensor (tensor parallel, sharded) as this rank's local shard: the point
    is loaded only into the same layout, and a plain tensor needs no device mesh unpickled to be read."""
    return {k: _cpu(v) if isinstance(v, dict) else _local(v.detach()).cpu() for k, v in tree.items()}


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of `t`: a DTensor's local shard (no communication), any other tensor itself."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def _fill(template: dict[str, Any], saved: dict[str, Any]) -> None:
    """Copy saved tensors into the template's, in place (the template's own tensors keep their device;
    a DTensor's local shard takes the saved shard)."""
    for key, value in saved.items():
        if isinstance(value, dict):
            _fill(template.setdefault(key, {}), value)
        elif isinstance(template.get(key), torch.Tensor):
            with torch.no_grad():
                _local(template[key]).copy_(value)
        else:
            template[key] = value


def _put(tree: dict[str, Any], keys: list[Any], value: Any) -> None:
    for key in keys[:-1]:
        tree = tree.setdefault(key, {})
    tree[keys[-1]] = value


def _only_tensors(tree: Any) -> bool:
    """Only plain tensors under string keys (a subclass such as a DTensor would carry pickled objects)."""
    if isinstance(tree, dict):
        return all(isinstance(k, str) and _only_tensors(v) for k, v in tree.items())
    return type(tree) is torch.Tensor


def all_ranks_int(value: int, op: Any) -> int:
    """`value` reduced over all ranks with `op` (a `dist.ReduceOp`); itself without a process group."""
    if not dist.is_initialized():
        return value
    rt = runtime.current()
    device = rt.device if rt.backend == "nccl" else torch.device("cpu")
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=op)
    return int(t.item())


def _all_min(value: int) -> int:
    """The smallest `value` over all ranks."""
    return all_ranks_int(value, dist.ReduceOp.MIN)
