"""Checkpoints, with one owner: cadence, retention, layout, per-rank keys, atomic write, verification, resume.

What is saved comes from components with one protocol, `state_dict()` /
`load_state_dict()` (`Stateful`): one *shared* component (the model and
optimizer, the same keys on every rank: replicated or sharded tensors keyed
by parameter name, so a checkpoint loads into another layout) and named
*per-rank* parts (strategy, data loader, LR schedule, RNG), which differ
from rank to rank. The `Checkpointer` splits every state into tensors and
plain values. Layout of `checkpoints/step-00000100/`:

- the files of `torch.distributed.checkpoint`: the shared tensors, nesting
  kept (`model`, `optim`), and each rank's own tensors under
  `rank_state/rank{r}/{part}/{key}` (sized from the metadata on load);
- `state-rank{r}.json`: that rank's step and its parts' non-tensor entries;
- `shared-rank{r}.json`: every non-tensor leaf of the shared state that
  rank holds, by its path (the optimizer's hyperparameters);
- `manifest.json`: a SHA-256 of every other file; it must name every file
  in the folder, and the folder holds nothing else.

Only tensors go to DCP (it would pickle anything else) and only plain JSON
to the JSON files: nothing is pickled. Everything is written into
`step-N.tmp/` and renamed when complete, so a crash mid-save leaves the
previous checkpoint as the newest valid one. A run resumed on more ranks
than it saved gives the extra ranks rank 0's per-rank state.

Reading back trusts nothing in the folder (`shoal.train.checkpoint_read`:
manifest, checksums, a restricted unpickler for DCP's metadata, tensors
only); the names in the folder are in `shoal.train.checkpoint_layout`.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import torch
from torch.distributed.checkpoint import state_dict_loader, state_dict_saver

from shoal import runtime
from shoal.config import CheckpointConfig
from shoal.train.checkpoint_layout import (
    MANIFEST,
    fsync_dir,
    list_checkpoints,
    put_path,
    rank_key,
    sha256,
    shared_file,
    state_file,
    step_dir,
    write_json,
)
from shoal.train.checkpoint_read import (
    CheckedReader,
    TensorsOnly,
    checked,
    load_tensors,
    newest_valid,
    newest_valid_step,
    rank_tensors,
    read_json,
    read_metadata,
    shared_plain,
    verify,
)

__all__ = [
    "Checkpointer",
    "Stateful",
    "checked",
    "list_checkpoints",
    "load_tensors",
    "newest_valid",
    "newest_valid_step",
    "split_flat",
    "split_tensors",
    "state_file",
    "step_dir",
    "verify",
]


class Stateful(Protocol):
    """A component whose state is saved: plain JSON values and tensors."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any], /) -> None: ...


class Checkpointer:
    """Saves and restores the job's state; `save` decides whether a step is due."""

    def __init__(
        self,
        root: Path,
        cfg: CheckpointConfig,
        *,
        shared: Stateful,
        parts: Mapping[str, Stateful],
        last_step: int,
        stop_at: int = 0,
    ) -> None:
        self.root = Path(root)
        self.cfg = cfg
        self.shared = shared
        self.parts = dict(parts)
        self.last_step = last_step
        self.stop_at = stop_at

    def due(self, step: int) -> bool:
        """Every `checkpoint.every` steps, at the last step, and where the run stops early."""
        every = self.cfg.every
        return step == self.last_step or step == self.stop_at or bool(every and step % every == 0)

    def save(self, step: int, *, force: bool = False) -> Path | None:
        """Collective: write the checkpoint of `step` if it is due (or `force`); its folder."""
        if not (force or self.due(step)):
            return None
        rt = runtime.current()
        tensors, plain = split_tensors(self.shared.state_dict())
        record: dict[str, Any] = {"step": step, "parts": {}}
        for name, part in self.parts.items():
            own, plain_values = split_flat(name, part.state_dict())
            record["parts"][name] = plain_values
            tensors.update({rank_key(rt.rank, name, k): v.detach().cpu().contiguous() for k, v in own.items()})
        return self._write(step, tensors, record, plain)

    def _write(self, step: int, tensors: dict[str, Any], record: dict[str, Any], shared: list[list[Any]]) -> Path:
        rt = runtime.current()
        final = step_dir(self.root, step)
        tmp = final.with_name(final.name + ".tmp")
        if rt.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        runtime.barrier()
        state_dict_saver.save(tensors, checkpoint_id=str(tmp))
        write_json(tmp / state_file(rt.rank), record)
        write_json(tmp / shared_file(rt.rank), shared)
        runtime.barrier()
        if rt.is_main:
            files = {p.name: sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
            write_json(tmp / MANIFEST, {"step": step, "world_size": rt.world_size, "files": files})
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            fsync_dir(final.parent)
            for old in list_checkpoints(self.root)[: -self.cfg.keep]:
                shutil.rmtree(old, ignore_errors=True)
        runtime.barrier()
        return final

    def resume(self, path: str | Path) -> int:
        """Collective: load the (verified) checkpoint at `path` into every component; its step (0 without one)."""
        if not path:
            return 0
        path = Path(path)
        rank = runtime.current().rank
        _, digests = checked(path)  # here, right before loading, not only in the launcher
        meta = read_metadata(path, digests)
        template = self.shared.state_dict()
        shared, _ = split_tensors(template)
        own = rank if state_file(rank) in digests else 0
        loaded = {**shared, **{rank_key(own, part, key): t for part, key, t in rank_tensors(meta, own)}}
        # fills the tensors in place, from the metadata checked above
        state_dict_loader.load(loaded, storage_reader=CheckedReader(path, meta), planner=TensorsOnly())
        for keys, value in [*_tensor_leaves({k: loaded[k] for k in shared}), *shared_plain(path, own, digests)]:
            put_path(template, keys, value)
        self.shared.load_state_dict(template)
        mine = read_json(path, state_file(own), digests)
        for name, part in self.parts.items():
            prefix = rank_key(own, name, "")
            tensors = {k.removeprefix(prefix): v for k, v in loaded.items() if k.startswith(prefix)}
            part.load_state_dict({**mine["parts"].get(name, {}), **tensors})
        return int(mine["step"])


# ----------------------------------------------------------------- state split
def split_tensors(tree: dict[str, Any]) -> tuple[dict[str, Any], list[list[Any]]]:
    """The tensors of a nested state dict (nesting kept), and [path, value] of every other leaf."""
    tensors: dict[str, Any] = {}
    plain: list[list[Any]] = []
    for key, value in tree.items():
        if isinstance(value, torch.Tensor):
            tensors[key] = value
        elif isinstance(value, dict):
            inner, rest = split_tensors(value)
            if inner:
                tensors[key] = inner
            plain += [[[key, *keys], v] for keys, v in rest]
        else:
            plain.append([[key], value])
    return tensors, plain


def split_flat(name: str, state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A part's state: (its tensors, its plain JSON values); TypeError naming anything else."""
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    plain = {k: v for k, v in state.items() if k not in tensors}
    try:
        json.dumps(plain)
    except (TypeError, ValueError) as err:
        raise TypeError(f"the {name} state holds a value that is neither a tensor nor plain JSON: {err}") from None
    return tensors, plain


def _tensor_leaves(tree: dict[str, Any], keys: tuple[str, ...] = ()) -> list[tuple[list[str], Any]]:
    """[path, tensor] of every tensor in a nested dict."""
    out: list[tuple[list[str], Any]] = []
    for key, value in tree.items():
        if isinstance(value, dict):
            out += _tensor_leaves(value, (*keys, key))
        else:
            out.append(([*keys, key], value))
    return out
