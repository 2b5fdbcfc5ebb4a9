"""Checkpoints: written atomically, verified on load.

Layout: `checkpoints/step-00000100/` holds what `torch.distributed.checkpoint`
wrote (tensors keyed by parameter name, so a checkpoint loads into another
layout), one `extra-rankN.json` per rank (step, data position, RNG, strategy
state: small, JSON, never pickle), and `manifest.json` with a SHA-256 of every
file. Everything is written into `step-N.tmp/` and renamed when complete, so
a crash mid-save leaves the previous checkpoint as the newest valid one.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp

from shoal import runtime
from shoal.errors import CheckpointError

MANIFEST = "manifest.json"
RANK_STATE = "rank_state/"


def rank_prefix(rank: int) -> str:
    """The DCP key prefix of one rank's own tensors."""
    return f"{RANK_STATE}rank{rank}/"


def with_rank_tensors(state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """`state` plus this rank's own tensors under its per-rank keys."""
    prefix = rank_prefix(runtime.current().rank)
    for key, t in tensors.items():
        state[prefix + key] = t.detach().cpu().contiguous()
    return state


def rank_tensors(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """This rank's own tensors that `load` filled in (rank 0's when resumed on more ranks)."""
    own = rank_prefix(runtime.current().rank)
    prefix = own if any(k.startswith(own) for k in state) else rank_prefix(0)
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step-{step:08d}"


def save(root: Path, step: int, state: dict[str, Any], extra: dict[str, Any], keep: int) -> Path:
    """Collective: every rank calls this with its own state and extra."""
    rt = runtime.current()
    final = step_dir(root, step)
    tmp = final.with_name(final.name + ".tmp")
    if rt.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    runtime.barrier()
    dcp.save(state, checkpoint_id=str(tmp))
    _write_json(tmp / f"extra-rank{rt.rank}.json", extra)
    runtime.barrier()
    if rt.is_main:
        files = {p.name: _sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        _write_json(tmp / MANIFEST, {"step": step, "world_size": rt.world_size, "files": files})
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
        for old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    runtime.barrier()
    return final


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
            f"checkpoint {str(path)!r} is incomplete or damaged: {str(manifest_path)!r} is missing or unreadable; resume from an earlier checkpoint or start fresh"
        ) from None
    for name, digest in files.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(
                f"checkpoint {str(path)!r} is damaged: file {str(file)!r} is missing; resume from an earlier checkpoint or start fresh"
            )
        if _sha256(file) != digest:
            raise CheckpointError(
                f"checkpoint {str(path)!r} is damaged: file {str(file)!r} does not match its checksum; resume from an earlier checkpoint or start fresh"
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
    raise CheckpointError(
        f"every checkpoint in {str(root)!r} is damaged ({warnings[0].removeprefix('skipping damaged checkpoint: ')}); start fresh without --resume"
    )


def load(path: Path, state: dict[str, Any]) -> dict[str, Any]:
    """Load tensors into `state` in place (collective); return this rank's extra (rank 0's if absent)."""
    rt = runtime.current()
    path = Path(path)
    _size_rank_tensors(path, state, rt.rank)
    dcp.load(state, checkpoint_id=str(path))
    extra_path = path / f"extra-rank{rt.rank}.json"
    if not extra_path.exists():  # resumed on more ranks than saved
        extra_path = path / "extra-rank0.json"
    return json.loads(extra_path.read_text())


def _size_rank_tensors(path: Path, state: dict[str, Any], rank: int) -> None:
    """Per-rank tensors (`rank_state/rank{r}/...`) may not exist yet in a fresh
    process, so allocate this rank's saved ones (rank 0's when resumed on more
    ranks) from the checkpoint's metadata."""
    for key in [k for k in state if k.startswith(RANK_STATE)]:
        del state[key]
    meta = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    own = rank_prefix(rank)
    prefix = own if any(k.startswith(own) for k in meta) else rank_prefix(0)
    for key, item in meta.items():
        if key.startswith(prefix) and hasattr(item, "size"):
            state[key] = torch.empty(tuple(item.size), dtype=item.properties.dtype)


def rng_state() -> str:
    return base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()


def set_rng_state(encoded: str) -> None:
    raw = base64.b64decode(encoded)
    torch.set_rng_state(torch.frombuffer(bytearray(raw), dtype=torch.uint8))


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
