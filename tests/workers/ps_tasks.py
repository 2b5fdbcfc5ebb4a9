"""Parameter-server worker tasks for the tests, run on each rank by
`tests.helpers.ps.run_ps_job(..., ps_tasks.run, ARGS)`.

ARGS keys: task ("equiv" | "digits" | "linear"), strategy (ParameterServer
kwargs), optim ("sgd" | "adam" | "adamw"), steps, params (rank 0 returns the
final parameters and figures), digests (equiv: every rank returns a hash of
its parameters after each step), seed. Also the single-process pieces the tests
compare with: the model, each rank's share of a global batch, the optimizers.
"""

from __future__ import annotations

import hashlib
import time
import warnings

import numpy as np
import torch
from torch import nn

import shoal
from shoal.strategies.optimizer import count_steps_from


def equiv_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 4))


def equiv_batch(step: int, rank: int, world: int, per_worker: int = 8):
    """Global batch `step`, split by rank: the same data a single process would take whole."""
    gen = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(per_worker * world, 16, generator=gen)
    y = torch.randint(0, 4, (per_worker * world,), generator=gen)
    sl = slice(rank * per_worker, (rank + 1) * per_worker)
    return x[sl], y[sl]


def make_optimizer(name: str, params):
    if name == "sgd":
        return torch.optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3)
    if name == "adam":
        return torch.optim.Adam(params, lr=0.01, betas=(0.9, 0.99), weight_decay=1e-3)
    return torch.optim.AdamW(params, lr=0.01, weight_decay=0.05)


def schedule(optimizer):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))


def single_process(optim: str, steps: int, world: int) -> dict[str, np.ndarray]:
    """One process, the combined batch of `world` workers, torch's optimizer and schedule."""
    model = equiv_model()
    opt = make_optimizer(optim, model.parameters())
    sched = schedule(opt)
    loss_fn = nn.CrossEntropyLoss()
    for step in range(steps):
        xs, ys = zip(*(equiv_batch(step, r, world) for r in range(world)), strict=True)
        loss_fn(model(torch.cat(xs)), torch.cat(ys)).backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    return {n: p.detach().numpy() for n, p in model.named_parameters()}


def linear_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3, bias=False), nn.Linear(3, 2, bias=False))


def _equiv(strategy, rank: int, world: int, args: dict, out: dict):
    model = equiv_model()
    opt = make_optimizer(args["optim"], model.parameters())
    model, opt = strategy.prepare(model, opt)
    sched = schedule(opt)
    start = strategy.clock  # 0, or, in a restarted worker, the pushes the servers hold from it: its step
    count_steps_from(opt, start)  # the fault schedule's step numbers go on
    with warnings.catch_warnings():  # torch warns of a schedule stepped before its optimizer: here on purpose
        warnings.simplefilter("ignore")
        for _ in range(start):
            sched.step()
    loss_fn = nn.CrossEntropyLoss()
    for step in range(start, args["steps"]):
        if step == args.get("await_backups_at"):
            await_backups()
        x, y = equiv_batch(step, rank, world)
        loss_fn(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        sched.step()
        if args.get("digests"):
            digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters()))
            out.setdefault("digests", []).append(digest.hexdigest())
    return model


def await_backups(timeout_s: float = 60.0) -> None:
    """Until every shard has a backup again (the launcher's replacement rejoined): so that a test's
    second failure meets a shard with two copies, however long the replacement took to start."""
    from shoal.ps import store as ps_store

    store, count = ps_store.connect_store()
    deadline = time.monotonic() + timeout_s
    while any(ps_store.ShardRecord.parse(store.get(ps_store.shard_key(i))).backup is None for i in range(count)):
        assert time.monotonic() < deadline, "no replacement became a backup"
        time.sleep(0.05)


def _linear(strategy, rank: int, world: int, args: dict, out: dict):
    # loss = sum(w * 1): every gradient is exactly 1, so a parameter moves by
    # lr per applied update; how often it moved tells which mode ran it
    model = linear_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    model, opt = strategy.prepare(model, opt)
    for _ in range(args["steps"]):
        strategy.sync()
        sum(p.sum() for p in model.parameters()).backward()
        opt.step()
        opt.zero_grad()
    return model


def _digits(strategy, rank: int, world: int, args: dict, out: dict):
    from shoal.data.digits import Digits
    from shoal.models.mlp import MLP

    torch.manual_seed(0)
    split = Digits(batch_size=32).load(seed=0)
    model = MLP(hidden=[64]).build(split.input_shape, split.num_classes)
    opt = torch.optim.SGD(model.parameters(), **args.get("sgd", {"lr": 0.05, "momentum": 0.9}))
    model, opt = strategy.prepare(model, opt)
    batches = strategy.loader(split.train, 32, seed=0).forever()
    loss_fn = nn.CrossEntropyLoss()

    def overflow(out, y):  # an fp16 overflow on purpose
        return loss_fn(out, y) * 1e9

    for step in range(args["steps"]):
        strategy.train_step(model, opt, overflow if step == args.get("overflow_at") else loss_fn, next(batches))
        out.update({f"m_{k}": v for k, v in strategy.step_metrics().items()})
    out.update(strategy.evaluate(model, split.test, loss_fn))
    return model


TASKS = {"equiv": _equiv, "linear": _linear, "digits": _digits}


def run(rank: int, world: int, args: dict) -> dict:
    """Train `args["task"]` with ParameterServer(**args["strategy"]); rank 0 returns the
    final parameters (and metrics) when `args["params"]`; every rank its wall time."""
    strategy = shoal.ParameterServer(**args["strategy"])
    out: dict = {}
    try:
        start = time.perf_counter()
        model = TASKS[args["task"]](strategy, rank, world, args, out)
        strategy.sync()
        out["wall_s"] = time.perf_counter() - start
        out["takeovers"] = strategy.session.client.takeovers  # replicated shards this worker saw change hands
        if rank == 0 and args.get("params"):
            out.update({n: p.detach().tolist() for n, p in model.named_parameters()})
    finally:
        strategy.close()
    return out
