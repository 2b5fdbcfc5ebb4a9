"""The parameter server's side of issue 10, in one process: which torch optimizers the
servers run (and that pieces step as the whole tensor does), the guard against a loop
that updates the parameters itself, a picklable prepared model, and the options and
calls every strategy has (`prepare(model)` then `prepare_optimizer`, `grad_accum`,
`clip_norm`, `no_sync`, `clip_grad_norm_`)."""

from __future__ import annotations

import pickle

import pytest
import torch

from shoal.errors import ConfigError, ShoalError
from shoal.ps import optim
from shoal.strategies.parameter_server import ParameterServer, checkpoint, guard
from shoal.strategies.parameter_server.layout import Slice

SETTINGS = {  # besides the defaults: the switches and numbers that change the arithmetic
    "SGD": {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-2},
    "Adam": {"lr": 0.01, "amsgrad": True, "weight_decay": 1e-2},
    "AdamW": {"lr": 0.01},
    "Adadelta": {"lr": 1.0, "rho": 0.8},
    "Adagrad": {"lr": 0.1, "lr_decay": 0.01, "initial_accumulator_value": 0.1},
    "Adamax": {"lr": 0.01},
    "ASGD": {"lr": 0.01, "t0": 2.0},
    "NAdam": {"lr": 0.01, "decoupled_weight_decay": True, "weight_decay": 1e-2},
    "RAdam": {"lr": 0.01},
    "RMSprop": {"lr": 0.01, "momentum": 0.5, "centered": True},
    "Rprop": {"lr": 0.01, "etas": (0.4, 1.3)},
}


def test_every_optimizer_runs_on_pieces_as_torch_runs_it_on_the_whole_tensor():
    assert set(SETTINGS) == set(optim.ELEMENTWISE)
    gen = torch.Generator().manual_seed(0)
    for name, cls in optim.ELEMENTWISE.items():
        whole = torch.nn.Parameter(torch.randn(6, 5, generator=gen))
        reference = cls([whole], **SETTINGS[name])
        hp = optim.hyperparameters(name, reference.param_groups[0])
        pieces = [whole.detach().reshape(-1)[a:b].clone() for a, b in ((0, 7), (7, 30))]
        on_servers = [optim.build(name, p, optim.check_hyperparameters(name, hp)) for p in pieces]
        for _ in range(5):
            grad = torch.randn(6, 5, generator=gen)
            whole.grad = grad
            reference.step()
            for p, opt, (a, b) in zip(pieces, on_servers, ((0, 7), (7, 30)), strict=True):
                p.grad = grad.reshape(-1)[a:b].clone()
                opt.step()
        got = torch.cat(pieces)
        torch.testing.assert_close(got, whole.detach().reshape(-1), rtol=1e-6, atol=1e-6, msg=name)
        # the state a checkpoint carries is what the class keeps, and goes back in
        state = optim.export_state(on_servers[0], pieces[0])
        assert [k for k, _ in state] == sorted(reference.state[whole]), name
        fresh = optim.build(name, pieces[0].clone(), optim.check_hyperparameters(name, hp))
        optim.import_state(name, fresh, fresh.param_groups[0]["params"][0], state)


@pytest.mark.parametrize(
    "name, words",
    [
        ("LBFGS", "because it re-evaluates the whole model through a closure"),
        ("SparseAdam", "because it needs sparse gradients"),
        ("Adafactor", "because it factors row and column statistics"),
        ("Muon", "because it orthogonalizes whole matrices"),
    ],
)
def test_optimizers_that_couple_elements_are_refused_with_the_reason(name, words):
    if not hasattr(torch.optim, name):
        pytest.skip(f"this torch has no torch.optim.{name}")
    with pytest.raises(ConfigError, match=words) as err:
        optim.optimizer_name(getattr(torch.optim, name))
    assert "use one of SGD, Adam, AdamW, Adadelta" in str(err.value) and err.value.key == "optimizer"


def test_a_subclass_runs_only_if_it_changes_nothing_but_defaults():
    class MyAdamW(torch.optim.AdamW):
        def __init__(self, params, lr=3e-4):
            super().__init__(params, lr=lr, weight_decay=0.1)

    class Clipped(torch.optim.SGD):
        def step(self, closure=None):
            return super().step(closure)

    assert optim.optimizer_name(MyAdamW) == "AdamW"
    with pytest.raises(ConfigError, match=r"Clipped overrides step of torch.optim.SGD, and only torch's own SGD"):
        optim.optimizer_name(Clipped)


