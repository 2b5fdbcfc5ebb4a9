"""TensorParallel on a real script's loop (2 ranks, no common seed): layers
outside the plan stay identical, torch's own clipping and GradScaler work and
equal one process, and silent mistakes stop with one sentence."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.ranks import run_workers
from tests.workers import tp_real as worker


@pytest.fixture(scope="module")
def two_ranks():
    return run_workers(worker.real_loop, world=2, timeout_s=180)


def reference() -> tuple[dict[str, torch.Tensor], list[float]]:
    """One process, rank 0's initial weights (seed 100), the whole batch, torch's clipping."""
    torch.manual_seed(100)
    model = worker.Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    norms = worker.train(model, opt, worker.loader(1, 0), clip=True)
    return {n: p.detach() for n, p in model.named_parameters()}, norms


@pytest.mark.parametrize("name", ["user_clip", "option_clip", "scaler"])
def test_clipping_under_tensor_parallel_equals_one_process(two_ranks, name):
    want, want_norms = reference()
    assert max(want_norms) > worker.CLIP, "the clip norm must actually clip"
    for rank in range(2):
        got = two_ranks[rank][name]
        assert got["params"].keys() == want.keys()
        for key, value in want.items():
            torch.testing.assert_close(torch.tensor(got["params"][key]), value, atol=1e-5, rtol=0, msg=key)
        if name != "option_clip":  # torch's clip_grad_norm_ returns the true global norm
            assert got["norms"] == pytest.approx(want_norms, abs=1e-5)


@pytest.mark.parametrize("name", list(worker.SCENARIOS))
def test_layers_outside_the_plan_stay_bitwise_identical(two_ranks, name):
    first, second = (two_ranks[rank][name] for rank in range(2))
    outside = {"emb.weight", "norm.weight", "norm.bias", "head.weight", "head.bias"}
    assert set(first["replicated"]) == outside | {"mlp.2.bias"}  # a row-wise layer's bias is replicated too
    for key in first["replicated"]:
        assert first["params"][key] == second["params"][key], key


def test_a_mingpt_shaped_model_equals_one_process_and_its_replicas_agree(two_ranks):
    """minGPT-ddp's shape: a stem holding a parameter beside its children, torch's MultiheadAttention
    given its mask by keyword, dropout after the row-wise layer, the loss inside the model."""
    torch.manual_seed(100)
    model = worker.MiniGPT()
    want_norms = worker.train_gpt(model, torch.optim.SGD(model.parameters(), lr=0.1))
    for rank in range(2):
        got = two_ranks[rank]["mingpt_0.0"]
        for key, value in model.named_parameters():
            torch.testing.assert_close(torch.tensor(got["params"][key]), value.detach(), atol=1e-5, rtol=0, msg=key)
        assert got["norms"] == pytest.approx(want_norms, abs=1e-5)
    assert "stem.pos" in two_ranks[0]["mingpt_0.0"]["replicated"]
    for name in ("mingpt_0.0", "mingpt_0.1"):
        first, second = (two_ranks[rank][name] for rank in range(2))
        assert all(first["params"][key] == second["params"][key] for key in first["replicated"]), name


def test_dropout_draws_one_mask_over_the_tensor_parallel_group(two_ranks):
    """With p=0.3 the model trains differently from p=0, yet its replicas agree (previous test)."""
    dropped, plain = two_ranks[0]["dropout"]["params"], two_ranks[0]["user_clip"]["params"]
    assert dropped["head.weight"] != plain["head.weight"]


def test_a_sampler_split_by_world_rank_stops_with_one_sentence(two_ranks):
    for rank in range(2):
        message = two_ranks[rank]["world_sampler"]
        assert "different batches" in message and "num_replicas=strategy.data_world" in message


def test_a_plan_that_splits_nothing_is_an_error(two_ranks):
    for rank in range(2):
        message = two_ranks[rank]["nothing_to_split"]
        assert "found no layer to split" in message and "shoal.DataParallel()" in message
