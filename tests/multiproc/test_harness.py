"""The test harness itself: results come back by rank, a failing rank is named
with its traceback and stops the others, and nothing a test started outlives it."""

from __future__ import annotations

import sys
import time

import pytest

from tests.helpers.procs import Processes, pid_alive
from tests.helpers.ranks import RanksFailedError, run_workers


def all_reduce_ranks(rank, world):
    import torch
    import torch.distributed as dist

    t = torch.tensor([float(rank)])
    dist.all_reduce(t)
    return t.item()


def test_all_reduce_sums_the_ranks():  # the example in tests/README.md
    assert run_workers(all_reduce_ranks, world=2) == [1.0, 1.0]


def rank_one_fails(rank, world):
    import atexit

    import torch.distributed as dist

    if rank == 1:
        # a slow teardown: rank 0 fails on the closed connection while rank 1 is still exiting
        # (CI once saw rank 1 SIGKILLed here by the harness, reported as how it failed)
        atexit.register(time.sleep, 2.0)
        assert rank == 0, "rank 1 disagrees"
    dist.barrier()  # rank 0 would wait here forever
    return rank


def test_a_failing_rank_is_named_and_stops_the_others():
    start = time.monotonic()
    with pytest.raises(RanksFailedError) as err:
        run_workers(rank_one_fails, world=2, timeout_s=60)
    assert time.monotonic() - start < 30
    text = str(err.value)
    assert text.startswith("rank 1 exited with code 1:") and "AssertionError: rank 1 disagrees" in text
    assert "\nrank 0 " in text  # not left waiting: its barrier failed, or the harness stopped it


ESCAPE = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
print(child.pid, flush=True)
time.sleep(60)
"""


def test_everything_started_is_killed_on_leaving_even_in_another_session():
    with Processes() as procs:
        proc = procs.start([sys.executable, "-c", ESCAPE], timeout=30)
        while not proc.stdout().strip():
            time.sleep(0.05)
        escaped = int(proc.stdout().split()[0])
        assert escaped in procs.alive() and pid_alive(proc.pid)
    deadline = time.monotonic() + 5
    while (pid_alive(escaped) or pid_alive(proc.pid)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pid_alive(escaped) and not pid_alive(proc.pid)