def test_hyperparameters_are_checked_by_the_type_and_range_of_the_class_defaults():
    assert optim.check_hyperparameters("Rprop", {"etas": [0.5, 1.2], "step_sizes": [1e-6, 50]}) == {
        "etas": (0.5, 1.2),
        "step_sizes": (1e-6, 50.0),
    }
    for name, hp in [
        ("Rprop", {"etas": [1.5, 1.2]}),
        ("Rprop", {"step_sizes": [1.0]}),
        ("Adadelta", {"rho": 1.5}),
        ("Adagrad", {"lr_decay": -1}),
        ("RMSprop", {"centered": 1}),
        ("ASGD", {"t0": float("inf")}),
        ("Adadelta", {"betas": [0.9, 0.99]}),  # not Adadelta's
        ("SGD", {"fused": True}),  # torch's kernels are the servers' choice
    ]:
        with pytest.raises(ValueError):
            optim.check_hyperparameters(name, hp)
    fixed = optim.flags("RMSprop", {"lr": 0.1, "momentum": 0.9, "centered": True})
    assert optim.check_hyperparameters("RMSprop", {"momentum": 0.5}, fixed) == {"momentum": 0.5}  # a schedule may
    with pytest.raises(ValueError, match="cannot turn on or off"):
        optim.check_hyperparameters("RMSprop", {"momentum": 0.0}, fixed)
    with pytest.raises(ValueError, match="centered cannot change"):
        optim.check_hyperparameters("RMSprop", {"centered": False}, fixed)


def _slices(model: torch.nn.Module) -> list[Slice]:
    return [Slice(n, p, 0, p.numel()) for n, p in model.named_parameters()]


def test_the_guard_sees_a_hand_written_update_and_a_loop_without_step():
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    installed = guard.Installed(_slices(model))
    installed.record()
    installed.check()  # nothing changed
    for change in (
        lambda p: p.data.add_(1e-3),  # word_language_model: no version bump, the values differ
        lambda p: torch.no_grad()(p.add_)(1e-3),
        lambda p: setattr(p, "data", p.data.clone().add_(1.0)),
    ):
        change(next(model.parameters()))
        with pytest.raises(ShoalError, match=r"parameters changed outside optimizer.step\(\)"):
            installed.check()
        installed.record()  # what an install after step() does
    for _ in range(2 * guard.MAX_BACKWARDS_WITHOUT_STEP):  # evaluation forwards in train mode: no backward
        installed.check()
    installed.check()
    model(torch.zeros(3, 4)).sum().backward()  # the first backward; then accumulation, never a step
    installed.check()
    with pytest.raises(ShoalError, match=r"256 backward passes ran without optimizer\.step\(\)"):
        for _ in range(guard.MAX_BACKWARDS_WITHOUT_STEP):
            model(torch.zeros(3, 4)).sum().backward()
            installed.check()
    installed.stepped()
    installed.check()  # step() handed them over


def test_the_prepared_model_pickles_and_loads_as_a_plain_module():
    model = torch.nn.Linear(3, 2)
    strategy = ParameterServer()
    model, optimizer = strategy.prepare(model)  # no optimizer: nothing is connected
    assert optimizer is None
    with pytest.raises(ShoalError, match=r"call strategy.prepare_optimizer\(optimizer\)"):
        model(torch.zeros(1, 3))  # a training forward
    with torch.no_grad():
        model(torch.zeros(1, 3))  # evaluation is fine
    loaded = pickle.loads(pickle.dumps(model))
    torch.testing.assert_close(loaded(torch.ones(1, 3)), model.eval()(torch.ones(1, 3)))
    loaded.train()(torch.ones(1, 3))  # the loaded hook has no servers to ask
    strategy.close()


def test_options_every_strategy_has():
    with pytest.raises(ConfigError, match="no process holds the averaged gradient") as err:
        ParameterServer(clip_norm=1.0)
    assert err.value.key == "clip_norm"
    with pytest.raises(ConfigError, match="grad_accum"):
        ParameterServer(grad_accum=0)
    strategy = ParameterServer(grad_accum=4)
    assert strategy.grad_accum == 4
    with strategy.no_sync():
        pass
    with pytest.raises(ShoalError, match="no process holds the averaged gradient"):
        strategy.clip_grad_norm_(1.0)
    with pytest.raises(ShoalError, match=r"call strategy.prepare\(model\) before"):
        strategy.prepare_optimizer(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1))


def test_optimizer_state_by_name_and_back():
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1))
    opt = torch.optim.AdamW([{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 0.1}])
    model(torch.ones(4, 2)).sum().backward()
    opt.step()
    named = checkpoint.by_name(model, opt, opt.state_dict())
    assert [g["params"] for g in named["param_groups"]] == [["0.weight", "0.bias"], ["2.weight", "2.bias"]]
    assert set(named["state"]["2.bias"]) == {"step", "exp_avg", "exp_avg_sq"}
    back = checkpoint.by_index(model, opt, named)
    assert back["param_groups"] == opt.state_dict()["param_groups"]
    with pytest.raises(ShoalError, match=r"names parameter '9\.weight'"):
        checkpoint.by_index(model, opt, {"state": {"9.weight": {}}, "param_groups": []})
