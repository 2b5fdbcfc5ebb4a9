"""`shoal.respawn`: a launcher's helper processes started again one by one, each at most its limit, only
those its policy names. (In a job: control members in test_control.py, servers in test_ps_replication.py.)"""

from __future__ import annotations

import subprocess
import sys
import time

from shoal.respawn import Respawner


def test_each_exited_process_is_started_again_up_to_its_limit_and_only_as_the_policy_says(capsys):
    def start(code: int) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", f"import sys; sys.exit({code})"])

    procs = {0: start(3), 1: start(4)}  # 0: exits again after each start; 1: left, it stopped by itself
    started: list[tuple[int, int]] = []

    def again(i: int, count: int) -> subprocess.Popen:
        started.append((i, count))
        return start(3)

    respawner = Respawner(procs, again, lambda i, code: f"{i} exited {code}" if i == 0 else None, 2, "test")
    try:
        deadline = time.monotonic() + 30
        while respawner.count[0] < 2 or procs[0].poll() is None:
            assert time.monotonic() < deadline, started
            time.sleep(0.1)
        time.sleep(0.5)  # a third start would come within a poll
    finally:
        respawner.close()
        for proc in procs.values():
            proc.wait(10)
    assert started == [(0, 1), (0, 2)]
    said = capsys.readouterr().err
    assert "shoal: 0 exited 3 (1 of 2)" in said and "(2 of 2)" in said and "(3 of" not in said, said
    assert respawner.count[1] == 0
