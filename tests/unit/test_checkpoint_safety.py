"""Checkpoints are read as an attacker's file would be: nothing in the folder runs code or goes unchecked."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import warnings
from pathlib import Path

import pytest
import torch

from shoal.config import CheckpointConfig
from shoal.errors import CheckpointError
from shoal.train import checkpoint
from shoal.train.checkpoint import Checkpointer


class Shared:
    def __init__(self, seed: float) -> None:
        self.w = torch.full((3, 2), seed)
        self.m = torch.full((3, 2), seed / 2)
        self.lr = 0.1 * seed

    def state_dict(self):
        return {"model": {"w": self.w}, "optim": {"state": {"w": {"m": self.m}}, "lr": self.lr}}

    def load_state_dict(self, state):
        self.w, self.m, self.lr = state["model"]["w"], state["optim"]["state"]["w"]["m"], state["optim"]["lr"]


class Part:
    def __init__(self, seed: int) -> None:
        self.count, self.rng = seed, torch.arange(4) * seed

    def state_dict(self):
        return {"count": self.count, "rng": self.rng}

    def load_state_dict(self, state):
        self.count, self.rng = state["count"], state["rng"]


def _checkpointer(root: Path, seed: int) -> tuple[Checkpointer, Shared, Part]:
    shared, part = Shared(float(seed)), Part(seed)
    return Checkpointer(root, CheckpointConfig(keep=3), shared=shared, parts={"data": part}, last_step=10), shared, part


@pytest.fixture
def saved(tmp_path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DCP warns that it runs without a process group
        path = _checkpointer(tmp_path / "ckpt", 3)[0].save(7, force=True)
    assert path is not None
    return path


def _resume(path: Path) -> tuple[int, Shared, Part]:
    ckpt, shared, part = _checkpointer(path.parent, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        step = ckpt.resume(path)
    return step, shared, part


def _reseal(path: Path) -> None:
    """Rewrite the manifest over the folder as it is now (what an attacker who can write the folder does)."""
    manifest = json.loads((path / checkpoint.MANIFEST).read_text())
    manifest["files"] = {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in path.iterdir() if p.name != checkpoint.MANIFEST
    }
    (path / checkpoint.MANIFEST).write_text(json.dumps(manifest))


def test_a_checkpoint_round_trips(saved):
    step, shared, part = _resume(saved)
    assert step == 7 and shared.lr == pytest.approx(0.3) and part.count == 3
    assert torch.equal(shared.w, torch.full((3, 2), 3.0)) and torch.equal(part.rng, torch.arange(4) * 3)
    tensors = checkpoint.load_tensors(saved)
    assert torch.equal(tensors["model"]["w"], torch.full((3, 2), 3.0))
    assert torch.equal(tensors["optim"]["state"]["w"]["m"], torch.full((3, 2), 1.5))


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_metadata_pickle_that_would_run_code_is_refused_and_never_runs(saved, tmp_path):
    marker = tmp_path / "pwned"
    (saved / ".metadata").write_bytes(pickle.dumps(_RunsCode(marker)))
    _reseal(saved)  # the checksums match: only the unpickler stands in the way
    for attempt in (lambda: _resume(saved), lambda: checkpoint.load_tensors(saved)):
        with pytest.raises(CheckpointError) as err:
            attempt()
        assert "posix.system" in str(err.value) and "could run code" in str(err.value)
        assert "\n" not in str(err.value)
    assert not marker.exists()


def test_code_hidden_inside_real_metadata_is_refused(saved, tmp_path):
    marker = tmp_path / "pwned"
    meta = pickle.loads((saved / ".metadata").read_bytes())
    meta.planner_data = {"model.w": _RunsCode(marker)}
    (saved / ".metadata").write_bytes(pickle.dumps(meta))
    _reseal(saved)
    with pytest.raises(CheckpointError, match="could run code"):
        _resume(saved)
    assert not marker.exists()


def test_metadata_declaring_a_non_tensor_entry_is_refused(saved, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.distributed.checkpoint.state_dict_saver.save(
            {"model": {"w": torch.zeros(3, 2)}, "extra": {"a": 1}}, checkpoint_id=str(tmp_path / "bytes")
        )
    (saved / ".metadata").write_bytes((tmp_path / "bytes" / ".metadata").read_bytes())
    for f in (tmp_path / "bytes").glob("*.distcp"):
        (saved / f.name).write_bytes(f.read_bytes())
    _reseal(saved)
    with pytest.raises(CheckpointError, match=r"non-tensor entry 'extra\.a'"):
        _resume(saved)


def test_metadata_pointing_outside_the_folder_is_refused(saved):
    meta = pickle.loads((saved / ".metadata").read_bytes())
    for info in meta.storage_data.values():
        info.relative_path = "../../etc/passwd"
    (saved / ".metadata").write_bytes(pickle.dumps(meta))
    _reseal(saved)
    with pytest.raises(CheckpointError, match="not a data file of the manifest"):
        _resume(saved)


def test_a_manifest_listing_no_files_is_refused(saved):
    manifest = json.loads((saved / checkpoint.MANIFEST).read_text())
    (saved / checkpoint.MANIFEST).write_text(json.dumps({**manifest, "files": {}}))
    with pytest.raises(CheckpointError, match="lists no files"):
        checkpoint.verify(saved)
    with pytest.raises(CheckpointError, match="lists no files"):
        _resume(saved)  # each worker checks too, not only the launcher


def test_a_partial_manifest_is_refused(saved):
    manifest = json.loads((saved / checkpoint.MANIFEST).read_text())
    manifest["files"].pop(".metadata")
    (saved / checkpoint.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"\.metadata' is not in its manifest"):
        checkpoint.verify(saved)


def test_a_file_added_after_saving_is_refused(saved):
    (saved / "__9_0.distcp").write_bytes(b"extra")
    with pytest.raises(CheckpointError, match="is not in its manifest") as err:
        checkpoint.verify(saved)
    assert "__9_0.distcp" in str(err.value)
    with pytest.raises(CheckpointError, match="is not in its manifest"):
        _resume(saved)


def test_a_damaged_file_is_refused_where_the_worker_loads(saved):
    data = next(saved.glob("*.distcp"))
    raw = bytearray(data.read_bytes())
    raw[-1] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="does not match its checksum"):
        _resume(saved)


def test_metadata_declaring_a_huge_tensor_is_refused_before_allocating(saved):
    meta = pickle.loads((saved / ".metadata").read_bytes())
    meta.state_dict_metadata["model.w"].size = torch.Size([1 << 40, 1 << 20])
    (saved / ".metadata").write_bytes(pickle.dumps(meta))
    _reseal(saved)
    with pytest.raises(CheckpointError, match=r"larger-than-its-data-files entry 'model\.w'"):
        _resume(saved)
