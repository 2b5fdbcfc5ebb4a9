"""One parameter-server worker that can be restarted alone (tests/multiproc/test_ps_recovery.py):

    python -m tests.workers.ps_rejoin RANK WORLD STEPS OUT_DIR

No process group (a parameter-server worker needs none, and a restarted one
could not join the old group): the runtime is set from the arguments. It
joins (or rejoins) the servers, goes on from the clock they hold for it to
STEPS, sleeping 50 ms a step, and writes {"pid", "joined_at", "gaps"} (wall
seconds between consecutive steps) to OUT_DIR/rank<RANK>.json.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import time
from pathlib import Path

import torch

import shoal
from shoal import runtime
from shoal.strategies.optimizer import count_steps_from
from tests.workers.ps_tasks import linear_model


def main(rank: int, world: int, steps: int, out_dir: Path) -> None:
    runtime._current = runtime.Runtime(rank, world, rank, world, "gloo", torch.device("cpu"))  # no process group
    torch.set_num_threads(1)
    strategy = shoal.ParameterServer(consistency="ssp", staleness=2, servers=1, timeout_s=120)
    model = linear_model()
    model, opt = strategy.prepare(model, torch.optim.SGD(model.parameters(), lr=0.01))
    joined_at = strategy.clock
    count_steps_from(opt, joined_at)  # the fault schedule's step numbers go on
    times = []
    for _ in range(joined_at, steps):
        time.sleep(0.05)
        sum(p.sum() for p in model.parameters()).backward()
        opt.step()
        opt.zero_grad()
        times.append(time.monotonic())
    strategy.close()
    gaps = [b - a for a, b in itertools.pairwise(times)]
    out = {"pid": os.getpid(), "joined_at": joined_at, "gaps": gaps}
    (out_dir / f"rank{rank}.json").write_text(json.dumps(out))


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]))
