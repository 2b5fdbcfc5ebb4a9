"""The step options every synchronous strategy shares, in one process: checked
values, the sentences a wrong loop gets, and grad_accum / clip_grad_norm_ in a
world of one (the same on N ranks: tests/multiproc/test_step_options.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import shoal
from shoal.errors import ConfigError, ShoalError
from shoal.train import jobconfig as config
from tests.workers import step_options as worker

STRATEGIES = [shoal.DataParallel, shoal.ShardedDataParallel, shoal.TensorParallel]


@pytest.mark.parametrize("make", STRATEGIES)
@pytest.mark.parametrize(
    "options, key, message",
    [
        ({"grad_accum": 0}, "grad_accum", "'grad_accum' must be >= 1"),
        ({"clip_norm": 0.0}, "clip_norm", "'clip_norm' must be > 0 (or unset for no clipping), not 0.0"),
    ],
)
def test_every_strategy_checks_the_same_step_options(make, options, key, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")) as err:
        make(**options)
    assert err.value.key == key


@pytest.mark.parametrize("name", ["sharded", "tensor_parallel"])
def test_the_config_takes_the_step_options_for_every_strategy(name):
    cfg = config.load(
        None, config.parse_overrides([f"--strategy.name={name}", "--strategy.grad_accum=2", "--strategy.clip_norm=1"])
    )
    strategy = cfg.strategy.options.build()
    assert (strategy.grad_accum, strategy.clip_norm) == (2, 1.0)


NOT_PREPARED = r"applies grad_accum=2 at optimizer.step\(\), but the optimizer was not prepared"


@pytest.mark.parametrize("make", STRATEGIES)
def test_a_plain_optimizer_under_step_options_stops_at_its_first_step(make):
    strategy = make(grad_accum=2)
    model, prepared = strategy.prepare(worker.build())
    assert prepared is None
    opt = worker.sgd(model.parameters())
    other = worker.sgd(nn.Linear(2, 2).parameters())
    x, y = worker.batch(0, 0, 1)
    nn.functional.cross_entropy(model(x), y).backward()
    other.step()  # an optimizer of another model is none of its business
    with pytest.raises(ShoalError, match=NOT_PREPARED):
        opt.step()


@pytest.mark.parametrize("make", STRATEGIES)
def test_a_loop_without_step_under_step_options_stops_at_the_next_forward(make):
    """As word_language_model updates `p.data` by hand: no step() to see, so the forward after a backward stops."""
    strategy = make(grad_accum=2)
    model, _ = strategy.prepare(worker.build())
    x, y = worker.batch(0, 0, 1)
    with torch.no_grad():
        model(x)  # predicting is not training
    nn.functional.cross_entropy(model(x), y).backward()
    for p in model.parameters():
        p.data.add_(p.grad, alpha=-0.1)
    model.eval()
    model(x)  # nor is evaluating
    model.train()
    with pytest.raises(ShoalError, match=NOT_PREPARED):
        model(x)


@pytest.mark.parametrize("make", STRATEGIES)
def test_an_optimizer_prepared_after_a_dry_run_trains(make):
    strategy = make(grad_accum=2)
    model, _ = strategy.prepare(worker.build())
    x, y = worker.batch(0, 0, 1)
    model(x)  # a forward before the optimizer exists (lazy modules are built so)
    opt = strategy.prepare_optimizer(worker.sgd(model.parameters()))
    for _ in range(3):
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def test_prepare_optimizer_needs_the_prepared_model():
    strategy = shoal.ShardedDataParallel()
    with pytest.raises(ShoalError, match=r"call prepare\(model\) before prepare_optimizer\(optimizer\)"):
        strategy.prepare_optimizer(worker.sgd(worker.build().parameters()))
    strategy.prepare(worker.build())
    with pytest.raises(ShoalError, match="holds parameters that are not the prepared model's"):
        strategy.prepare_optimizer(worker.sgd(worker.build().parameters()))


@pytest.mark.parametrize("make", STRATEGIES)
def test_grad_accum_and_clipping_by_hand_equal_one_process_with_the_2x_batch(make):
    want, norms = worker.reference(1, micro=2, clip=worker.CLIP)
    strategy = make(grad_accum=2)
    model, opt = strategy.prepare(worker.build(), None)
    opt = strategy.prepare_optimizer(worker.sgd(model.parameters()))
    got = []
    for i in range(worker.STEPS * 2):
        x, y = worker.batch(i, 0, 1)
        nn.functional.cross_entropy(model(x), y).backward()
        norm = strategy.clip_grad_norm_(worker.CLIP)  # NaN, and nothing clipped, on an accumulating micro-step
        assert norm.isnan() == (i % 2 == 0)
        got += [] if norm.isnan() else [float(norm)]
        opt.step()
        opt.zero_grad()
    assert got == pytest.approx(norms, abs=1e-5)
    for key, value in strategy.unwrap(model).state_dict().items():
        torch.testing.assert_close(value, want[key], atol=1e-5, rtol=0)
