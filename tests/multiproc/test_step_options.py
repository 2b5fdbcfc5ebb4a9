"""The step options every synchronous strategy shares (grad_accum, clip_norm,
no_sync, clip_grad_norm_, an optimizer built after prepare) equal one process
with the combined batch, in a loop written as the DDP tutorials write it."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.ranks import run_workers
from tests.workers import step_options as worker


def assert_same(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for key, value in want.items():
        torch.testing.assert_close(torch.tensor(got[key]), value, atol=1e-5, rtol=0, msg=key)


@pytest.mark.parametrize("name", list(worker.STRATEGIES))
def test_step_options_equal_one_process(name):
    ranks = worker.STRATEGIES[name][1]
    plain, _ = worker.reference(ranks, micro=1, clip=None)
    twice, _ = worker.reference(ranks, micro=2, clip=None)
    clipped, norms = worker.reference(ranks, micro=1, clip=worker.CLIP)
    assert not torch.allclose(clipped["0.weight"], plain["0.weight"], atol=1e-3), "the clip norm must actually clip"
    results = run_workers(worker.train_all, (name,), world=2, timeout_s=120)
    held = [res["no_sync"]["held"] for res in results]
    if name == "data_parallel":  # inside no_sync each rank keeps its own gradient: nothing was all-reduced
        assert all(a != pytest.approx(b, abs=1e-6) for a, b in zip(*held, strict=True)), held
    if name == "sharded":  # nothing was reduce-scattered into the sharded gradients
        assert held == [[None] * worker.STEPS] * 2, held
    assert [res["mean_over_ranks"] for res in results] == [(ranks - 1) / 2] * 2  # the same figure everywhere
    for res in results:
        assert_same(res["accum"], twice)  # grad_accum=2 equals one step with the 2x batch
        assert_same(res["clip"], clipped)  # clip_norm clips the averaged gradient
        assert_same(res["by_hand"]["params"], clipped)  # prepare(model), then prepare_optimizer
        assert res["by_hand"]["norms"] == pytest.approx(norms, abs=1e-5)  # clip_grad_norm_ returns torch's norm
        assert_same(res["no_sync"]["params"], twice)
        if name == "tensor_parallel_dp2":  # averaged at step(): a plain optimizer would train each replica alone
            assert "but the optimizer was not prepared" in res["plain"], res["plain"]
            assert "but the optimizer was not prepared" in res["stale"], res["stale"]
        else:
            assert_same(res["plain"], plain)
        if name in ("sharded", "tensor_parallel_tp2"):  # the parameters it holds were replaced: it would do nothing
            assert "holds the model's parameters from before prepare()" in res["stale"], res["stale"]
        elif name == "data_parallel":  # DDP keeps the parameters
            assert_same(res["stale"], plain)
