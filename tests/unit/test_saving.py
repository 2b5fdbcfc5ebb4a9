"""Saving and loading in a world of one (no process group): the full state
equals plain PyTorch's and resumes under any strategy; DataParallel's state
dict hooks; the sentences for what cannot be loaded or pickled. The 2-rank
cases are tests/multiproc/test_saving.py."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import shoal
from shoal.strategies.data_parallel import _accept_plain_names, _plain_names
from shoal.strategies.pickling import refuse_pickling
from tests.workers import saving as worker

NAMES = list(worker.STRATEGIES)


def roundtrip(state: dict) -> dict:
    """What torch.save and torch.load(weights_only=True) make of it."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("saved_under", NAMES)
def test_a_world_of_one_saves_the_plain_state_and_resumes_under_any_strategy(saved_under):
    strategy, model, optimizer = worker.prepared(saved_under, seed=0)
    worker.train(model, optimizer, range(worker.STEPS))
    saved = roundtrip(strategy.full_state_dict(model, optimizer))
    worker.assert_matches(saved, worker.reference(worker.STEPS))
    assert worker.pickling_error(model) is None  # nothing split: torch.save(model) works
    resumed_under = NAMES[(NAMES.index(saved_under) + 1) % len(NAMES)]
    strategy, model, optimizer = worker.prepared(resumed_under, seed=1)
    strategy.load_full_state_dict(model, saved, optimizer)
    worker.train(model, optimizer, range(worker.STEPS, 2 * worker.STEPS))
    worker.assert_matches(strategy.full_state_dict(model, optimizer), worker.reference(2 * worker.STEPS))


def test_saving_before_the_first_step_leaves_the_optimizer_fresh():
    strategy, model, optimizer = worker.prepared("data_parallel", seed=0)
    initial = strategy.full_state_dict(model, optimizer)  # torch steps the optimizer to read its layout
    assert initial["optimizer"]["state"] == {} and not optimizer.state
    worker.train(model, optimizer, range(2 * worker.STEPS))
    worker.assert_matches(strategy.full_state_dict(model, optimizer), worker.reference(2 * worker.STEPS))
    # loading it back gives the untrained model and an optimizer without state (Adam's step 0)
    strategy.load_full_state_dict(model, initial, optimizer)
    assert not optimizer.state
    worker.train(model, optimizer, range(2 * worker.STEPS))
    worker.assert_matches(strategy.full_state_dict(model, optimizer), worker.reference(2 * worker.STEPS))


def test_the_model_alone_and_a_stateless_optimizer_save_and_load():
    strategy = shoal.DataParallel()
    model = worker.build_model()
    model, optimizer = strategy.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert set(strategy.full_state_dict(model)) == {"model"}
    worker.train(model, optimizer, range(worker.STEPS))
    saved = roundtrip(strategy.full_state_dict(model, optimizer))
    fresh = shoal.DataParallel()
    other = worker.build_model(seed=1)
    other, other_optimizer = fresh.prepare(other, torch.optim.SGD(other.parameters(), lr=0.5))
    fresh.load_full_state_dict(other, saved, other_optimizer)  # SGD without momentum has no tensors
    assert other_optimizer.param_groups[0]["lr"] == 0.1
    for name, value in model.state_dict().items():
        assert torch.equal(other.state_dict()[name], value)


@pytest.mark.parametrize(
    ("state", "says"),
    [
        ({"0.weight": torch.zeros(16, 8)}, "takes what full_state_dict returned"),
        ({"model": {"0.weight": torch.zeros(16, 8)}}, "does not fit this model"),
        (None, "holds no optimizer state"),  # None: the model's full state without the optimizer's
    ],
)
def test_what_does_not_load_is_said_in_one_sentence(state, says):
    strategy, model, optimizer = worker.prepared("sharded", seed=0)
    if state is None:
        state = strategy.full_state_dict(model)
    with pytest.raises(shoal.ShoalError, match=says):
        strategy.load_full_state_dict(model, state, optimizer)


