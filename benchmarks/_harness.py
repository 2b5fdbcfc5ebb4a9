"""Shared by the benchmark scripts: launch a worker function on N processes
through `shoal run` (with the tests' process helpers, `tests.helpers`), time
steps, and write results as JSON plus one line.

Run the scripts from the repository root with the root on the path, e.g.
`PYTHONPATH=. python benchmarks/ps.py`.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import torch

try:
    from tests.helpers.cli import start_shoal
    from tests.helpers.procs import Processes
except ImportError:
    sys.exit("benchmarks use the tests' process helpers: run them from the repository root with PYTHONPATH=.")

RESULTS = Path(__file__).resolve().parent / "results"


def launch(  # noqa: PLR0913 (every benchmark's launcher: each option is one a benchmark sets)
    script: str,
    nproc: int,
    args: list[str],
    threads: int = 1,
    timeout: float = 1800,
    servers: int = 0,
    env: Mapping[str, str] | None = None,
    quiet: bool = False,
    replication: int | None = None,
) -> None:
    """Run `script --worker ARGS` on `nproc` processes with `threads` torch threads each
    (and `servers` parameter-server processes, each shard held by `replication` of them:
    None is the launcher's default), with `env` added; every process is stopped at the
    end, whatever happens. `quiet` keeps the workers' output off the console (it is shown
    if the run fails)."""
    options = ["-n", str(nproc), *(["--servers", str(servers)] if servers else [])]
    if replication is not None:
        options += ["--replication", str(replication)]
    extra = {**(env or {}), "SHOAL_THREADS": str(threads), "OMP_NUM_THREADS": str(threads)}
    with Processes() as procs:
        proc = start_shoal(procs, "run", *options, script, "--worker", *args, timeout=timeout, env=extra, capture=quiet)
        done = proc.wait()
    if done.returncode != 0 or done.timed_out:
        why = "ran past its deadline" if done.timed_out else f"exited with code {done.returncode}"
        sys.exit(f"{done.stderr[-3000:]}benchmark worker {why}: {' '.join(done.args)}")


SIGNING = """# Written by benchmarks/_harness.py, for a measurement only: every process of this job signs
# its messages with the HMAC even under CURVE, as shoal did before CURVE replaced it (shoal.comm.wire).
from shoal.comm import wire

_init = wire.Codec.__init__


def _signing(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    self.signed = True


wire.Codec.__init__ = _signing
"""


def signing_everywhere(folder: str) -> dict[str, str]:
    """The `env` for `launch` that makes every process of a job sign its messages under CURVE too
    (a `sitecustomize` written into `folder`, which must outlive the job), to compare with the default."""
    Path(folder, "sitecustomize.py").write_text(SIGNING)
    return {"PYTHONPATH": os.pathsep.join([folder, str(Path(__file__).resolve().parents[1])])}


def launch_keeping(out: str, *args, **kwargs) -> bool:
    """`launch`, for workers whose rank 0 writes its result to `out` before shutting down: a job
    that fails after that (say, at shutdown) is reported in its last lines and False returned,
    its result kept; one that fails before stops the benchmark as `launch` does."""
    try:
        launch(*args, **kwargs)
    except SystemExit as failed:
        if not Path(out).exists():
            raise
        print(f"{str(failed)[-600:]}\n(failed after rank 0 wrote its result, which is kept)", flush=True)
        return False
    return True


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
