"""Model-parallel layouts equal one process with the combined batch; splits
balance; a checkpoint saved by a pipeline loads into a plain model."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from conftest import shoal
from torch import nn

from shoal.data.loader import ShardedLoader
from shoal.errors import ConfigError
from shoal.mesh import ParallelDims
from shoal.strategies.pipeline import Pipeline, measure_block_times, split_balanced
from shoal.strategies.tensor_parallel import auto_plan

sys.path.insert(0, str(Path(__file__).parent / "workers"))
import mp_equivalence as worker


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


@pytest.mark.slow
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


@pytest.mark.slow
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
    for (name, p), q in zip(model.named_parameters(), want.parameters()):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=0, msg=name)
        torch.testing.assert_close(
            opt.state[p]["momentum_buffer"], want_opt.state[q]["momentum_buffer"], atol=1e-5, rtol=0
        )


def test_split_balances_uneven_blocks_by_parameters():
    sizes = [1, 1, 8, 1, 1, 1, 4, 1]
    names = [str(i) for i in range(len(sizes))]
    chunks = split_balanced(names, dict(zip(names, map(float, sizes))), 2)
    sums = [sum(sizes[int(n)] for n in c) for c in chunks]
    assert [n for c in chunks for n in c] == names  # contiguous, complete, in order
    assert max(sums) == 10  # the best cut; an equal-count split gives 11 | 7
    assert split_balanced(names, dict(zip(names, map(float, sizes))), 3, starts=["2", "6"]) == [
        ["0", "1"],
        ["2", "3", "4", "5"],
        ["6", "7"],
    ]


def test_measured_split_follows_compute_not_block_count():
    model = nn.Sequential(
        nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 1024), nn.Linear(1024, 1024), nn.Linear(1024, 64)
    )
    times = measure_block_times(model, torch.randn(256, 64))
    chunks = split_balanced(list(times), times, 2)
    assert chunks[0] == ["0", "1", "2", "3"] or chunks[0] == ["0", "1", "2"], (
        chunks
    )  # the 1024x1024 block is the weight


def test_degrees_must_divide_the_world():
    with pytest.raises(ConfigError, match="does not divide"):
        ParallelDims.for_world(4, pp=3)
    with pytest.raises(ConfigError, match="make the product equal"):
        ParallelDims.for_world(4, pp=2, dp=3)
    assert ParallelDims.for_world(8, pp=2, tp=2) == ParallelDims(2, 2, 2)
    assert ParallelDims(2, 2, 2).coords(5) == (1, 0, 1)


def test_pipeline_options_are_checked():
    with pytest.raises(ConfigError, match="multiple of 'stages'"):
        Pipeline(stages=2, microbatches=3, schedule="interleaved")
    with pytest.raises(ConfigError, match="schedule"):
        Pipeline(schedule="zigzag")
    with pytest.raises(ConfigError, match="1f1b schedule needs 'microbatches' .1. >= 'stages' .2."):
        Pipeline(stages=2, microbatches=1, schedule="1f1b")


def test_auto_plan_pairs_columns_then_rows():
    mlp = worker.build("mlp")
    assert auto_plan(mlp) == {"1": "colwise", "3": "rowwise", "5": "colwise", "7": "rowwise"}
    gpt = worker.build("gpt")
    plan = auto_plan(gpt)
    assert plan["1.attn.q"] == plan["1.attn.k"] == plan["1.attn.v"] == "colwise" and plan["1.attn.out"] == "rowwise"
    assert plan["2.mlp.up"] == "colwise" and plan["2.mlp.down"] == "rowwise"


def test_pipelined_model_names_the_loop_it_needs():
    """`loss_fn(model(x), y)` cannot train a pipeline; one sentence says to write `model(x, y)`."""
    from shoal.strategies.pipeline import PipelinedModel

    strategy = Pipeline(stages=2, microbatches=2)
    with pytest.raises(ConfigError, match=r"write `loss = model\(x, y\)`"):
        PipelinedModel(strategy, nn.ModuleDict())(torch.zeros(2, 4))  # forward fails before using the chunks
