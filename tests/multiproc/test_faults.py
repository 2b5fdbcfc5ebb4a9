"""Failures on a schedule (`shoal.faults`) in real jobs, each checked to have fired.

What holds today: a worker or server that dies stops the whole job within
its timeout, with one sentence naming who died, and leaves no process
behind; a worker stopped for a while only delays a BSP job, which ends
exactly where it would have. (Recovery is a later issue.)
"""

from __future__ import annotations

import re
import time

import numpy as np
import pytest

from tests.helpers.cli import shoal
from tests.helpers.faults import Faults
from tests.helpers.procs import pid_alive
from tests.helpers.ps import run_ps_job
from tests.workers import ps_tasks


def crash_job(tmp_path, faults: Faults, kind: str = "dp"):
    """`shoal run -n 2 tests/workers/crash.py` (with one server for `ps`) under `faults`; its pids."""
    servers = ["--servers", "1"] if kind == "ps" else []
    result = shoal("run", "-n", "2", *servers, "tests/workers/crash.py", tmp_path, kind, timeout=90, env=faults.env())
    pids = [int((tmp_path / f"pid{r}").read_text()) for r in range(2)]
    return result, pids


def assert_all_gone(result, pids: list[int]) -> None:
    assert not result.survivors, f"processes outlived the job: {result.survivors}"
    deadline = time.monotonic() + 10
    while any(pid_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(pid_alive(p) for p in pids)


@pytest.mark.parametrize(
    "action, how",
    [
        ("kill", "was killed by SIGKILL"),
        ("raise", r"failed: InjectedFaultError: injected fault: worker 1 at step 3"),
    ],
)
def test_a_worker_that_dies_at_a_step_stops_the_job_with_one_sentence(tmp_path, action, how):
    faults = Faults(tmp_path).add("worker", 1, 3, action)
    result, pids = crash_job(tmp_path, faults)
    assert faults.assert_fired("worker", 1, 3, action)["pid"] == pids[1]
    assert result.returncode == 1, result.stderr[-3000:]
    assert_all_gone(result, pids)
    last = result.stderr.strip().splitlines()[-1]
    assert re.match(f"shoal: worker rank 1 {how}", last), last


def test_a_server_killed_at_a_step_stops_the_workers_with_one_sentence(tmp_path):
    faults = Faults(tmp_path).kill("server", 0, 3)
    result, pids = crash_job(tmp_path, faults, kind="ps")
    server = faults.assert_fired("server", 0, 3, "kill")["pid"]
    assert result.returncode == 1, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    endpoint = r"ipc://[^']*/server0-shard0-[0-9a-f]+"  # one machine: in the job's private directory
    said = rf"shoal: worker rank \d failed: .*no answer from parameter server\(s\) \['{endpoint}'\]"
    assert re.match(said, last), last
    assert_all_gone(result, [*pids, server])


def test_a_worker_stopped_for_2s_only_delays_a_bsp_job(tmp_path):
    faults = Faults(tmp_path).stop("worker", 1, 3, seconds=2)
    steps = 6
    args = {"task": "equiv", "optim": "sgd", "steps": steps, "params": True, "strategy": {"consistency": "bsp"}}
    job = run_ps_job(2, 1, ps_tasks.run, args, env=faults.env())
    assert job.codes == [0, 0], "\n----\n".join(job.logs)
    faults.assert_fired("worker", 1, 3, "stop")
    assert min(r["wall_s"] for r in job.results) >= 2.0  # rank 0 waited for the stopped rank at its next clock
    got = job.arrays()
    for name, value in ps_tasks.single_process("sgd", steps, world=2).items():  # what the fault-free job gives
        np.testing.assert_allclose(got[name], value, atol=1e-5, rtol=0, err_msg=name)
