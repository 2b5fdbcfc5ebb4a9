"""The names in a checkpoint folder and the small file operations both the
writer (`shoal.train.checkpoint`) and the reader (`shoal.train.checkpoint_read`)
use, so neither imports the other's internals."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
DCP_METADATA = ".metadata"
RANK_STATE = "rank_state/"


def rank_key(rank: int, part: str, key: str) -> str:
    """The DCP key of one rank's own tensor."""
    return f"{RANK_STATE}rank{rank}/{part}/{key}"


def state_file(rank: int) -> str:
    """The name of one rank's JSON file of its step and its parts' plain values."""
    return f"state-rank{rank}.json"


def shared_file(rank: int) -> str:
    """The name of one rank's JSON file of the shared state's plain values."""
    return f"shared-rank{rank}.json"


def put_path(tree: dict[str, Any], keys: list[str], value: Any) -> None:
    for key in keys[:-1]:
        tree = tree.setdefault(key, {})
    tree[keys[-1]] = value


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


def write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
