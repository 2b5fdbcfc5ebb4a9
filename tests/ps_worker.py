"""A parameter-server worker for the tests: `python tests/ps_worker.py JSON`.

JSON keys: task ("equiv" | "digits" | "linear"), strategy (ParameterServer
kwargs), optim ("sgd" | "adam" | "adamw"), steps, out (an .npz path for the
final parameters and figures; rank 0 writes it), seed. Started by
tests/ps_procs.py with RANK/WORLD_SIZE/MASTER_* and the servers' env.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import torch
from torch import nn

import shoal
from shoal.errors import ShoalError


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


def main() -> int:
    args = json.loads(sys.argv[1])
    rt = shoal.init()
    strategy = shoal.ParameterServer(**args["strategy"])
    out: dict = {}
    try:
        if args["task"] == "equiv":
            model = equiv_model()
            opt = make_optimizer(args["optim"], model.parameters())
            model, opt = strategy.prepare(model, opt)
            sched = schedule(opt)
            loss_fn = nn.CrossEntropyLoss()
            for step in range(args["steps"]):
                x, y = equiv_batch(step, rt.rank, rt.world_size)
                loss_fn(model(x), y).backward()
                opt.step()
                opt.zero_grad()
                sched.step()
        elif args["task"] == "linear":
            # loss = sum(w * 1): every gradient is exactly 1, so a parameter moves by
            # lr per applied update; how often it moved tells which mode ran it
            torch.manual_seed(0)
            model = nn.Sequential(nn.Linear(4, 3, bias=False), nn.Linear(3, 2, bias=False))
            opt = torch.optim.SGD(model.parameters(), lr=0.01)
            model, opt = strategy.prepare(model, opt)
            for _ in range(args["steps"]):
                strategy.sync()
                sum(p.sum() for p in model.parameters()).backward()
                opt.step()
                opt.zero_grad()
        elif args["task"] == "digits":
            from shoal.data.digits import Digits
            from shoal.models.mlp import MLP

            torch.manual_seed(0)
            split = Digits(batch_size=32).load(seed=0)
            model = MLP(hidden=[64]).build(split.input_shape, split.num_classes)
            opt = torch.optim.SGD(model.parameters(), **args.get("sgd", {"lr": 0.05, "momentum": 0.9}))
            model, opt = strategy.prepare(model, opt)
            batches = strategy.loader(split.train, 32, seed=0).forever()
            loss_fn = nn.CrossEntropyLoss()
            overflow = lambda out, y: loss_fn(out, y) * 1e9  # noqa: E731  (an fp16 overflow on purpose)
            for step in range(args["steps"]):
                strategy.train_step(model, opt, overflow if step == args.get("overflow_at") else loss_fn, next(batches))
                out.update({f"m_{k}": v for k, v in strategy.step_metrics().items()})
            out.update(strategy.evaluate(model, split.test, loss_fn))
        strategy.sync()
        if rt.rank == 0 and args.get("out"):
            for n, p in model.named_parameters():
                out[n] = p.detach().numpy()
            np.savez(args["out"], **{k: np.asarray(v) for k, v in out.items()})
    except ShoalError as err:
        print(f"shoal: {err}", file=sys.stderr, flush=True)
        return 1
    finally:
        strategy.close()
        shoal.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
