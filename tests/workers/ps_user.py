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
