"""Run a parameter-server job for a test: S servers started as the launcher
starts them (`shoal.ps.servers.start_servers`) and W ranks that each run a
function (`tests.helpers.ranks`), all under one `Processes`:

    job = run_ps_job(2, 1, ps_tasks.run, {"task": "linear", ...}, before_stop=server_stats)
    assert job.codes == [0, 0]; job.arrays()["0.weight"]
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from shoal.ps.servers import ServerGroup, start_servers
from tests.helpers.procs import Processes
from tests.helpers.ranks import start_ranks, wait_all


@dataclass
class PSJob:
    codes: list[int | None]
    logs: list[str]
    """Each rank's stdout and stderr."""
    server_codes: list[int | None]
    """None: the server was still running when the workers were done."""
    stats: list = field(default_factory=list)
    results: list = field(default_factory=list)
    """Each rank's JSON result (None where it failed)."""

    def arrays(self, rank: int = 0) -> dict[str, np.ndarray]:
        return {k: np.asarray(v) for k, v in self.results[rank].items()}


def servers(procs: Processes, count: int, env: Mapping[str, str] | None = None, timeout_s: float = 30) -> ServerGroup:
    """`count` servers of a new job (its key `SHOAL_JOB_KEY` from `env`, else a fresh one); their output
    goes to `procs.logs/server<i>.log`, their pids are adopted."""
    key = (env or {}).get("SHOAL_JOB_KEY") or secrets.token_hex(16)
    group = start_servers(count, key, timeout_s=timeout_s, extra_env=procs.env(env, "server"), log_dir=str(procs.logs))
    for p in group.procs:
        procs.adopt(p)
    group.on_start = procs.adopt  # the launcher's replacements of exited servers too
    return group


def run_ps_job(
    workers: int,
    count: int,
    fn: Callable | str,
    args: dict,
    timeout: float = 90,
    env: Mapping[str, str] | None = None,
    before_stop: Callable[[ServerGroup], list] | None = None,
) -> PSJob:
    """Run `fn(rank, world, args)` on `workers` ranks against `count` servers, to the end;
    `before_stop(group)` runs while the servers are still up."""
    with Processes() as procs:
        group = servers(procs, count, env)
        try:
            out_dir = procs.logs / "results"
            out_dir.mkdir()
            ranks = start_ranks(procs, fn, [args], workers, out_dir, timeout, {**(env or {}), **group.env})
            done = wait_all(ranks, stop_on_failure=False)
            results = []
            for r in range(workers):
                path = out_dir / f"rank{r}.json"
                results.append(json.loads(path.read_text()).get("ok") if path.exists() else None)
            stats = before_stop(group) if before_stop else []
            logs = [d.stdout + d.stderr + ("\n[killed: test deadline]" if d.timed_out else "") for d in done]
            return PSJob([d.returncode for d in done], logs, group.poll(), stats, results)
        finally:
            group.stop()


def server_stats(group: ServerGroup) -> list[tuple[dict, list]]:
    """Each server's statistics (its own record of pushes, gaps, drops)."""
    import zmq

    from shoal.comm.wire import Codec
    from shoal.ps.client import request_stats

    ctx = zmq.Context()
    try:
        codec = Codec(group.job_key.encode())
        return [request_stats(ctx, ep, codec) for ep in group.endpoints()]
    finally:
        ctx.term()
