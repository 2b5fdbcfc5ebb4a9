"""A parameter-server loop as a user writes it, run on each rank by
`tests.helpers.ps.run_ps_job(..., ps_user.train, ARGS)`: `backward`, `step`,
`zero_grad`, the LR schedule, and `model.state_dict()` read right after the
last `optimizer.step()`, with no forward pass and no `strategy.sync()` in
between.

ARGS: strategy (ParameterServer kwargs), optim, steps, turns (the ranks train
one after the other, rank 0 first, instead of side by side). Each rank
returns the state dict before its last step, right after it, and after a
fresh pull (`strategy.refresh()`).
"""

from __future__ import annotations

import torch.distributed as dist
from torch import nn

import shoal
from tests.workers.ps_tasks import equiv_batch, equiv_model, make_optimizer, schedule


def _state(model: nn.Module) -> dict[str, list]:
    return {k: v.detach().clone().tolist() for k, v in model.state_dict().items()}


def train(rank: int, world: int, args: dict) -> dict:
    strategy = shoal.ParameterServer(**args["strategy"])
    try:
        model = equiv_model()
        optimizer = make_optimizer(args["optim"], model.parameters())
        model, optimizer = strategy.prepare(model, optimizer)
        scheduler = schedule(optimizer)
        loss_fn = nn.CrossEntropyLoss()
        turns = args.get("turns", False)
        for _ in range(rank if turns else 0):  # wait for the ranks before this one to finish
            dist.barrier()
        out: dict = {}
        for step in range(args["steps"]):
            x, y = equiv_batch(step, rank, world)
            loss_fn(model(x), y).backward()
            if step == args["steps"] - 1:
                out["before_last"] = _state(model)
            optimizer.step()
            optimizer.zero_grad()
            scheduler.step()
        out["after_step"] = _state(model)  # what a user saves
        strategy.refresh()
        out["fresh"] = _state(model)
        for _ in range(world - 1 - rank if turns else 0):
            dist.barrier()
        return out
    finally:
        strategy.close()


def evaluate(rank: int, world: int, args: dict) -> dict:
    """Train side by side, then `strategy.evaluate`, then score the whole test set by hand."""
    import torch

    from shoal.data.digits import Digits

    strategy = shoal.ParameterServer(**args["strategy"])
    try:
        torch.manual_seed(0)
        data = Digits().load(seed=0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
        model, optimizer = strategy.prepare(model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9))
        loss_fn = nn.CrossEntropyLoss()
        batches = strategy.loader(data.train, batch_size=32, shuffle=True, seed=0).forever()
        for _ in range(args["steps"]):
            x, y = next(batches)
            loss_fn(model(x), y).backward()
            optimizer.step()
            optimizer.zero_grad()
        result = strategy.evaluate(model, data.test, loss_fn)
        x, y = data.test.tensors
        with torch.no_grad():
            by_hand = (model(x).argmax(-1) == y).float().mean().item()
        return {"evaluate": result["eval_accuracy"], "by_hand": by_hand, "state": _state(model)}
    finally:
        strategy.close()
