"""Reading a checkpoint back while trusting nothing in its folder.

`checked` (in the launcher, and again in every worker right before it
loads) requires a manifest that names exactly the folder's files and a
matching SHA-256 for each; DCP's `.metadata`, which torch writes with
pickle, is read by `read_metadata`, an unpickler that builds only DCP's own
metadata classes (anything else, such as a pickle that would run code, is
refused before it is built); every later read of a file is checked against
the digest verified (`read_checked`); the tensor files are read by torch
with `weights_only=True`, and a planner that refuses any non-tensor entry
(which DCP would `torch.load` with `weights_only=False`) keeps it that way.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import filesystem, metadata, state_dict_loader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

from shoal.errors import CheckpointError
from shoal.train.checkpoint_layout import (
    DCP_METADATA,
    MANIFEST,
    RANK_STATE,
    list_checkpoints,
    put_path,
    sha256,
    state_file,
)

MAX_METADATA_BYTES = 1 << 28


def rank_tensors(meta: Metadata, rank: int) -> list[tuple[str, str, torch.Tensor]]:
    """(part, key, empty tensor) for each tensor `rank` saved, sized from the checkpoint's metadata."""
    prefix = f"{RANK_STATE}rank{rank}/"
    out = []
    for key, item in meta.state_dict_metadata.items():
        if key.startswith(prefix) and isinstance(item, TensorStorageMetadata):
            part, _, name = key.removeprefix(prefix).partition("/")
            out.append((part, name, torch.empty(tuple(item.size), dtype=item.properties.dtype)))
    return out


def shared_plain(path: Path, own: int, digests: dict[str, str]) -> list[tuple[list[str], Any]]:
    """The shared state's plain leaves: every rank's (a layout may split them), `own`'s last."""
    saved = {
        int(m.group(1)): name for name in digests if (m := re.fullmatch(r"shared-rank(\d+)\.json", name)) is not None
    }
    out: list[tuple[list[str], Any]] = []
    for rank in [*sorted(set(saved) - {own}), own]:
        out += [(keys, value) for keys, value in read_json(path, saved[rank], digests)]
    return out


def read_checked(path: Path, name: str, digests: dict[str, str]) -> bytes:
    """The bytes of one file of a verified checkpoint, checked again as read (so they are the ones verified)."""
    file = path / name
    try:
        data = file.read_bytes()
    except OSError:
        data = None
    if data is None or hashlib.sha256(data).hexdigest() != digests.get(name):
        raise CheckpointError(
            f"checkpoint {str(path)!r} changed while it was loaded: file {str(file)!r} no longer matches "
            "its checksum; make sure nothing writes to it, and resume again"
        )
    return data


def read_json(path: Path, name: str, digests: dict[str, str]) -> Any:
    try:
        return json.loads(read_checked(path, name, digests))
    except ValueError:
        raise CheckpointError(
            f"checkpoint {str(path)!r} is damaged: file {str(path / name)!r} is not valid JSON; "
            "resume from an earlier checkpoint or start fresh"
        ) from None


# What a DCP `.metadata` pickle may build: DCP's own metadata classes and the
# torch values they hold, nothing else (found by reading what torch writes).
_METADATA_CLASSES = {
    ("torch.distributed.checkpoint.metadata", name): getattr(metadata, name)
    for name in (
        "Metadata",
        "MetadataIndex",
        "StorageMeta",
        "TensorProperties",
        "TensorStorageMetadata",
        "ChunkStorageMetadata",
        "BytesStorageMetadata",
        "_MEM_FORMAT_ENCODING",
    )
}
_METADATA_CLASSES[("torch.distributed.checkpoint.filesystem", "_StorageInfo")] = filesystem._StorageInfo
_METADATA_CLASSES[("torch", "Size")] = torch.Size
_METADATA_CLASSES[("torch.serialization", "_get_layout")] = torch.serialization._get_layout  # pyright: ignore[reportPrivateUsage]
_METADATA_CLASSES[("pathlib", "PosixPath")] = __import__("pathlib").PosixPath