class Wrapper(nn.Module):
    """What DDP looks like to a state dict: the user's model as `module`."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module
        self.register_state_dict_post_hook(_plain_names)
        self.register_load_state_dict_pre_hook(_accept_plain_names)


def bn_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))


@pytest.mark.parametrize("nested", [False, True])
def test_the_data_parallel_wrapper_gives_and_takes_plain_names(nested):
    inner = bn_model()
    inner(torch.randn(8, 4))  # running statistics and num_batches_tracked change
    wrapped = Wrapper(inner)
    root = nn.ModuleDict({"net": wrapped}) if nested else wrapped
    state = root.state_dict()
    prefix = "net." if nested else ""
    assert list(state) == [prefix + k for k in inner.state_dict()]
    assert state._metadata[prefix + "1"] == {"version": 2}  # BatchNorm's version, under its plain name
    plain = bn_model()
    plain.load_state_dict({k[len(prefix) :]: v for k, v in state.items()})
    assert all(torch.equal(plain.state_dict()[k], v) for k, v in inner.state_dict().items())

    target = bn_model()
    rewrapped = Wrapper(target)
    rewrapped.load_state_dict(plain.state_dict())  # plain names, metadata included
    assert all(torch.equal(target.state_dict()[k], v) for k, v in inner.state_dict().items())
    rewrapped.load_state_dict({f"module.{k}": v for k, v in plain.state_dict().items()})  # DDP's own names
    with pytest.raises(RuntimeError, match="Missing key"):
        rewrapped.load_state_dict({"0.weight": torch.zeros(4, 4)})  # still strict


def test_an_unpicklable_model_says_what_to_save_and_still_copies():
    model = worker.build_model()
    refuse_pickling(model, "its parameters are sharded over the ranks")
    assert type(model).__name__ == "Sequential" and isinstance(model, nn.Sequential)
    with pytest.raises(shoal.ShoalError, match=r"sharded over the ranks\): save strategy.full_state_dict"):
        torch.save(model, io.BytesIO())
    twin = copy.deepcopy(model)
    assert twin is not model and torch.equal(twin[0].weight, model[0].weight)
    assert twin[0].weight is not model[0].weight
    assert copy.copy(model)[0] is model[0]


@pytest.mark.parametrize("scheduled", ["saved", "loaded"])
def test_an_lr_schedulers_group_keys_on_one_side_only_load(scheduled):
    """A scheduler adds `initial_lr` to the optimizer's groups: made before saving, or before loading."""
    strategy, model, optimizer = worker.prepared("sharded", seed=0)
    if scheduled == "saved":
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    worker.train(model, optimizer, range(worker.STEPS))
    if scheduled == "saved":
        scheduler.step()
    saved = roundtrip(strategy.full_state_dict(model, optimizer))
    strategy, model, optimizer = worker.prepared("tensor_parallel", seed=1)
    if scheduled == "loaded":
        torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    strategy.load_full_state_dict(model, saved, optimizer)
    assert optimizer.param_groups[0]["lr"] == (0.025 if scheduled == "saved" else 0.05)
    assert optimizer.param_groups[0]["initial_lr"] == 0.05


def test_a_model_with_a_child_called_module_loads_through_the_data_parallel_wrapper():
    inner = nn.Sequential()
    inner.add_module("module", nn.Linear(2, 2))
    wrapped = Wrapper(inner)
    assert list(wrapped.state_dict()) == ["module.weight", "module.bias"]
    saved = {k: torch.full_like(v, 3.0) for k, v in inner.state_dict().items()}
    wrapped.load_state_dict(saved)  # the plain names: not mistaken for DDP's
    assert torch.equal(inner.module.weight, saved["module.weight"])
    wrapped.load_state_dict({f"module.{k}": v * 2 for k, v in saved.items()})  # DDP's own
    assert torch.equal(inner.module.weight, saved["module.weight"] * 2)
