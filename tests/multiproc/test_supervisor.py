"""The launcher's supervisor ends what a dead launcher left: its workers, in sessions of their own, by pid.
(The whole path, a launcher killed on one of two test hosts: tests/multiproc/test_hosts.py.)"""

from __future__ import annotations

import subprocess
import sys

ORPHAN = """
import os, subprocess, sys, time
from shoal.launch import supervisor
from shoal.procfs import children_of
supervisor._become_subreaper()
# a "launcher" that starts a "worker" in a session of its own (as torch's agent does) and dies
launcher = subprocess.Popen([sys.executable, "-c",
    "import subprocess, sys; p = subprocess.Popen(['sleep', '60'], start_new_session=True); print(p.pid)"],
    stdout=subprocess.PIPE, text=True)
worker = int(launcher.stdout.readline())
launcher.wait()
try:
    time.sleep(0.2)
    assert children_of(os.getpid()) == [worker], children_of(os.getpid())
    print(len(supervisor.end_orphans()), os.path.exists(f"/proc/{worker}"), children_of(os.getpid()))
finally:
    try:
        os.kill(worker, 9)  # by pid, should the assertion have failed
    except ProcessLookupError:
        pass
"""


def test_the_orphans_of_a_dead_launcher_are_its_supervisors_to_end():
    done = subprocess.run([sys.executable, "-c", ORPHAN], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["1", "False", "[]"], done.stdout
