"""Model-parallel pieces in one process: splits balance, degrees and options
are checked, tensor-parallel plans pair columns and rows."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from shoal.errors import ConfigError
from shoal.mesh import ParallelDims
from shoal.strategies.mesh_strategy import fingerprint
from shoal.strategies.pipeline import Pipeline, measure_block_times, split_balanced
from shoal.strategies.tensor_parallel import auto_plan, plan_for, replicated_regions
from tests.workers import mp_equivalence as worker
from tests.workers import tp_real


def test_split_balances_uneven_blocks_by_parameters():
    sizes = [1, 1, 8, 1, 1, 1, 4, 1]
    names = [str(i) for i in range(len(sizes))]
    chunks = split_balanced(names, dict(zip(names, map(float, sizes), strict=True)), 2)
    sums = [sum(sizes[int(n)] for n in c) for c in chunks]
    assert [n for c in chunks for n in c] == names  # contiguous, complete, in order
    assert max(sums) == 10  # the best cut; an equal-count split gives 11 | 7
    assert split_balanced(names, dict(zip(names, map(float, sizes), strict=True)), 3, starts=["2", "6"]) == [
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
    with pytest.raises(ConfigError, match=r"1f1b schedule needs 'microbatches' .1. >= 'stages' .2."):
        Pipeline(stages=2, microbatches=1, schedule="1f1b")


def test_auto_plan_pairs_columns_then_rows():
    mlp = worker.build("mlp")
    assert auto_plan(mlp) == {"1": "colwise", "3": "rowwise", "5": "colwise", "7": "rowwise"}
    gpt = worker.build("gpt")
    plan = auto_plan(gpt)
    assert plan["1.attn.q"] == plan["1.attn.k"] == plan["1.attn.v"] == "colwise" and plan["1.attn.out"] == "rowwise"
    assert plan["2.mlp.up"] == "colwise" and plan["2.mlp.down"] == "rowwise"


def test_a_plan_that_splits_nothing_is_an_error_under_tensor_parallelism():
    """mnist's Net has no Linear pair the automatic plan recognizes: an error, not N unrelated models."""
    with pytest.raises(
        ConfigError, match=r"found no layer to split .* plan=\{'layer.name'.* or use shoal.DataParallel\(\)"
    ):
        plan_for(tp_real.MnistNet(), "auto", tp=2)
    with pytest.raises(ConfigError, match="found no layer to split"):
        plan_for(tp_real.Net(), {}, tp=2)
    assert plan_for(tp_real.MnistNet(), "auto", tp=1) == {}  # dp only: nothing to split is fine
    assert plan_for(tp_real.Net(), "auto", tp=2) == {"mlp.0": "colwise", "mlp.2": "rowwise"}


def test_tied_parameters_are_refused():
    model = tp_real.Net()
    model.head.weight = model.emb.weight  # (4, 16) vs (16, 16) does not matter: tying is refused first
    with pytest.raises(ConfigError, match=r"tied parameters \('head.weight' is 'emb.weight'\)"):
        plan_for(model, "auto", tp=2)


class Stem(nn.Module):
    """minGPT-ddp's EmbeddingStem: a parameter of its own beside its children."""

    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(8, 4)
        self.pos = nn.Parameter(torch.zeros(1, 6, 4))
        self.drop = nn.Dropout(0.1)


def test_layers_outside_the_plan_are_replicated_whole():
    model = tp_real.Net()
    plan = auto_plan(model)
    assert replicated_regions(model, plan) == [model.emb, model.norm, model.head]  # dropout holds nothing
    stem = nn.Sequential(Stem(), nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4))
    assert replicated_regions(stem, auto_plan(stem)) == [stem[0]]  # one region, its children inside


def test_what_cannot_be_replicated_says_so():
    mixed = Stem()
    mixed.mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4))
    with pytest.raises(ConfigError, match=r"module '0': it holds parameter\(s\) \['pos'\] itself and also contains"):
        wrapped = nn.Sequential(mixed)
        replicated_regions(wrapped, auto_plan(wrapped))
    lstm = nn.Sequential(nn.LSTM(4, 4), nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4))
    with pytest.raises(ConfigError, match=r"recurrent layer '0'.* shoal.DataParallel\(\)"):
        replicated_regions(lstm, auto_plan(lstm))


def test_batch_fingerprint_sees_order_and_content():
    x = torch.arange(12.0).reshape(4, 3)
    assert torch.equal(fingerprint(x), fingerprint(x.clone()))
    assert not torch.equal(fingerprint(x), fingerprint(x.flip(0)))  # same samples, other order
    assert not torch.equal(fingerprint(x), fingerprint(x[:3]))


def test_pipelined_model_names_the_loop_it_needs():
    """`loss_fn(model(x), y)` cannot train a pipeline; one sentence says to write `model(x, y)`."""
    from shoal.strategies.pipeline import PipelinedModel

    strategy = Pipeline(stages=2, microbatches=2)
    with pytest.raises(ConfigError, match=r"write `loss = model\(x, y\)`"):
        PipelinedModel(strategy, nn.ModuleDict())(torch.zeros(2, 4))  # forward fails before using the chunks
