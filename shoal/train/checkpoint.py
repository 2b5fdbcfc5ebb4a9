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
- `manifest.json`: a SHA-256 of every file.

Only tensors go to DCP (it would pickle anything else) and only plain JSON
to the JSON files: nothing is pickled. Everything is written into
`step-N.tmp/` and renamed when complete, so a crash mid-save leaves the
previous checkpoint as the newest valid one; `verify` checks the manifest
before a resume. A run resumed on more ranks than it saved gives the extra
ranks rank 0's per-rank state.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import torch
from torch.distributed.checkpoint import filesystem, state_dict_loader, state_dict_saver
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from shoal import runtime
from shoal.config import CheckpointConfig
from shoal.errors import CheckpointError

MANIFEST = "manifest.json"
RANK_STATE = "rank_state/"


class Stateful(Protocol):
    """A component whose state is saved: plain JSON values and tensors."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any], /) -> None: ...


def rank_key(rank: int, part: str, key: str) -> str:
    """The DCP key of one rank's own tensor."""
    return f"{RANK_STATE}rank{rank}/{part}/{key}"


def state_file(rank: int) -> str:
    """The name of one rank's JSON file of its step and its parts' plain values."""
    return f"state-rank{rank}.json"


def shared_file(rank: int) -> str:
    """The name of one rank's JSON file of the shared state's plain values."""
    return f"shared-rank{rank}.json"


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
        _write_json(tmp / state_file(rt.rank), record)
        _write_json(tmp / shared_file(rt.rank), shared)
        runtime.barrier()
        if rt.is_main:
            files = {p.name: _sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
            _write_json(tmp / MANIFEST, {"step": step, "world_size": rt.world_size, "files": files})
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(final.parent)
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
        template = self.shared.state_dict()
        shared, _ = split_tensors(template)
        own = _saved_rank(path, rank)
        loaded = {**shared, **{rank_key(own, part, key): t for part, key, t in _rank_tensors(path, own)}}
        state_dict_loader.load(loaded, checkpoint_id=str(path))  # fills the tensors in place
        for keys, value in [*_tensor_leaves({k: loaded[k] for k in shared}), *_shared_plain(path, own)]:
            _put(template, keys, value)
        self.shared.load_state_dict(template)
        mine = json.loads((path / state_file(own)).read_text())
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


def _put(tree: dict[str, Any], keys: list[str], value: Any) -> None:
    for key in keys[:-1]:
        tree = tree.setdefault(key, {})
    tree[keys[-1]] = value


# ----------------------------------------------------------------- reading back
def _saved_rank(path: Path, rank: int) -> int:
    """Whose per-rank state this rank resumes from: its own, or rank 0's when the checkpoint has fewer ranks."""
    return rank if (path / state_file(rank)).exists() else 0


def _rank_tensors(path: Path, rank: int) -> list[tuple[str, str, torch.Tensor]]:
    """(part, key, empty tensor) for each tensor `rank` saved, sized from the checkpoint's metadata."""
    meta = filesystem.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    prefix = f"{RANK_STATE}rank{rank}/"
    out = []
    for key, item in meta.items():
        if key.startswith(prefix) and isinstance(item, TensorStorageMetadata):
            part, _, name = key.removeprefix(prefix).partition("/")
            out.append((part, name, torch.empty(tuple(item.size), dtype=item.properties.dtype)))
    return out


def _shared_plain(path: Path, own: int) -> list[tuple[list[str], Any]]:
    """The shared state's plain leaves: every rank's (a layout may split them), `own`'s last."""
    saved = {int(f.stem.removeprefix("shared-rank")): f for f in path.glob("shared-rank*.json")}
    out: list[tuple[list[str], Any]] = []
    for rank in [*sorted(set(saved) - {own}), own]:
        out += [(keys, value) for keys, value in json.loads(saved[rank].read_text())]
    return out


# ----------------------------------------------------------------- the folders
def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step-{step:08d}"


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint folders, oldest first (a `.tmp` folder never counts)."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(
        p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and not p.name.endswith(".tmp")
    )


def verify(path: Path) -> int:
    """Check every file against the manifest; return the step or raise `CheckpointError` naming the file."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist; check the path, or start without resume")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
        step = int(manifest["step"])
    except (OSError, ValueError, KeyError, TypeError):
        raise CheckpointError(
            f"checkpoint {str(path)!r} is incomplete or damaged: {str(manifest_path)!r} is missing or unreadable; "
            "resume from an earlier checkpoint or start fresh"
        ) from None
    for name, digest in files.items():
        file = path / name
        if not file.is_file():
            problem = "is missing"
        elif _sha256(file) != digest:
            problem = "does not match its checksum"
        else:
            continue
        raise CheckpointError(
            f"checkpoint {str(path)!r} is damaged: file {str(file)!r} {problem}; "
            "resume from an earlier checkpoint or start fresh"
        )
    return step


def newest_valid(root: Path) -> tuple[Path, list[str]]:
    """The newest checkpoint that verifies, and a warning for each newer damaged one."""
    warnings = []
    found = list_checkpoints(root)
    if not found:
        raise CheckpointError(f"no checkpoint found in {str(root)!r}; run without --resume to start fresh")
    for path in reversed(found):
        try:
            verify(path)
            return path, warnings
        except CheckpointError as err:
            warnings.append(f"skipping damaged checkpoint: {err}")
    first = warnings[0].removeprefix("skipping damaged checkpoint: ")
    raise CheckpointError(f"every checkpoint in {str(root)!r} is damaged ({first}); start fresh without --resume")


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
