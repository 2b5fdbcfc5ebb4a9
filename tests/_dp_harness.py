"""Start N real worker processes (gloo on loopback) for the multi-process tests.

Each worker runs `fn(rank, world, *args)` after `shoal.init()`, and returns a
JSON-able value; the harness collects them by rank or fails with the worker's
error. A deadline kills the workers (by their own pids) instead of hanging.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import time
import traceback

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, out_dir, fn, args):
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
    )
    import shoal

    path = os.path.join(out_dir, f"rank{rank}.json")
    try:
        shoal.init(backend="gloo", device="cpu", threads=1, timeout_s=120)
        result = {"ok": fn(rank, world, *args)}
    except BaseException:  # noqa: BLE001 - reported to the parent
        result = {"error": traceback.format_exc()}
    finally:
        shoal.shutdown()
    with open(path, "w") as f:
        json.dump(result, f)


def run_workers(fn, args=(), world: int = 2, timeout_s: float = 150.0) -> list:
    with tempfile.TemporaryDirectory() as out_dir:
        ctx = mp.start_processes(
            _entry, args=(world, free_port(), out_dir, fn, args), nprocs=world, join=False, start_method="spawn"
        )
        deadline = time.monotonic() + timeout_s
        try:
            while not ctx.join(timeout=1):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"workers still running after {timeout_s:.0f} s")
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
        results = []
        for rank in range(world):
            with open(os.path.join(out_dir, f"rank{rank}.json")) as f:
                res = json.load(f)
            if "error" in res:
                raise AssertionError(f"rank {rank} failed:\n{res['error']}")
            results.append(res["ok"])
        return results
