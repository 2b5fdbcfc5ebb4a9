"""Saving and resuming in a user's own loop: the full state of a 2-rank job
equals one process's, loads into the plain model, and resumes under another
strategy and another world size exactly where an uninterrupted run goes."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.ranks import run_workers
from tests.workers import saving as worker


@pytest.mark.parametrize(
    ("saved_under", "resumed_under"),
    [("data_parallel", "sharded"), ("sharded", "tensor_parallel"), ("tensor_parallel", "data_parallel")],
)
def test_full_state_saved_by_two_ranks_loads_anywhere_and_resumes_exactly(tmp_path, saved_under, resumed_under):
    ranks = run_workers(worker.save_and_resume, (saved_under, resumed_under, str(tmp_path)), timeout_s=120)
    after_saving, uninterrupted = worker.reference(worker.STEPS), worker.reference(2 * worker.STEPS)
    for rank in range(2):  # every rank got the whole state; it loads into the plain model
        worker.assert_matches(torch.load(tmp_path / f"full-{rank}.pt", weights_only=True), after_saving)
    # resumed under another strategy on 2 ranks, and in a world of one
    worker.assert_matches(torch.load(tmp_path / "resumed.pt", weights_only=True), uninterrupted)
    worker.assert_matches(worker.resume_alone(tmp_path / "full-0.pt", resumed_under), uninterrupted)

    if saved_under == "data_parallel":  # mnist's torch.save(model.state_dict()) loads into the plain Net
        saved = torch.load(tmp_path / "dp-model.pt", weights_only=True)
        worker.assert_matches({"model": saved}, {"model": after_saving["model"]})
    assert [r["sliced"] for r in ranks] == ["Sequential"] * 2
    pickling = [r["pickling"] for r in ranks]
    if saved_under == "data_parallel":
        assert pickling == [None, None]  # DDP pickles
    else:  # sharded, split: one sentence naming what to save instead
        assert all("save strategy.full_state_dict(model, optimizer)" in p for p in pickling), pickling
