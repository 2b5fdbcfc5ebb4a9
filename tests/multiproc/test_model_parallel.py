"""Model-parallel layouts on 4 real ranks equal one process with the combined
batch; a checkpoint saved by a pipeline loads into a plain model."""

from __future__ import annotations

import pytest
import torch

from shoal.data.loader import ShardedLoader
from tests.helpers.cli import shoal
from tests.workers import mp_equivalence as worker


def reference(kind: str, dp: int):
    """Plain PyTorch, one process, batch = per-rank batch x data-parallel ranks."""
    model = worker.build(kind)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    batches = ShardedLoader(worker.data(kind), batch_size=worker.BATCH * dp, seed=3).forever()
    loss_fn = worker.loss_fn(kind)
    for _ in range(worker.STEPS):
        x, y = next(batches)
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
    return model, opt, loss.item()


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("mp")
    result = shoal("run", "-n", "4", "tests/workers/mp_equivalence.py", out, timeout=300, env={"SHOAL_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.mark.parametrize("name", list(worker.SCENARIOS))
def test_layout_equals_one_process(four_ranks, name):
    kind, _, dp = worker.SCENARIOS[name]
    model, _, want_loss = reference(kind, dp)
    merged, losses = {}, []
    for rank in range(4):
        saved = torch.load(four_ranks / f"{name}.rank{rank}.pt", weights_only=True)
        losses.append(saved["loss"])
        for key, value in saved["params"].items():
            if key in merged:  # replicas must agree
                torch.testing.assert_close(value, merged[key], atol=1e-6, rtol=0)
            merged[key] = value
    want = dict(model.named_parameters())
    assert merged.keys() == want.keys(), "every parameter held by some rank, under the whole model's name"
    for key, value in want.items():
        torch.testing.assert_close(merged[key], value.detach(), atol=1e-5, rtol=0)
    # each data-parallel replica reports the loss of its own shard; their mean is the whole batch's
    assert abs(sum(losses) / 4 - want_loss) < 1e-4


def test_pipeline_checkpoint_loads_into_a_plain_model(four_ranks):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    want, want_opt, _ = reference("mlp", 2)
    model = worker.build("mlp")
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model_sd, optim_sd = get_state_dict(model, opt)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(four_ranks / "ckpt_pipeline"))
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    for (name, p), q in zip(model.named_parameters(), want.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=0, msg=name)
        torch.testing.assert_close(
            opt.state[p]["momentum_buffer"], want_opt.state[q]["momentum_buffer"], atol=1e-5, rtol=0
        )


def test_pipeline_full_state_dict_and_eval_output_on_every_rank(four_ranks):
    """dp=2 x 2 stages: each rank gathers its pipeline's stages into the plain model's state."""
    want, want_opt, _ = reference("mlp", 2)
    for rank in range(4):
        full = torch.load(four_ranks / f"full_pipeline.rank{rank}.pt", weights_only=True)
        assert full["model"].keys() == want.state_dict().keys()
        for name, p in want.named_parameters():
            torch.testing.assert_close(full["model"][name], p.detach(), atol=1e-5, rtol=0, msg=name)
            momentum = full["optimizer"]["state"][name]["momentum_buffer"]
            torch.testing.assert_close(momentum, want_opt.state[p]["momentum_buffer"], atol=1e-5, rtol=0)
        assert full["optimizer"]["param_groups"][0]["params"] == [n for n, _ in want.named_parameters()]
        plain = worker.build("mlp")
        plain.load_state_dict(full["model"])
        torch.testing.assert_close(full["eval"]["out"], plain(full["eval"]["x"]), atol=1e-5, rtol=0)
