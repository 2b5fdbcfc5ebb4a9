"""Going on after a restart from what the parameter servers hold, not from a recovery point.

Why: under the parameter server the servers hold the parameters and the
optimizer state and outlive the workers' restarts; each worker's clock on the
servers (its pushes applied) is its step. A restarted worker that resumed
from a recovery point would be behind the servers (and push clocks again), so
instead everything a worker holds is derived from the step the servers give:

- the data position: `step x grad_accum` micro-batches into the shuffled
  stream (the loader's epoch and batch);
- the LR schedule: stepped `step` times from the start, the same float
  operations as the uninterrupted run;
- random numbers (dropout): seeded at every step from (seed, rank, step),
  under the parameter server always, so a step draws the same numbers whether
  or not the worker was restarted before it.

So under BSP the run is bit-identical to the fault-free one, and under
ASP/SSP no push is applied twice. What is not kept: a compressor's error
feedback (it restarts at zero).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch.distributed as dist

from shoal.train.recovery import all_ranks_int


def on_servers(strategy: Any) -> bool:
    """Whether `strategy`'s servers hold the run's state across a worker restart."""
    return bool(getattr(strategy, "resumes_on_servers", False))


def step_seed(seed: int, rank: int, step: int) -> int:
    """The random seed of `rank`'s step `step` (distinct per rank and step, the same on every run)."""
    return (seed * 1_000_003 + rank) * 1_000_003 + step


def go_on(strategy: Any, loader: Any, schedule: Any, base: int) -> int:
    """Put the loader and the schedule where this worker's clock on the servers says; the step.

    `base` is the step the servers' clock 0 stands for (the checkpoint the run resumed from, or 0).
    """
    step = base + int(strategy.clock)
    consumed = step * strategy.grad_accum
    per_epoch = len(loader)
    loader.load_state_dict({"epoch": consumed // per_epoch, "index": consumed % per_epoch})
    with warnings.catch_warnings():  # torch warns of a schedule stepped before its optimizer: here on purpose
        warnings.simplefilter("ignore")
        for _ in range(step):
            schedule.step()
    return step


def rejoined(strategy: Any) -> bool:
    """Collective: whether the servers held pushes of any worker when it joined (a restart, then).

    TORCHELASTIC_RESTART_COUNT misses two restarts: a machine's launcher started again
    by its supervisor counts from 0, and an agent that restarts its healthy workers into
    a round another machine entered (`shoal.launch.rounds`) does not count it; after
    both, every worker says 0, but the servers still hold the job's clocks."""
    return all_ranks_int(int(strategy.clock), dist.ReduceOp.MAX) > 0


def newest_of_all(step: int) -> int:
    """Collective: the largest resumed step of any worker (its own without a process group).

    Steps up to it were passed by some worker before the restart, so no worker
    logs, evaluates or saves at them (those are collective); under SSP the
    workers resume up to `staleness` steps apart."""
    return all_ranks_int(step, dist.ReduceOp.MAX)
