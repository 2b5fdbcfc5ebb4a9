"""Run under `shoal run --servers S`: train `tests.workers.ps_tasks`' equivalence task
under BSP and write rank 0's final parameters (JSON) for comparison with one process."""

import json
import sys
from pathlib import Path

import shoal
from tests.workers import ps_tasks

STEPS = 6


def main(out: str, servers: int) -> None:
    rt = shoal.init()
    # 0.weight is 64x16 floats = 4 KiB: with 1 KiB chunks it is split over the servers
    strategy = {"consistency": "bsp", "servers": servers, "chunk_bytes": 1024}
    args = {"task": "equiv", "optim": "sgd", "steps": STEPS, "params": True, "strategy": strategy}
    result = ps_tasks.run(rt.rank, rt.world_size, args)
    if rt.is_main:
        Path(out).write_text(json.dumps(result))
    shoal.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
