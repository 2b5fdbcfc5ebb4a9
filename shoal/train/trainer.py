"""The training loop of `shoal train`, run by every worker process.

It knows only the strategy interface: the same loop serves data parallel,
parameter server and model-parallel strategies. One "step" is one optimizer
update, i.e. `strategy.grad_accum` micro-batches. The loop decides nothing
itself: it calls named parts (`train_step`, `log`, `evaluate`, the
`Checkpointer`), each of which knows its own cadence.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from shoal import runtime
from shoal.strategies.base import LossFn, Strategy
from shoal.strategies.optimizer import count_steps_from
from shoal.train import checkpoint, rejoin
from shoal.train.checkpoint import Checkpointer
from shoal.train.jobconfig import JobConfig
from shoal.train.metrics import MetricsWriter, StepLog
from shoal.train.optim import build_optimizer, build_schedule
from shoal.train.recovery import ModelState, RecoveryPoints, recovery_root, restarted
from shoal.train.rng import RNGState


def loss_for(task: str) -> LossFn:
    """Cross-entropy over classes, or over the tokens of a language model."""
    if task == "language_model":
        ce = nn.CrossEntropyLoss()
        return lambda logits, target: ce(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))
    return nn.CrossEntropyLoss()


class Trainer:
    """One worker's part of a job: built from the config, then `run()`."""

    def __init__(self, cfg: JobConfig, run_dir: Path) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.rt = runtime.current()
        self.batch_size: int = cfg.data.options.batch_size
        torch.manual_seed(cfg.train.seed)  # same initial parameters on every rank
        self.data = cfg.data.options.load(seed=cfg.train.seed)
        self.strategy: Strategy = cfg.strategy.options.build()
        self.model, self.optimizer = self._prepare()
        self.schedule = build_schedule(cfg.optimizer, self.optimizer, cfg.train.steps)
        self.loader = self.strategy.loader(self.data.train, self.batch_size, shuffle=True, seed=cfg.train.seed)
        self.batches = self.loader.forever()
        self.loss_fn = loss_for(self.data.task)
        shared = ModelState(self.strategy, self.model, self.optimizer)
        parts = {"strategy": self.strategy, "loader": self.loader, "schedule": self.schedule, "rng": RNGState()}
        self.checkpointer = Checkpointer(
            self.run_dir / "checkpoints",
            cfg.checkpoint,
            shared=shared,
            parts=parts,
            last_step=cfg.train.steps,
            stop_at=cfg.train.stop_at,
        )
        # Under the parameter server the servers hold the state across restarts (`rejoin`): no recovery points.
        self.on_servers = rejoin.on_servers(self.strategy)
        every = 0 if self.on_servers else cfg.checkpoint.recovery_every
        self.recovery = RecoveryPoints(recovery_root(self.run_dir) or self.run_dir, every, shared=shared, parts=parts)
        self.step = 0
        self.passed = 0
        """After a rejoin: the newest step any worker had passed; no collective (log, eval, save) up to it."""
        self.stopped = False
        self.last_eval: dict[str, float] = {}
        self.writer: MetricsWriter | None = None  # the main rank's, opened by resume()
        self.steplog = StepLog(None, self.samples_per_step, self.strategy.all_reduce_sum)

    def _prepare(self) -> tuple[nn.Module, torch.optim.Optimizer]:
        model = self.cfg.model.options.build(self.data.input_shape, self.data.num_classes)
        optimizer = build_optimizer(self.cfg.optimizer, model.parameters())
        x, y = self.data.train.tensors
        example = (x[: self.batch_size], y[: self.batch_size])  # e.g. to balance a pipeline by time
        model, prepared = self.strategy.prepare(model, optimizer, example=example)
        assert prepared is not None  # prepare returns the optimizer it is given, prepared
        return model, prepared

    @property
    def samples_per_step(self) -> int:
        return self.batch_size * self.strategy.data_world * self.strategy.grad_accum

    def stop_early(self) -> bool:
        """At `train.stop_at` (before the last step): stop as if the job were interrupted."""
        stop_at = self.cfg.train.stop_at
        self.stopped = bool(stop_at) and self.step == stop_at and self.step < self.cfg.train.steps
        return self.stopped

    def run(self) -> dict[str, Any]:
        """Train to the last step (or `train.stop_at`), resuming first if asked; the run's summary."""
        first = self.resume()
        started = time.perf_counter()
        while self.step < self.cfg.train.steps:
            self.train_step()
            if self.step <= self.passed:
                continue  # another worker passed this step before the restart: its collectives are done
            self.log()
            self.evaluate()
            if not self.checkpointer.save(self.step) and self.step < self.cfg.train.steps:
                self.recovery.save(self.step)
            if self.stop_early():
                break
        return self.finish(first, time.perf_counter() - started)

    def resume(self) -> int:
        """Load the checkpoint the launcher chose, or after a restart the newer of the newest checkpoint and
        the newest recovery point every rank has; open the metrics; the step to start from."""
        resume_from = self.cfg.checkpoint.resume_from
        restart = restarted()
        if not restart and self.on_servers and rejoin.rejoined(self.strategy):
            restart = 1  # a restart no agent counted (a launcher started again, a membership change)
        recovered, where = 0, ""
        if restart and self.on_servers:
            base = checkpoint.verify(Path(resume_from)) if resume_from else 0
            recovered = rejoin.go_on(self.strategy, self.loader, self.schedule, base)
            where, resume_from = f"the parameter servers (clock {recovered - base})", ""
            self.passed = rejoin.newest_of_all(recovered)
        elif restart:
            saved = 0  # the step of the checkpoint a restart would load
            if checkpoint.list_checkpoints(self.run_dir / "checkpoints"):
                path, saved, _ = checkpoint.newest_valid_step(self.run_dir / "checkpoints")
                resume_from = str(path)
            elif resume_from:
                saved = checkpoint.verify(Path(resume_from))
            point = self.recovery.newest_common()
            if point > saved:
                recovered, resume_from = self.recovery.load(point), ""
                where = f"recovery point {recovered}"
        else:
            self.recovery.clear()
        self.step = recovered or self.checkpointer.resume(resume_from)
        count_steps_from(self.optimizer, self.step * self.strategy.grad_accum)
        if self.rt.is_main:
            self.writer = MetricsWriter(self.run_dir, self.cfg.logging.tensorboard, append=bool(resume_from or restart))
            if restart:
                where = where or resume_from or "the start"
                self.writer.log(self.step, "restart", restart=restart, resumed_from=where, unix_time=time.time())
                print(f"shoal: restart {restart}: resuming at step {self.step} from {where}", flush=True)
            elif resume_from:
                self.writer.log(self.step, "resume", checkpoint=str(resume_from))
        self.steplog.writer = self.writer
        self.model.train()
        return self.step

    def train_step(self) -> None:
        """One optimizer update: `grad_accum` micro-batches, then the LR schedule's step."""
        if self.on_servers:  # a restarted worker redraws a step's random numbers exactly (`rejoin`)
            torch.manual_seed(rejoin.step_seed(self.cfg.train.seed, self.rt.rank, self.step))
        for _ in range(self.strategy.grad_accum):
            loss = self.strategy.train_step(self.model, self.optimizer, self.loss_fn, next(self.batches))
            self.steplog.add(loss)
        self.schedule.step()
        self.step += 1
        self.steplog.step_done()

    def log(self) -> None:
        """Every `train.log_every` steps and at the last: the window's loss, throughput, LR, strategy figures."""
        if self.step % self.cfg.train.log_every and self.step != self.cfg.train.steps:
            return
        figures = self.strategy.step_metrics() if self.rt.is_main else {}
        self.steplog.write(self.step, lr=float(self.schedule.get_last_lr()[0]), **figures)

    def evaluate(self) -> None:
        """Every `train.eval_every` steps (0: never) and at the last: accuracy and loss on the held-out set."""
        every = self.cfg.train.eval_every
        if self.step != self.cfg.train.steps and not (every and self.step % every == 0):
            return
        self.last_eval = self.strategy.evaluate(self.model, self.data.test, self.loss_fn)
        if self.writer is not None:
            self.writer.log(self.step, "eval", **self.last_eval)

    def finish(self, first: int, wall: float) -> dict[str, Any]:
        """Write summary.json (main rank), close the strategy; the summary."""
        summary = {
            "step": self.step,
            "steps": self.cfg.train.steps,
            "stopped_early": self.stopped,
            "samples_per_s": self.samples_per_step * (self.step - first) / max(wall, 1e-9),
            "wall_s": wall,
            "world_size": self.rt.world_size,
            **self.last_eval,
        }
        if self.writer is not None:
            self.writer.close()
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        self.strategy.close()
        return summary
