"""Loops that touch gradients between backward and step, under the parameter server with pushes
during backward (`overlap`, small buckets so that parts really go out early), run on each rank by
`tests.helpers.ps.run_ps_job(..., ps_overlap.train, ARGS)`; and the one-process reference.

ARGS: loop, steps, strategy (ParameterServer kwargs). Loops:
- "plain": backward, step;
- "clip": torch's clip_grad_norm_ on this worker's gradient at every step;
- "clip_late": the same, from step 2 on only (after the run began to push during backward);
- "no_sync": two micro-batches, the first inside `strategy.no_sync()`, then one step;
- "by_hand": two backward passes, then one step, without `no_sync`.
"""

from __future__ import annotations

import torch
from torch import nn

import shoal
from shoal.errors import ShoalError
from tests.workers.ps_tasks import equiv_batch, equiv_model

CLIP = 0.05
MICRO = {"plain": 1, "clip": 1, "clip_late": 1, "no_sync": 2, "by_hand": 2}


def _optimizer(params) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.1, momentum=0.9)


def _clips(loop: str, step: int) -> bool:
    return loop == "clip" or (loop == "clip_late" and step >= 2)


def _backward(model: nn.Module, loop: str, step: int, rank: int, world: int) -> None:
    """This worker's gradient of `step`, as the loop builds it."""
    loss_fn = nn.CrossEntropyLoss()
    x, y = equiv_batch(step, rank, world, per_worker=8 * MICRO[loop])
    for m in range(MICRO[loop]):
        part = slice(8 * m, 8 * (m + 1))
        loss_fn(model(x[part]), y[part]).backward()


def train(rank: int, world: int, args: dict) -> dict:
    strategy = shoal.ParameterServer(**args["strategy"])
    loop = args["loop"]
    try:
        model = equiv_model()
        model, optimizer = strategy.prepare(model, _optimizer(model.parameters()))
        for step in range(args["steps"]):
            if loop == "no_sync":
                x, y = equiv_batch(step, rank, world, per_worker=16)
                with strategy.no_sync():
                    nn.CrossEntropyLoss()(model(x[:8]), y[:8]).backward()
                nn.CrossEntropyLoss()(model(x[8:]), y[8:]).backward()
            else:
                _backward(model, loop, step, rank, world)
            if _clips(loop, step):
                torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
            try:
                optimizer.step()
            except ShoalError as err:
                return {"error": str(err), "step": step}
            optimizer.zero_grad()
        overlap = strategy.session.overlap
        assert overlap is not None
        params = {n: p.detach().tolist() for n, p in model.named_parameters()}
        return {"params": params, "state": overlap.state.value, "parts": overlap.parts_sent}
    finally:
        strategy.close()


def reference(loop: str, steps: int, world: int) -> dict[str, torch.Tensor]:
    """One process: each worker's gradient as its loop builds it (clipped by itself), averaged, applied."""
    model = equiv_model()
    optimizer = _optimizer(model.parameters())
    for step in range(steps):
        grads = []
        for rank in range(world):
            optimizer.zero_grad()
            _backward(model, loop, step, rank, world)
            if _clips(loop, step):
                torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
            grads.append([p.grad.clone() for p in model.parameters()])  # pyright: ignore[reportOptionalMemberAccess]
        for p, *per_worker in zip(model.parameters(), *grads, strict=True):
            total = per_worker[0].clone()
            for g in per_worker[1:]:
                total.add_(g)
            p.grad = total.div_(world)
        optimizer.step()
    return {n: p.detach() for n, p in model.named_parameters()}
