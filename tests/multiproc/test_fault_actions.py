"""Each process-level fault action on a real child process: SIGKILL ends it
after the record is on disk; SIGSTOP stops it for the given time, then it
continues where it was."""

from __future__ import annotations

import sys
import time

from tests.helpers.faults import Faults
from tests.helpers.procs import Processes

CHILD = """
from shoal import faults
for step in (1, 2, 3):
    print("step", step, flush=True)
    faults.at_step("worker", 0, step)
print("done", flush=True)
"""


def state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[-1].split()[0]


def test_kill_ends_the_process_after_recording(tmp_path):
    faults = Faults(tmp_path).kill("worker", 0, 2)
    with Processes() as procs:
        done = procs.start([sys.executable, "-c", CHILD], timeout=30, env=faults.env()).wait()
    assert done.returncode == -9
    assert done.stdout.split() == ["step", "1", "step", "2"]
    assert faults.assert_fired("worker", 0, 2, "kill")["pid"] > 0


def test_stop_pauses_the_process_then_it_continues(tmp_path):
    faults = Faults(tmp_path).stop("worker", 0, 2, seconds=1.0)
    with Processes() as procs:
        proc = procs.start([sys.executable, "-c", CHILD], timeout=30, env=faults.env())
        stopped, resumed = None, None  # when it was first seen stopped, and then running again
        while resumed is None:
            now, st = time.monotonic(), state(proc.pid)  # read before poll() can reap it
            finished = proc.poll() is not None
            if stopped is None and st == "T":
                stopped = now
            elif stopped is not None and (st != "T" or finished):
                resumed = now  # running again, or already done: it ran on within one poll
            if finished:
                break
            time.sleep(0.01)
        done = proc.wait()
    assert stopped is not None, "the process was never seen stopped"
    assert resumed is not None and resumed - stopped >= 0.8, (stopped, resumed)
    assert done.returncode == 0 and done.stdout.split() == ["step", "1", "step", "2", "step", "3", "done"]
    assert faults.assert_fired("worker", 0, 2, "stop")["pid"] == proc.pid
