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

Reading back trusts nothing in the folder: `verify` (in the launcher, and
again in every worker right before it loads) checks that the manifest names
exactly the folder's files and each file's checksum; DCP's `.metadata`,
which torch writes with pickle, is read with `read_metadata`, an unpickler
that builds only DCP's own metadata classes (anything else, such as a
pickle that would run code, is refused before it is built), and is refused
unless every entry is a tensor stored in a file of the manifest; the tensor
files are read by torch with `weights_only=True`, and a planner that refuses
any non-tensor entry (which DCP would `torch.load` with
`weights_only=False`) keeps it that way.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import re
import shutil
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import torch
from torch.distributed.checkpoint import filesystem, metadata, state_dict_loader, state_dict_saver
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

from shoal import runtime
from shoal.config import CheckpointConfig
from shoal.errors import CheckpointError

MANIFEST = "manifest.json"
DCP_METADATA = ".metadata"
RANK_STATE = "rank_state/"
MAX_METADATA_BYTES = 1 << 28


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
        _, digests = checked(path)  # here, right before loading, not only in the launcher
        meta = read_metadata(path, digests)
        template = self.shared.state_dict()
        shared, _ = split_tensors(template)
        own = rank if state_file(rank) in digests else 0
        loaded = {**shared, **{rank_key(own, part, key): t for part, key, t in _rank_tensors(meta, own)}}
        # fills the tensors in place, from the metadata checked above
        state_dict_loader.load(loaded, storage_reader=_CheckedReader(path, meta), planner=_TensorsOnly())
        for keys, value in [*_tensor_leaves({k: loaded[k] for k in shared}), *_shared_plain(path, own, digests)]:
            _put(template, keys, value)
        self.shared.load_state_dict(template)
        mine = _read_json(path, state_file(own), digests)
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
def _rank_tensors(meta: Metadata, rank: int) -> list[tuple[str, str, torch.Tensor]]:
    """(part, key, empty tensor) for each tensor `rank` saved, sized from the checkpoint's metadata."""
    prefix = f"{RANK_STATE}rank{rank}/"
    out = []
    for key, item in meta.state_dict_metadata.items():
        if key.startswith(prefix) and isinstance(item, TensorStorageMetadata):
            part, _, name = key.removeprefix(prefix).partition("/")
            out.append((part, name, torch.empty(tuple(item.size), dtype=item.properties.dtype)))
    return out


def _shared_plain(path: Path, own: int, digests: dict[str, str]) -> list[tuple[list[str], Any]]:
    """The shared state's plain leaves: every rank's (a layout may split them), `own`'s last."""
    saved = {
        int(m.group(1)): name for name in digests if (m := re.fullmatch(r"shared-rank(\d+)\.json", name)) is not None
    }
    out: list[tuple[list[str], Any]] = []
    for rank in [*sorted(set(saved) - {own}), own]:
        out += [(keys, value) for keys, value in _read_json(path, saved[rank], digests)]
    return out


def _read_checked(path: Path, name: str, digests: dict[str, str]) -> bytes:
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


def _read_json(path: Path, name: str, digests: dict[str, str]) -> Any:
    try:
        return json.loads(_read_checked(path, name, digests))
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
    data = _read_checked(path, DCP_METADATA, digests)
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


class _CheckedReader(filesystem.FileSystemReader):
    """DCP's file reader, handed the metadata `read_metadata` already built and checked."""

    def __init__(self, path: Path, meta: Metadata) -> None:
        super().__init__(str(path))
        self._meta = meta

    def read_metadata(self, *args: Any, **options: Any) -> Metadata:  # no `kwargs`: DCP has no per-rank fallback
        if self._meta.storage_meta is None:
            self._meta.storage_meta = metadata.StorageMeta()
        self._meta.storage_meta.load_id = self.load_id
        return self._meta


class _TensorsOnly(DefaultLoadPlanner):
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
            storage_reader=_CheckedReader(path, meta),
            planner=_TensorsOnly(flatten_state_dict=False),
            no_dist=True,
        )
    mappings = meta.planner_data if isinstance(meta.planner_data, dict) else {}
    out: dict[str, Any] = {}
    for key, tensor in flat.items():
        keys = mappings.get(key)
        if not isinstance(keys, tuple) or not keys or not all(isinstance(k, str | int) for k in keys):
            keys = (key,)
        _put(out, list(keys), tensor)
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
        elif _sha256(file) != digest:
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
