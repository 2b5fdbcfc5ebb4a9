"""A replicated parameter server cut off by a partition, on test hosts (network namespaces).

Host 0 runs the two workers and machine 0's launcher, which hosts the job's store; hosts 1
and 2 run only servers (`--server-nodes 2`), one process each: process 0 on host 1 (primary
of shard 0, backup of shard 1), process 1 on host 2 (primary of shard 1, backup of shard 0).
Mid-run host 1 is cut from both other hosts: from the workers, from its replicas' other
halves and from the store. The cut-off process cannot win a claim, so it gives both shards
up; process 1 takes shard 0 over and keeps shard 1 alone, and the job ends where it ends
without the cut.
"""

from __future__ import annotations

import json
import secrets
import time
from pathlib import Path

import numpy as np
import pytest

from shoal import env
from shoal.ps.servers import REPLACEMENT_MARK
from tests.helpers.cli import SHOAL, finish
from tests.helpers.faults import Faults
from tests.helpers.hosts import TestHosts, can_make_hosts
from tests.helpers.procs import Processes
from tests.helpers.ps import run_ps_job
from tests.workers import ps_partition, ps_tasks

pytestmark = pytest.mark.skipif(bool(can_make_hosts()), reason=can_make_hosts() or "test hosts can be made")
PORT = 29400  # any port: the hosts' namespaces are the test's own
CUT_AT = 10  # the workers' step after which host 1 is cut off (of ps_partition.STEPS = 40)


def _worker_step(faults: Faults) -> int:
    """The newest step a worker began (each step's sleep fault is recorded as it fires)."""
    return max((r["step"] for r in faults.fired() if r["role"] == "worker"), default=0)


def _wait_for(what: str, path: Path, proc, start: float, timeout: float = 30.0) -> float:
    """Seconds from `start` (monotonic) until `what` is in the file at `path` (AssertionError after `timeout`)."""
    while what not in (path.read_text() if path.exists() else ""):
        assert time.monotonic() - start < timeout, f"no {what!r} in {path} within {timeout} s"
        assert proc.poll() is None, f"the workers' launcher exited first: {proc.stderr()[-3000:]}"
        time.sleep(0.05)
    return time.monotonic() - start


def _cut_mid_run(tmp_path: Path, out: Path, logs: list[Path]) -> tuple:
    """The job on three hosts, host 1 cut off from both others after step CUT_AT until the workers
    are done: (workers' launcher, server nodes' launchers, unix time of the cut, seconds from the
    cut until process 0 gave shard 0 up and shard 1 up)."""
    faults = Faults(tmp_path).sleep("worker", "*", "*", seconds=0.2)  # 40 steps of at least 0.2 s
    with TestHosts(3) as hosts, Processes() as procs:
        job = {env.JOB_KEY: secrets.token_hex(16), **faults.env()}
        common = ["--servers", "2", "--server-nodes", "2", "--rdzv-endpoint", f"{hosts[0].address}:{PORT}"]
        argv = [*SHOAL, "run", "-n", "2", *common, "--log-dir", str(logs[0]), "tests/workers/ps_partition.py", str(out)]
        workers = procs.start(hosts[0].argv(argv), timeout=180, env=job, name="workers")
        nodes = []
        for j in (0, 1):
            argv = [*SHOAL, "run", "--server-node-rank", str(j), *common, "--log-dir", str(logs[j + 1])]
            nodes.append(procs.start(hosts[j + 1].argv(argv), timeout=180, env=job, name=f"servers{j}"))
        deadline = time.monotonic() + 120
        while _worker_step(faults) < CUT_AT:
            assert workers.poll() is None, workers.stderr()[-3000:]
            assert time.monotonic() < deadline, f"the workers did not reach step {CUT_AT}: {workers.stderr()[-3000:]}"
            time.sleep(0.05)
        cut, since = time.time(), time.monotonic()
        hosts.cut(1, 0)
        hosts.cut(1, 2)
        try:
            # the cut-off process: each replica's link goes silent, its claim cannot reach the store
            cut_off = logs[1] / "server0.log"
            gave_up = [_wait_for(f"server process 0 gives shard {s} up", cut_off, workers, since) for s in (0, 1)]
            assert _worker_step(faults) < ps_partition.STEPS, "the job ended before the cut-off server gave up"
            while workers.poll() is None and not out.exists():
                time.sleep(0.1)
        finally:
            hosts.heal(1, 0)
            hosts.heal(1, 2)
        return finish(workers), [finish(p) for p in nodes], cut, gave_up


def test_a_server_cut_off_gives_its_shards_up_and_the_job_ends_as_without_the_cut(tmp_path):
    out = tmp_path / "params.json"
    logs = [tmp_path / f"host{i}" for i in range(3)]
    done, ends, cut, gave_up = _cut_mid_run(tmp_path, out, logs)
    assert done.returncode == 0, done.stderr[-3000:] + "\n----\n" + "\n----\n".join(e.stderr[-2000:] for e in ends)
    assert ends[1].returncode == 0, ends[1].stderr[-3000:]  # host 2's servers went on to the end
    result = json.loads(out.read_text())

    # each shard's record, at the end: process 1 holds both at generation 2, with no backup
    assert result["records"] == [[2, 1, None], [2, 1, None]], result["records"]
    # the cut-off process tried to claim and could not (the store was out of reach), won no generation,
    # and gave both its replicas up by itself
    # (its launcher then starts a replacement, whose lines follow in the same log)
    text0 = (logs[1] / "server0.log").read_text().split(REPLACEMENT_MARK)[0]
    for shard in (0, 1):
        assert f"shard {shard}: could not claim generation 2" in text0, text0[-3000:]
    assert "holds generation" not in text0 and "took shard" not in text0, text0[-3000:]
    # the 1.5 s link lease, then a claim of at most 2 s per replica (one after the other: one loop)
    assert max(gave_up) < 10.0, gave_up
    # process 1 won both claims: shard 0 taken over from process 0, shard 1 kept alone
    text1 = (logs[2] / "server1.log").read_text()
    assert "process 1 holds generation 2" in text1.split("shard 0: ", 1)[1].splitlines()[0], text1[-3000:]
    assert "process 1 holds generation 2" in text1.split("shard 1: ", 1)[1].splitlines()[0], text1[-3000:]
    assert "server process 1 took shard 0 over (generation 2)" in text1, text1[-3000:]
    assert "gives shard" not in text1, text1[-3000:]
    taken = [t for t in result["takeovers"] if t["shard"] == 0]
    assert [t["gen"] for t in taken] == [2], result["takeovers"]
    assert taken[0]["unix_time"] - cut < 5.0, (taken, cut)  # the workers turned to process 1 soon after the lease
    print(f"cut at step {CUT_AT}: takeover after {taken[0]['unix_time'] - cut:.2f} s, cut-off process gave shards")
    print(f"0 and 1 up after {gave_up[0]:.2f} s and {gave_up[1]:.2f} s; host 1's launcher exited {ends[0].returncode}")

    # the parameters: bit for bit the fault-free run's (same workers, servers and pieces, no hosts),
    # and one process's with the combined batch to float tolerance
    clean = run_ps_job(2, 2, ps_tasks.run, ps_partition.ARGS)
    assert clean.codes == [0, 0], "\n----\n".join(clean.logs)
    want = ps_tasks.single_process("adam", ps_partition.STEPS, world=2)
    for name, value in want.items():
        got = np.asarray(result[name], dtype=np.float32)
        assert np.array_equal(got, clean.arrays()[name].astype(np.float32)), name
        np.testing.assert_allclose(got, value, atol=1e-5, rtol=0, err_msg=name)
