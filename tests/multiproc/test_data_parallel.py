"""Synchronous data parallelism equals one process with the combined batch."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.cli import shoal
from tests.helpers.ranks import run_workers
from tests.workers import dp_equivalence as worker


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("dp") / "params.pt"
    result = shoal("run", "-n", "2", "tests/workers/dp_equivalence.py", out, timeout=180)
    assert result.returncode == 0, result.stderr
    return torch.load(out, weights_only=True)


def assert_same(got: dict, want: dict) -> None:
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=1e-5, rtol=0)


def test_two_ranks_equal_one_process_with_the_combined_batch(two_rank_results):
    assert_same(two_rank_results["plain"], worker.single_process(batch=16, clip=None))


def test_grad_accum_equals_one_step_with_the_k_times_batch(two_rank_results):
    assert_same(two_rank_results["accum"], worker.single_process(batch=64, clip=None))


def test_clipping_equals_single_process_clipping_of_the_combined_batch(two_rank_results):
    want = worker.single_process(batch=16, clip=0.05)
    assert_same(two_rank_results["clip"], want)
    unclipped = worker.single_process(batch=16, clip=None)
    assert not torch.allclose(want["0.weight"], unclipped["0.weight"], atol=1e-3), "the clip norm must actually clip"


@pytest.mark.slow
def test_clipping_by_hand_after_synchronize_equals_single_process():
    """With grad_accum=2: synchronize() is False on the first micro-step and True on the last (accum=1's one case)."""
    accum = 2
    ranks = run_workers(worker.clip_by_hand, (accum, 0.05))
    assert ranks[0]["synced"] == [False, True] * 2
    want = worker.single_process(batch=16 * accum, clip=0.05)
    for res in ranks:
        assert_same({k: torch.tensor(v) for k, v in res["params"].items()}, want)