class _MetadataUnpickler(pickle.Unpickler):
    """Builds only DCP metadata: `find_class` admits the classes above and torch's dtypes."""

    def find_class(self, module: str, name: str) -> Any:
        found = _METADATA_CLASSES.get((module, name))
        if found is None and module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            found = getattr(torch, name)
        if found is None:
            raise _RefusedClassError(f"{module}.{name}")
        return found


class _RefusedClassError(Exception):
    pass


def read_metadata(path: Path, digests: dict[str, str]) -> Metadata:
    """The DCP metadata of a verified checkpoint, built without running code, or `CheckpointError`.

    Refused: a `.metadata` that is not the one the manifest names, that
    names any class but DCP's metadata classes, that declares a non-tensor
    entry, or that points at a file outside the manifest."""
    file = path / DCP_METADATA

    def refuse(why: str) -> CheckpointError:
        return CheckpointError(
            f"checkpoint {str(path)!r} is refused: its {str(file)!r} {why}; "
            "load only checkpoints written by shoal, or start fresh"
        )

    if DCP_METADATA not in digests:
        raise refuse("is not listed in the manifest")
    if file.is_file() and file.stat().st_size > MAX_METADATA_BYTES:
        raise refuse(f"is larger than {MAX_METADATA_BYTES >> 20} MiB")
    data = read_checked(path, DCP_METADATA, digests)
    try:
        meta = _MetadataUnpickler(io.BytesIO(data)).load()
    except _RefusedClassError as err:
        raise refuse(f"asks to build {err}, which is not part of checkpoint metadata (it could run code)") from None
    except Exception as err:
        raise refuse(f"is not readable checkpoint metadata ({type(err).__name__})") from None
    if not isinstance(meta, Metadata) or not isinstance(meta.state_dict_metadata, dict):
        raise refuse("does not hold checkpoint metadata")
    storage = meta.storage_data
    if not isinstance(storage, dict):
        raise refuse("does not say where its tensors are stored")
    for index, info in storage.items():
        if not isinstance(index, metadata.MetadataIndex) or not isinstance(info, filesystem._StorageInfo):  # pyright: ignore[reportPrivateUsage]
            raise refuse("holds a storage entry of the wrong type")
        where = info.relative_path
        if not isinstance(where, str) or where not in digests or where in (MANIFEST, DCP_METADATA):
            raise refuse(f"stores {str(index.fqn)!r} in {where!r}, which is not a data file of the manifest")
    try:
        stored = sum((path / name).stat().st_size for name in {info.relative_path for info in storage.values()})
    except OSError:
        stored = -1
    for key, item in meta.state_dict_metadata.items():
        problem = "unnamed" if not isinstance(key, str) else _entry_problem(item, stored)
        if problem:
            raise refuse(f"declares the {problem} entry {str(key)!r} (shoal checkpoints hold only tensors it wrote)")
    return meta


def _entry_problem(item: Any, stored: int) -> str:
    """What is wrong with one entry of DCP metadata ('' if nothing): the adjective the refusal uses."""
    if not isinstance(item, TensorStorageMetadata):
        return "non-tensor"
    if not isinstance(item.properties, metadata.TensorProperties) or not isinstance(item.properties.dtype, torch.dtype):
        return "untyped"
    size = item.size
    if not isinstance(size, torch.Size) or not all(isinstance(d, int) and d >= 0 for d in size):
        return "malformed"
    if size.numel() * item.properties.dtype.itemsize > stored:
        return "larger-than-its-data-files"
    return ""


class CheckedReader(filesystem.FileSystemReader):
    """DCP's file reader, handed the metadata `read_metadata` already built and checked."""

    def __init__(self, path: Path, meta: Metadata) -> None:
        super().__init__(str(path))
        self._meta = meta

    def read_metadata(self, *args: Any, **options: Any) -> Metadata:  # no `kwargs`: DCP has no per-rank fallback
        if self._meta.storage_meta is None:
            self._meta.storage_meta = metadata.StorageMeta()
        self._meta.storage_meta.load_id = self.load_id
        return self._meta


