"""Run on 2 ranks by tests/multiproc/test_step_options.py: one strategy's step
options (grad_accum, clip_norm, no_sync, clip_grad_norm_, the optimizer built
after prepare) in a user's own loop, written as the DDP tutorials write it.
Returns each scenario's final parameters (whole tensors) for comparison with
one process on the combined batch (`reference`)."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor

import shoal
from shoal.errors import ShoalError

STEPS = 3
BATCH = 8  # per data-parallel rank and micro-step
CLIP = 0.05
STRATEGIES = {  # name: (constructor, data-parallel ranks out of 2)
    "data_parallel": (shoal.DataParallel, 2),
    "sharded": (shoal.ShardedDataParallel, 2),
    "tensor_parallel_dp2": (lambda **kw: shoal.TensorParallel(dp=2, **kw), 2),
    "tensor_parallel_tp2": (lambda **kw: shoal.TensorParallel(dp=1, **kw), 1),
}


def build() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 16), nn.Tanh(), nn.Linear(16, 4)
    )


def sgd(params) -> torch.optim.SGD:
    return torch.optim.SGD(params, lr=0.1, momentum=0.9)


def batch(i: int, rank: int, ranks: int, size: int = BATCH) -> tuple[torch.Tensor, torch.Tensor]:
    """This data rank's slice of global micro-batch i (global = size x ranks samples)."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(256, 16, generator=g), torch.randint(0, 4, (256,), generator=g)
    start = i * size * ranks + rank * size
    return x[start : start + size], y[start : start + size]


def reference(ranks: int, micro: int, clip: float | None) -> tuple[dict[str, torch.Tensor], list[float]]:
    """Plain PyTorch, one process: each step on the micro x ranks global batches combined."""
    model = build()
    opt = sgd(model.parameters())
    norms = []
    for step in range(STEPS):
        parts = [batch(step * micro + i, 0, 1, BATCH * ranks) for i in range(micro)]
        x, y = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        nn.functional.cross_entropy(model(x), y).backward()
        if clip is not None:
            norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip)))
        opt.step()
        opt.zero_grad()
    return model.state_dict(), norms


def whole(strategy, model: nn.Module) -> dict[str, list]:
    return {
        n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().tolist()
        for n, p in strategy.unwrap(model).named_parameters()
    }


def train_all(rank: int, world: int, name: str) -> dict:
    """Every scenario of one strategy; {scenario: parameters, or the error sentence}."""
    make, _ = STRATEGIES[name]
    out = {}

    # grad_accum=2: step() after every micro-batch, applied every second call.
    strategy = make(grad_accum=2)
    m = build()
    model, opt = strategy.prepare(m, sgd(m.parameters()))
    out["accum"] = _loop(strategy, model, opt, micro=2, rank=strategy.data_rank, ranks=strategy.data_world)

    # clip_norm: the optimizer given to prepare.
    strategy = make(clip_norm=CLIP)
    m = build()
    model, opt = strategy.prepare(m, sgd(m.parameters()))
    out["clip"] = _loop(strategy, model, opt, micro=1, rank=strategy.data_rank, ranks=strategy.data_world)

    # The DDP tutorial's order: wrap, then build the optimizer; clip by hand with the strategy's norm.
    strategy = make()
    model, nothing = strategy.prepare(build())
    assert nothing is None
    opt = strategy.prepare_optimizer(sgd(model.parameters()))
    norms = []
    for step in range(STEPS):
        x, y = batch(step, strategy.data_rank, strategy.data_world)
        nn.functional.cross_entropy(model(x), y).backward()
        norms.append(float(strategy.clip_grad_norm_(CLIP)))
        opt.step()
        opt.zero_grad()
    out["by_hand"] = {"params": whole(strategy, model), "norms": norms}

    # no_sync: k-1 backward passes inside it, the last outside, the loss scaled by 1/k (as DDP users do).
    strategy = make()
    model, _ = strategy.prepare(build())
    opt = strategy.prepare_optimizer(sgd(model.parameters()))
    held = []
    for step in range(STEPS):
        x, y = batch(2 * step, strategy.data_rank, strategy.data_world)
        with strategy.no_sync():
            (nn.functional.cross_entropy(model(x), y) / 2).backward()
        held.append(_held_back(model))
        x, y = batch(2 * step + 1, strategy.data_rank, strategy.data_world)
        (nn.functional.cross_entropy(model(x), y) / 2).backward()
        opt.step()
        opt.zero_grad()
    out["no_sync"] = {"params": whole(strategy, model), "held": held}

    # A plain optimizer, never prepared: trains right where the backward averages, else one sentence.
    strategy = make()
    model, _ = strategy.prepare(build())
    out["plain"] = _loop_or_error(strategy, model, sgd(model.parameters()))

    # The porting mistake: the optimizer built before prepare(model) and not given to it.
    strategy = make()
    m = build()
    stale = sgd(m.parameters())
    model, _ = strategy.prepare(m)
    out["stale"] = _loop_or_error(strategy, model, stale)

    # A figure each rank takes alone, made the same on every rank (the data-parallel ranks' mean).
    out["mean_over_ranks"] = strategy.mean_over_ranks(float(strategy.data_rank))
    return out


def _loop_or_error(strategy, model, opt) -> dict[str, list] | str:
    try:
        return _loop(strategy, model, opt, micro=1, rank=strategy.data_rank, ranks=strategy.data_world)
    except ShoalError as err:
        return str(err)


def _loop(strategy, model, opt, micro: int, rank: int, ranks: int) -> dict[str, list]:
    for i in range(STEPS * micro):
        x, y = batch(i, rank, ranks)
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
    return whole(strategy, model)


def _held_back(model: nn.Module) -> float | None:
    """What a backward under no_sync left in the first weight's `.grad`: its sum (this rank's
    own gradient if nothing was averaged), or None (FSDP2 keeps unreduced gradients elsewhere)."""
    grad = next(model.parameters()).grad
    if grad is None:
        return None
    return float((grad.to_local() if isinstance(grad, DTensor) else grad).sum())
