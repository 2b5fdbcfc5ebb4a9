"""Run under `shoal run --servers 2`: train `tests.workers.ps_tasks`' equivalence task (BSP, Adam)
for STEPS steps; rank 0 writes its result (final parameters, the takeovers it saw) and each
shard's record in the job's store as it reads at the end (JSON)."""

import json
import sys
from pathlib import Path

import shoal
from shoal.ps import store as ps_store
from tests.workers import ps_tasks

STEPS = 40
ARGS = {
    "task": "equiv",
    "optim": "adam",
    "steps": STEPS,
    "params": True,
    # 1 KiB pieces: both shards hold part of every layer
    "strategy": {"consistency": "bsp", "servers": 2, "chunk_bytes": 1024},
}


def main(out: str) -> None:
    rt = shoal.init()
    result = ps_tasks.run(rt.rank, rt.world_size, ARGS)
    if rt.is_main:
        store, count = ps_store.connect_store(timeout_s=10)
        records = [ps_store.ShardRecord.parse(store.get(ps_store.shard_key(i))) for i in range(count)]
        result["records"] = [list(r) for r in records]
        Path(out).write_text(json.dumps(result))
    shoal.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
