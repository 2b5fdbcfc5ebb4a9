"""Start a real parameter-server job for a test: S servers (through
`shoal.ps.servers.start_servers`, as the launcher does) and W workers running
tests/ps_worker.py; every process gets a deadline and is stopped by pid."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from shoal.launch.agent import free_port
from shoal.ps.servers import ServerGroup, start_servers

ROOT = Path(__file__).resolve().parent.parent
WORKER = str(Path(__file__).resolve().parent / "ps_worker.py")


@dataclass
class Result:
    codes: list[int]
    logs: list[str]
    server_codes: list[int]
    stats: list[dict]


def run_job(
    workers: int,
    servers: int,
    args: dict,
    timeout: float = 90,
    env: dict | None = None,
    keep: ServerGroup | None = None,
    before_stop=None,
) -> Result:
    """Run the job to the end; `before_stop(group)` runs while the servers are still up."""
    key = secrets.token_hex(16)
    group = start_servers(servers, key, timeout_s=30, extra_env={"PYTHONPATH": str(ROOT)})
    master = free_port()
    procs = []
    try:
        for rank in range(workers):
            wenv = {
                **os.environ,
                **group.env,
                **(env or {}),
                "PYTHONPATH": str(ROOT),
                "PYTHONUNBUFFERED": "1",
                "RANK": str(rank),
                "LOCAL_RANK": str(rank),
                "WORLD_SIZE": str(workers),
                "LOCAL_WORLD_SIZE": str(workers),
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(master),
                "SHOAL_THREADS": "1",
                "OMP_NUM_THREADS": "1",
            }
            procs.append(
                subprocess.Popen(
                    [sys.executable, WORKER, json.dumps(args)],
                    env=wenv,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                )
            )
        deadline = time.monotonic() + timeout
        logs = []
        for p in procs:
            try:
                out, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                out, _ = p.communicate()
                out += "\n[killed: test deadline]"
            logs.append(out)
        stats = []
        if before_stop:
            stats = before_stop(group)
        server_codes = group.poll()
        return Result([p.returncode for p in procs], logs, server_codes, stats)
    finally:
        for p in procs:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGKILL)
                p.wait()
        group.stop()


def server_stats(group: ServerGroup) -> list[tuple[dict, list]]:
    import zmq

    from shoal.comm.wire import Codec

    ctx = zmq.Context()
    try:
        from shoal.ps.client import request_stats

        codec = Codec(group.job_key.encode())
        return [request_stats(ctx, ep, codec) for ep in group.endpoints()]
    finally:
        ctx.term()
