"""Shared by the benchmark scripts: launch a worker function on N processes
through `shoal run`, time steps, and write results as JSON plus one line."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def launch(script: str, nproc: int, args: list[str], threads: int = 1, timeout: float = 1800, servers: int = 0) -> None:
    """Run `script --worker ARGS` on `nproc` processes with `threads` torch threads each
    (and `servers` parameter-server processes)."""
    env = {**os.environ, "SHOAL_THREADS": str(threads), "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    cmd = [
        sys.executable,
        "-m",
        "shoal.cli",
        "run",
        "-n",
        str(nproc),
        *(["--servers", str(servers)] if servers else []),
        script,
        "--worker",
        *args,
    ]
    proc = subprocess.run(cmd, env=env, timeout=timeout)
    if proc.returncode != 0:
        sys.exit(f"benchmark worker failed: {' '.join(cmd)}")


def timed_steps(step, n: int, barrier=None) -> float:
    """Seconds for `n` calls of `step()`, ranks aligned before and after."""
    if barrier:
        barrier()
    start = time.perf_counter()
    for _ in range(n):
        step()
    if barrier:
        barrier()
    return time.perf_counter() - start


def machine() -> dict:
    return {
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
    }


def write(name: str, result: dict, summary: str) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    result = {
        "benchmark": name,
        "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "machine": machine(),
        **result,
        "summary": summary,
    }
    path.write_text(json.dumps(result, indent=2))
    print(summary)
    return path
