"""Run under `shoal run --rdzv-backend c10d`: STEPS all-reduces, one every DELAY seconds, each
printed; rank 0 ends with the world size and torch's restart count."""

import os
import sys
import time

import torch
import torch.distributed as dist

import shoal


def main(steps: int, delay: float) -> None:
    rt = shoal.init()
    for step in range(steps):
        total = torch.ones(1)
        dist.all_reduce(total)
        print(f"step {step} of {int(total.item())} ranks", flush=True)
        time.sleep(delay)
    if rt.is_main:
        print(f"done: world {rt.world_size}, restart {os.environ.get('TORCHELASTIC_RESTART_COUNT')}", flush=True)
    shoal.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), float(sys.argv[2]))
