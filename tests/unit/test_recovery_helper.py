"""`shoal.Recovery` in one process: a loop "restarted" (TORCHELASTIC_RESTART_COUNT=1, fresh objects) after
its step 7 goes on from the point of step 5 and ends with the parameters of a loop that never stopped."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import shoal
from shoal import env
from shoal.errors import CheckpointError


def loop(root, steps: int, stop_after: int | None = None) -> tuple[dict, int]:
    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(96, 8), torch.randint(0, 3, (96,)))
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    strategy = shoal.DataParallel()
    model, optimizer = strategy.prepare(model, optimizer)
    loader = strategy.loader(data, batch_size=16, shuffle=True, seed=0)
    recovery = shoal.Recovery(strategy, model, optimizer, loader=loader, schedule=schedule, every=5, root=root)
    start = recovery.resume()
    batches = loader.forever()
    for step in range(start, steps):
        x, y = next(batches)
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        schedule.step()
        assert recovery.save() == step + 1
        if stop_after == step + 1:
            break
    return {k: v.clone() for k, v in model.state_dict().items()}, start


def test_a_restarted_loop_resumes_from_its_newest_point_and_ends_bit_identical(tmp_path, monkeypatch):
    want, _ = loop(tmp_path / "whole", 12)
    loop(tmp_path / "cut", 12, stop_after=7)  # points at steps 5 (and none at 7)
    monkeypatch.setenv(env.RESTART_COUNT, "1")
    got, start = loop(tmp_path / "cut", 12)
    assert start == 5
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=0, rtol=0)


def test_a_fresh_start_forgets_old_points_and_an_unprepared_optimizer_is_refused(tmp_path, monkeypatch):
    loop(tmp_path, 12, stop_after=7)
    monkeypatch.setenv(env.RESTART_COUNT, "0")
    _, start = loop(tmp_path, 3)
    assert start == 0
    monkeypatch.setenv(env.RESTART_COUNT, "1")
    _, start = loop(tmp_path, 3)
    assert start == 0  # the fresh start above removed the point of step 5
    model = nn.Linear(2, 2)
    with pytest.raises(CheckpointError, match=r"strategy\.prepare"):
        shoal.Recovery(shoal.DataParallel(), model, torch.optim.SGD(model.parameters(), lr=0.1), root=tmp_path)


def test_a_gone_launchers_recovery_folder_is_swept_and_a_live_ones_kept(tmp_path):
    import os

    from shoal.procfs import remove_orphaned

    gone, alive = tmp_path / "shoal-recovery-99999999-ab", tmp_path / f"shoal-recovery-{os.getpid()}-cd"
    for folder in (gone, alive):
        (folder / "rank0").mkdir(parents=True)
    remove_orphaned(tmp_path, "shoal-recovery-")
    assert not gone.exists() and alive.exists()
