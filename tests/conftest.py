"""Helpers for tests that start real processes: each gets a timeout and its
whole process group is killed by pid afterwards, whatever happens."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHOAL = [sys.executable, "-m", "shoal.cli"]


def run(
    args: list[str], timeout: float = 180, cwd: Path | None = None, env: dict | None = None
) -> subprocess.CompletedProcess:
    """Run a command in its own session; kill the session on timeout or exit."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200", **(env or {})}
    proc = subprocess.Popen(
        args,
        cwd=cwd or ROOT,
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(map(str, args))} timed out after {timeout}s\nstdout:\n{out}\nstderr:\n{err}")
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # anything the command left behind
        except ProcessLookupError:
            pass
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


def shoal(*args: str, timeout: float = 180, **kw) -> subprocess.CompletedProcess:
    return run([*SHOAL, *map(str, args)], timeout=timeout, **kw)


def free_port() -> int:
    from shoal.launch.agent import free_port as fp

    return fp()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purposes
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False
    return True
