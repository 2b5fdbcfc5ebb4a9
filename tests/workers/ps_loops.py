"""Parameter-server loops written the way pytorch/examples and the DDP tutorials write
theirs (a plain torch loop; only the constructor and `prepare` are shoal's), run on
each rank by `tests.helpers.ps.run_ps_job(..., ps_loops.<fn>, ARGS)`.

- `train`: mnist's Adadelta + StepLR (or RMSprop), optionally `grad_accum`; returns the
  final parameters and `strategy.full_state_dict(model, optimizer)`.
- `snapshot`: minGPT's snapshot/resume: AdamW, `torch.save` of `model.state_dict()` and
  `optimizer.state_dict()` by rank 0 at step `save_at` (and of `strategy.full_state_dict`),
  or a fresh job that loads the snapshot before `prepare` (or the full state dict after
  it) and goes on; also `torch.save(model)` of the prepared model.
- `hand_update`: word_language_model's update, `p.data.add_(p.grad, alpha=-lr)`, no step().
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

import shoal
from tests.workers.ps_tasks import equiv_batch, equiv_model


def make(name: str, params):
    """The optimizer and LR schedule each script builds."""
    if name == "adadelta":  # pytorch/examples mnist
        opt = torch.optim.Adadelta(params, lr=1.0)
        return opt, torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7)
    if name == "rmsprop":
        opt = torch.optim.RMSprop(params, lr=0.01, momentum=0.5, centered=True, weight_decay=1e-3)
        return opt, torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    opt = torch.optim.AdamW(params, lr=0.01, weight_decay=0.1)  # minGPT
    return opt, None


def micro_batch(step: int, micro: int, accum: int, rank: int, world: int):
    """Micro-batch `micro` of step `step` on `rank`; one process takes all of them for that step."""
    return equiv_batch(step * accum + micro, rank, world)


def reference(name: str, steps: int, world: int, accum: int = 1, start: int = 0, model=None, opt=None, sched=None):
    """One process, the combined batch of every worker and micro-batch, the same optimizer and schedule."""
    if model is None:
        model = equiv_model()
        opt, sched = make(name, model.parameters())
    loss_fn = nn.CrossEntropyLoss()
    for step in range(start, steps):
        xs, ys = zip(*(micro_batch(step, m, accum, r, world) for r in range(world) for m in range(accum)), strict=True)
        loss_fn(model(torch.cat(xs)), torch.cat(ys)).backward()
        opt.step()
        opt.zero_grad()
        if sched is not None:
            sched.step()
    return model, opt


def _lists(tensors: dict) -> dict:
    return {k: v.tolist() for k, v in tensors.items()}


def train(rank: int, world: int, args: dict) -> dict:
    accum = args.get("grad_accum", 1)
    strategy = shoal.ParameterServer(**args["strategy"], grad_accum=accum)
    try:
        model = equiv_model()
        model, _ = strategy.prepare(model)  # the optimizer after wrapping, as the tutorials build it
        optimizer, scheduler = make(args["optim"], model.parameters())
        optimizer = strategy.prepare_optimizer(optimizer)
        loss_fn = nn.CrossEntropyLoss()
        model.train()
        for step in range(args["steps"]):
            for m in range(accum):
                x, y = micro_batch(step, m, accum, rank, world)
                with strategy.no_sync() if m < accum - 1 else contextlib.nullcontext():
                    loss = loss_fn(model(x), y)
                    loss.backward()
                optimizer.step()
                optimizer.zero_grad()
            scheduler.step()
        full = strategy.full_state_dict(model, optimizer)
        return {
            "params": _lists(dict(model.named_parameters())),
            "full_model": _lists(full["model"]),
            "full_state": {n: _lists(s) for n, s in full["optimizer"]["state"].items()},
            "full_groups": [g["params"] for g in full["optimizer"]["param_groups"]],
        }
    finally:
        strategy.close()


def snapshot(rank: int, world: int, args: dict) -> dict:
    strategy = shoal.ParameterServer(**args["strategy"])
    try:
        model = equiv_model()
        optimizer, _ = make("adamw", model.parameters())
        start = 0
        if args.get("resume"):  # minGPT's _load_snapshot, before the model is wrapped
            snap = torch.load(args["resume"], map_location="cpu")
            model.load_state_dict(snap["MODEL_STATE"])
            optimizer.load_state_dict(snap["OPTIMIZER_STATE"])
            start = snap["STEPS_RUN"]
        model, optimizer = strategy.prepare(model, optimizer)
        if args.get("resume_full"):  # shoal's own: by parameter names, loaded after prepare
            strategy.load_full_state_dict(model, torch.load(args["resume_full"]), optimizer)
            start = args["start"]
        loss_fn = nn.CrossEntropyLoss()
        out: dict = {}
        for step in range(start, args["steps"]):
            x, y = equiv_batch(step, rank, world)
            loss_fn(model(x), y).backward()
            optimizer.step()
            optimizer.zero_grad()
            if step + 1 == args.get("save_at") and rank == 0:  # minGPT's _save_snapshot, rank 0 only
                snap = {
                    "MODEL_STATE": model.state_dict(),
                    "OPTIMIZER_STATE": optimizer.state_dict(),
                    "STEPS_RUN": step + 1,
                }
                torch.save(snap, args["path"])
                out["saved_moments"] = sum(len(s) for s in snap["OPTIMIZER_STATE"]["state"].values())
            if step + 1 == args.get("save_at"):
                full = strategy.full_state_dict(model, optimizer)  # collective
                if rank == 0:
                    torch.save(full, args["full_path"])
        if rank == 0 and args.get("whole_model"):
            torch.save(model, args["whole_model"])  # the prepared model itself
            loaded = torch.load(args["whole_model"], weights_only=False)
            x, _ = equiv_batch(0, 0, 1)
            out["whole_model_same"] = bool(torch.equal(loaded(x), model(x)))
        out["params"] = _lists(dict(model.named_parameters()))
        return out
    finally:
        strategy.close()


def hand_update(rank: int, world: int, args: dict) -> dict:
    strategy = shoal.ParameterServer(**args["strategy"])
    try:
        model = equiv_model()
        model, _ = strategy.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
        loss_fn = nn.CrossEntropyLoss()
        lr = 0.1
        for step in range(args["steps"]):
            x, y = equiv_batch(step, rank, world)
            model.zero_grad()
            loss_fn(model(x), y).backward()
            for p in model.parameters():
                p.data.add_(p.grad, alpha=-lr)
        return {"params": _lists(dict(model.named_parameters()))}
    finally:
        strategy.close()
