"""An unmodified torchrun script (it never imports shoal): DDP on a 6.3M-parameter MLP.

    torchrun --standalone --nproc-per-node 2 benchmarks/scripts/torchrun_ddp.py OUT.json
    shoal run -n 2 benchmarks/scripts/torchrun_ddp.py OUT.json

Rank 0 writes its steps/s (after warm-up) to OUT.json; `benchmarks/launcher.py` compares the launchers.
"""

import json
import os
import sys
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: N817  (the tutorials' name)

WARMUP, STEPS, BATCH = 3, 20, 64


def main() -> None:
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = DDP(nn.Sequential(nn.Linear(1024, 2048), nn.ReLU(), nn.Linear(2048, 2048), nn.ReLU(), nn.Linear(2048, 10)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(BATCH, 1024), torch.randint(0, 10, (BATCH,))
    for i in range(WARMUP + STEPS):
        if i == WARMUP:
            dist.barrier()
            start = time.perf_counter()
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    dist.barrier()
    seconds = time.perf_counter() - start
    if dist.get_rank() == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(
                {
                    "steps_per_s": STEPS / seconds,
                    "threads": torch.get_num_threads(),
                    "omp": os.environ.get("OMP_NUM_THREADS"),
                },
                f,
            )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
