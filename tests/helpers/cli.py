"""Run the `shoal` command as a user would, in a fresh process (tests and benchmarks)."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path

from tests.helpers.procs import Finished, Processes

SHOAL = [sys.executable, "-m", "shoal.cli"]


def start_shoal(
    procs: Processes, *args: object, timeout: float = 180, env: Mapping[str, str] | None = None, capture: bool = True
):
    """Start `shoal ARGS...` under `procs` (for commands that run side by side)."""
    return procs.start([*SHOAL, *map(str, args)], timeout=timeout, env=env, capture=capture)


def finish(proc) -> Finished:
    """Wait for a started `shoal`; fail the test (with its output) if it ran past its deadline."""
    import pytest

    done = proc.wait()
    if done.timed_out:
        pytest.fail(f"{' '.join(done.args)} timed out\nstdout:\n{done.stdout[-5000:]}\nstderr:\n{done.stderr[-5000:]}")
    return done


def shoal(
    *args: object, timeout: float = 180, env: Mapping[str, str] | None = None, cwd: Path | None = None
) -> Finished:
    """`shoal ARGS...` to the end: returncode, stdout, stderr and the processes it left alive."""
    with Processes() as procs:
        proc = procs.start([*SHOAL, *map(str, args)], timeout=timeout, env=env, cwd=cwd)
        return finish(proc)
