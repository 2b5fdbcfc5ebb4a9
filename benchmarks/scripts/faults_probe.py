"""Minor page faults and CPU per second of each process of a PS-BSP run (5.4M MLP, 2 workers, 2 unreplicated
servers), read from /proc over a few seconds after a warm-up, with glibc's malloc as shoal sets it or as is:

    PYTHONPATH=. .venv/bin/python benchmarks/scripts/faults_probe.py keep|default

(`SHOAL_MALLOC`, `shoal/allocator.py`). The processes are found from the launcher's pid, never by name.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from shoal.procfs import children_of, stat_fields

ROOT = Path(__file__).resolve().parents[2]
WARMUP_S, WINDOW_S = 14.0, 6.0


def tree(pid: int) -> list[int]:
    """`pid` and every process below it."""
    return [pid] + [p for child in children_of(pid) for p in tree(child)]


def sample(root: int) -> dict[int, tuple[int, int, str]]:
    """Per process: minor faults, CPU ticks (user + system), command line."""
    got = {}
    for pid in tree(root):
        fields = stat_fields(pid)  # after the command name: minflt is the 8th, utime and stime the 12th, 13th
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")
        except OSError:
            continue
        if len(fields) > 12:
            got[pid] = (int(fields[7]), int(fields[11]) + int(fields[12]), cmd)
    return got


def kind(cmd: str) -> str:
    if "shoal.ps.process" in cmd:
        return "server"
    return "launcher" if "shoal.cli" in cmd else "worker"


def main() -> None:
    how = sys.argv[1] if len(sys.argv) > 1 else "keep"
    out = os.path.join(tempfile.mkdtemp(), "out.json")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SHOAL_MALLOC": how, "SHOAL_THREADS": "1", "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-m", "shoal.cli", "run", "-n", "2", "--servers", "2", "--replication", "1"]
    argv += ["benchmarks/ps.py", "--worker", "--out", out, "--servers", "2", "--task", "throughput"]
    argv += ["--model", "wide_mlp_5m", "--strategy", "bsp", "--steps", "900"]
    run = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(WARMUP_S)
        before, began = sample(run.pid), time.time()
        time.sleep(WINDOW_S)
        after, took = sample(run.pid), time.time() - began
        for pid, (faults, ticks, cmd) in after.items():
            if pid in before:
                rate, cpu = (faults - before[pid][0]) / took, (ticks - before[pid][1]) / took
                print(f"{how:8s} {kind(cmd):8s} {pid}: {rate:9.0f} minor faults/s, CPU {cpu:5.1f} ticks/s")
        run.wait(timeout=600)
        print(how, "steps/s", json.loads(Path(out).read_text()).get("steps_per_s"))
    finally:
        if run.poll() is None:
            run.kill()


if __name__ == "__main__":
    main()
