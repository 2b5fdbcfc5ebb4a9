"""The training loop of `shoal train`, run by every worker process.

It knows only the strategy interface: the same loop serves data parallel,
parameter server and model-parallel strategies. One "step" is one optimizer
update, i.e. `grad_accum` micro-batches.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from torch import nn

from shoal import runtime
from shoal.train import checkpoint
from shoal.train.jobconfig import JobConfig
from shoal.train.metrics import MetricsWriter
from shoal.train.optim import build_optimizer, build_schedule


def loss_for(task: str):
    if task == "language_model":
        ce = nn.CrossEntropyLoss()
        return lambda logits, target: ce(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))
    return nn.CrossEntropyLoss()


class Trainer:
    def __init__(self, cfg: JobConfig, run_dir: Path):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.rt = runtime.current()

    def run(self) -> dict:
        cfg, rt = self.cfg, self.rt
        torch.manual_seed(cfg.train.seed)  # same initial parameters on every rank
        split = cfg.data.options.load(seed=cfg.train.seed)
        model = cfg.model.options.build(split.input_shape, split.num_classes)
        optimizer = build_optimizer(cfg.optimizer, model.parameters())
        strategy = cfg.strategy.options.build()
        x, y = split.train.tensors
        example = (x[: cfg.data.options.batch_size], y[: cfg.data.options.batch_size])  # e.g. to time a pipeline
        model, optimizer = strategy.prepare(model, optimizer, example=example)
        schedule = build_schedule(cfg.optimizer, optimizer, cfg.train.steps)
        loader = strategy.loader(split.train, cfg.data.options.batch_size, shuffle=True, seed=cfg.train.seed)
        loss_fn = loss_for(split.task)
        accum = strategy.grad_accum
        ckpt_root = self.run_dir / "checkpoints"

        step = 0
        resume_from = cfg.checkpoint.resume_from
        if resume_from:
            state = strategy.checkpoint_state(model, optimizer)
            extra = checkpoint.load(Path(resume_from), state)
            strategy.load_checkpoint_state(model, optimizer, state)
            step = int(extra["step"])
            loader.load_state_dict(extra["loader"])
            schedule.load_state_dict(extra["schedule"])
            strategy.load_state_dict({**extra.get("strategy", {}), **checkpoint.rank_tensors(state)})
            if "rng" in extra:
                checkpoint.set_rng_state(extra["rng"])

        metrics = MetricsWriter(self.run_dir, cfg.logging.tensorboard, append=bool(resume_from)) if rt.is_main else None
        if metrics and resume_from:
            metrics.log(step, kind="resume", checkpoint=str(resume_from))
        batches = loader.forever()
        model.train()
        window_loss = torch.zeros(2, dtype=torch.float64)  # loss sum, count
        window_start, window_steps = time.perf_counter(), 0
        samples_per_step = cfg.data.options.batch_size * strategy.data_world * accum
        run_start, run_start_step = time.perf_counter(), step
        last_eval: dict = {}
        stopped = False

        while step < cfg.train.steps:
            for _ in range(accum):
                loss = strategy.train_step(model, optimizer, loss_fn, next(batches))
                window_loss[0] += float(loss)
                window_loss[1] += 1
            schedule.step()
            step += 1
            window_steps += 1
            last = step == cfg.train.steps
            if step % cfg.train.log_every == 0 or last:
                strategy.all_reduce_sum(window_loss)
                elapsed = time.perf_counter() - window_start
                if metrics:
                    metrics.log(
                        step,
                        loss=window_loss[0].item() / max(1.0, window_loss[1].item()),
                        samples_per_s=samples_per_step * window_steps / max(elapsed, 1e-9),
                        lr=schedule.get_last_lr()[0],
                        **strategy.step_metrics(),
                    )
                window_loss.zero_()
                window_start, window_steps = time.perf_counter(), 0
            if (cfg.train.eval_every and step % cfg.train.eval_every == 0) or last:
                last_eval = strategy.evaluate(model, split.test, loss_fn)
                if metrics:
                    metrics.log(step, kind="eval", **last_eval)
            stop_now = cfg.train.stop_at and step == cfg.train.stop_at and not last
            if (cfg.checkpoint.every and step % cfg.checkpoint.every == 0) or last or stop_now:
                own = strategy.state_dict()
                tensors = {k: v for k, v in own.items() if isinstance(v, torch.Tensor)}
                extra = {
                    "step": step,
                    "loader": loader.state_dict(),
                    "schedule": schedule.state_dict(),
                    "strategy": {k: v for k, v in own.items() if k not in tensors},
                    "rng": checkpoint.rng_state(),
                }
                state = checkpoint.with_rank_tensors(strategy.checkpoint_state(model, optimizer), tensors)
                checkpoint.save(ckpt_root, step, state, extra, cfg.checkpoint.keep)
            if stop_now:
                stopped = True
                break

        wall = time.perf_counter() - run_start
        summary = {
            "step": step,
            "steps": cfg.train.steps,
            "stopped_early": stopped,
            "samples_per_s": samples_per_step * (step - run_start_step) / max(wall, 1e-9),
            "wall_s": wall,
            "world_size": rt.world_size,
            **last_eval,
        }
        if metrics:
            metrics.close()
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        strategy.close()
        return summary