class TensorsOnly(DefaultLoadPlanner):
    """DCP's planner, but a non-tensor entry (which DCP would unpickle) is refused."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        raise CheckpointError(
            f"checkpoint entry {read_item.dest_index.fqn!r} is not a tensor; shoal checkpoints hold only tensors, "
            "so load only checkpoints written by shoal"
        )


def load_tensors(path: str | Path) -> dict[str, Any]:
    """Every tensor of a verified checkpoint, nested as saved (`model`, `optim`, ...); one process, no group."""
    path = Path(path)
    _, digests = checked(path)
    meta = read_metadata(path, digests)
    flat = {
        key: torch.empty(tuple(item.size), dtype=item.properties.dtype)
        for key, item in meta.state_dict_metadata.items()
        if isinstance(item, TensorStorageMetadata)
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "assuming the intent is to load in a single process": it is
        state_dict_loader.load(
            flat,
            storage_reader=CheckedReader(path, meta),
            planner=TensorsOnly(flatten_state_dict=False),
            no_dist=True,
        )
    mappings = meta.planner_data if isinstance(meta.planner_data, dict) else {}
    out: dict[str, Any] = {}
    for key, tensor in flat.items():
        keys = mappings.get(key)
        if not isinstance(keys, tuple) or not keys or not all(isinstance(k, str | int) for k in keys):
            keys = (key,)
        put_path(out, list(keys), tensor)
    return out


def verify(path: Path) -> int:
    """Check the folder against the manifest; return the step or raise `CheckpointError` naming the file."""
    return checked(path)[0]


def checked(path: Path) -> tuple[int, dict[str, str]]:
    """(step, {file: SHA-256}) of a checkpoint whose manifest names exactly its files, each matching its checksum;
    `CheckpointError` naming the problem otherwise."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist; check the path, or start without resume")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
        step = int(manifest["step"])
        if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
            raise TypeError
        files = {str(k): v for k, v in files.items()}
    except (OSError, ValueError, KeyError, TypeError):
        raise CheckpointError(
            f"checkpoint {str(path)!r} is incomplete or damaged: {str(manifest_path)!r} is missing or unreadable; "
            "resume from an earlier checkpoint or start fresh"
        ) from None
    if not files:
        raise CheckpointError(
            f"checkpoint {str(path)!r} is incomplete or damaged: its manifest lists no files; "
            "resume from an earlier checkpoint or start fresh"
        )
    present = {p.name for p in path.iterdir()} - {MANIFEST}
    extra = sorted(present - set(files))
    if extra:
        raise CheckpointError(
            f"checkpoint {str(path)!r} is refused: {str(path / extra[0])!r} is not in its manifest "
            "(added after the checkpoint was written); remove it, or resume from another checkpoint"
        )
    for name, digest in files.items():
        file = path / name
        if name not in present or not file.exists():
            problem = "is missing"
        elif file.is_symlink() or not file.is_file():
            problem = "is not a plain file"
        elif sha256(file) != digest:
            problem = "does not match its checksum"
        else:
            continue
        raise CheckpointError(
            f"checkpoint {str(path)!r} is damaged: file {str(file)!r} {problem}; "
            "resume from an earlier checkpoint or start fresh"
        )
    for required in (DCP_METADATA, state_file(0)):
        if required not in files:
            raise CheckpointError(
                f"checkpoint {str(path)!r} is incomplete: its manifest does not list {required!r}; "
                "resume from an earlier checkpoint or start fresh"
            )
    return step, files


def newest_valid(root: Path) -> tuple[Path, list[str]]:
    """The newest checkpoint that verifies, and a warning for each newer damaged one."""
    path, _, warnings = newest_valid_step(root)
    return path, warnings


def newest_valid_step(root: Path) -> tuple[Path, int, list[str]]:
    """`newest_valid` with the checkpoint's step (each folder is hashed once)."""
    warnings = []
    found = list_checkpoints(root)
    if not found:
        raise CheckpointError(f"no checkpoint found in {str(root)!r}; run without --resume to start fresh")
    for path in reversed(found):
        try:
            return path, verify(path), warnings
        except CheckpointError as err:
            warnings.append(f"skipping damaged checkpoint: {err}")
    first = warnings[0].removeprefix("skipping damaged checkpoint: ")
    raise CheckpointError(f"every checkpoint in {str(root)!r} is damaged ({first}); start fresh without --resume")
