"""Models that are not an `nn.Sequential` (mnist's Net, a minGPT-style GPT) split by torch's tracer
over 2 pipeline ranks equal one process with the whole batch: losses, parameters, optimizer state,
global-norm clipping over both stages, and the script's own eval loop on every rank."""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

from tests.helpers.ranks import run_workers
from tests.workers import pipe_models as w

TOL: dict[str, Any] = {"atol": 1e-5, "rtol": 1e-5}


def full_reference(model, optimizer):
    opts = StateDictOptions(full_state_dict=True)
    return {"model": model.state_dict(), "optimizer": get_optimizer_state_dict(model, optimizer, options=opts)}


def assert_same_state(got, want):
    assert got["model"].keys() == want["model"].keys()
    for name, value in want["model"].items():
        torch.testing.assert_close(got["model"][name], value, **TOL, msg=name)
    assert got["optimizer"]["state"].keys() == want["optimizer"]["state"].keys()
    for name, state in want["optimizer"]["state"].items():
        for key, value in state.items():
            torch.testing.assert_close(torch.as_tensor(got["optimizer"]["state"][name][key]), value, **TOL, msg=name)
    assert [g["params"] for g in got["optimizer"]["param_groups"]] == [
        g["params"] for g in want["optimizer"]["param_groups"]
    ]


def test_mnist_net_trains_and_tests_like_one_process(tmp_path):
    results = run_workers(w.train_net, (str(tmp_path),), world=2, timeout_s=240)
    want = w.reference_net()
    for rank, got in enumerate(results):
        torch.testing.assert_close(got["losses"], want["losses"], **TOL)
        # the script's own test(): the output on every rank, whatever stage computed it
        torch.testing.assert_close(torch.tensor(got["test"]["outputs"]), torch.tensor(want["test"]["outputs"]), **TOL)
        assert got["test"]["correct"] == want["test"]["correct"]
        out, y = torch.tensor(want["test"]["outputs"][:10]), w.test_batches()[0][1]  # strategy.evaluate still works
        assert abs(got["evaluate"]["eval_loss"] - torch.nn.functional.nll_loss(out, y).item()) < 1e-5
        assert got["evaluate"]["eval_accuracy"] == (out.argmax(1) == y).sum().item() / len(y)
        full = torch.load(tmp_path / f"net.rank{rank}.pt", weights_only=True)
        assert_same_state(full, full_reference(want["model"], want["optimizer"]))
        plain = w.Net()
        plain.load_state_dict(full["model"])  # the full state loads into the user's own model
    torch.manual_seed(0)
    with_dropout = torch.tensor(w.mnist_test(w.Net(), w.test_batches())["outputs"])
    for got in results:  # eval mode switches the traced dropouts off
        torch.testing.assert_close(torch.tensor(got["dropout"]["outputs"]), with_dropout, **TOL)
    for got in results:  # a sampler by world rank: one sentence, not x and y from different batches
        assert "different batches" in got["wrong_sampler"] and "strategy.sampler" in got["wrong_sampler"]
    assert results[0]["mine"] == ["conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias"]
    assert results[1]["mine"] == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]


def test_gpt_with_accumulation_and_user_clipping_equals_one_process(tmp_path):
    results = run_workers(w.train_gpt, (str(tmp_path),), world=2, timeout_s=240)
    want = w.reference_gpt()
    for rank, got in enumerate(results):
        per_update = [sum(got["losses"][i : i + 2]) / 2 for i in range(0, len(got["losses"]), 2)]
        torch.testing.assert_close(per_update, want["losses"], **TOL)
        full = torch.load(tmp_path / f"gpt.rank{rank}.pt", weights_only=True)
        assert_same_state(full, full_reference(want["model"], want["optimizer"]))
        assert got["reloaded_equal"]
        torch.testing.assert_close(torch.tensor(got["eval"]), torch.tensor(want["eval"]), **TOL)
        assert abs(got["eval_loss"] - want["eval_loss"]) < 1e-5
