"""Run a function on N real worker processes (gloo on 127.0.0.1) and collect
its JSON results by rank:

    results = run_workers(train, (steps,), world=2)   # train(rank, world, steps) in each

Each rank is `python -m tests.helpers.worker` under `Processes`; the first
rank that fails stops the others, and the error names every failed rank with
its traceback or its last output.
"""

from __future__ import annotations

import json
import signal
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from shoal import env as shoal_env
from shoal.errors import caused_by_peer
from tests.helpers.procs import Finished, Proc, Processes, free_port


def target_of(fn: Callable | str) -> str:
    """`module:qualname` of a module-level function (what the worker entry imports)."""
    if isinstance(fn, str):
        return fn
    if fn.__module__ == "__main__" or "<locals>" in fn.__qualname__:
        raise ValueError(f"{fn.__qualname__} must be a module-level function of an importable module")
    return f"{fn.__module__}:{fn.__qualname__}"


def rank_env(rank: int, world: int, port: int) -> dict[str, str]:
    """What torchrun would set for rank `rank` of `world` on this machine."""
    return {
        "RANK": str(rank),
        "WORLD_SIZE": str(world),
        "LOCAL_RANK": str(rank),
        "LOCAL_WORLD_SIZE": str(world),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "SHOAL_THREADS": "1",
        "OMP_NUM_THREADS": "1",
    }


def start_ranks(
    procs: Processes,
    fn: Callable | str,
    args: Sequence,
    world: int,
    out_dir: Path,
    timeout_s: float,
    env: Mapping[str, str] | None = None,
) -> list[Proc]:
    port = free_port()
    argv = [sys.executable, "-m", "tests.helpers.worker", target_of(fn), json.dumps(list(args)), str(out_dir)]
    return [
        procs.start(
            [*argv, str(timeout_s)], timeout=timeout_s, env={**(env or {}), **rank_env(r, world, port)}, name=f"rank{r}"
        )
        for r in range(world)
    ]


def wait_all(
    ranks: list[Proc], stop_on_failure: bool = True, out_dir: Path | None = None, teardown_s: float = 5.0
) -> list[Finished]:
    """Wait for every rank (each until its deadline); the first failure stops the rest.

    With `out_dir`, a rank that has already written its result there is in its teardown:
    it gets `teardown_s` to exit by itself before it is stopped too, so that it ends as it
    would have (a rank that raised exits 1, not "killed by SIGKILL" at an unlucky moment)."""
    while any(p.poll() is None for p in ranks) and time.monotonic() < max(p.deadline for p in ranks):
        if stop_on_failure and any(p.poll() not in (None, 0) for p in ranks):
            _stop(ranks, out_dir, teardown_s)
            break
        time.sleep(0.05)
    return [p.wait() for p in ranks]


def _stop(ranks: list[Proc], out_dir: Path | None, teardown_s: float) -> None:
    ending = [r for r in range(len(ranks)) if out_dir and (out_dir / f"rank{r}.json").exists()]
    for r, p in enumerate(ranks):
        if r not in ending and p.poll() is None:
            p.kill()
    until = time.monotonic() + teardown_s
    while any(ranks[r].poll() is None for r in ending) and time.monotonic() < until:
        time.sleep(0.05)
    for r in ending:
        if ranks[r].poll() is None:
            ranks[r].kill()


def how(done: Finished) -> str:
    """'exited with code 1', 'was killed by SIGABRT', 'ran past its deadline'."""
    if done.timed_out:
        return "ran past its deadline"
    if done.returncode is not None and done.returncode < 0:
        return f"was killed by {signal.Signals(-done.returncode).name}"
    return f"exited with code {done.returncode}"


@dataclass
class RanksFailedError(AssertionError):
    """One or more ranks failed; `first` is the one that failed by itself."""

    message: str
    first: Finished

    def __str__(self) -> str:
        return self.message


def collect(ranks: list[Finished], out_dir: Path) -> list:
    """Results by rank, or RanksFailedError naming each failed rank with its error:
    first the one that failed by itself (it recorded an error no peer caused, even if
    `wait_all` then killed it in its teardown; else not killed, not failing on a closed
    connection: `shoal.errors.caused_by_peer`), then by time."""
    results, errors = [], []
    for rank, done in enumerate(ranks):
        path = out_dir / f"rank{rank}.json"
        res = json.loads(path.read_text()) if path.exists() else {}
        if "ok" not in res or done.returncode != 0:
            detail = res.get("error") or done.stderr[-3000:] or "(no output)"
            when = " after returning its result (at teardown)" if "ok" in res else ""
            if "error" in res and done.returncode == -signal.SIGKILL:
                when = " in its teardown, after it had failed"  # stopped by `wait_all`, or by its launcher
            last = (detail.strip().splitlines() or [""])[-1]
            own = "error" in res and not caused_by_peer(last)  # it said why, before anything stopped it
            order = (not own, done.returncode == -signal.SIGKILL, caused_by_peer(last), res.get("at", float("inf")))
            errors.append((order, done, f"rank {rank} {how(done)}{when}:\n{detail}"))
        results.append(res.get("ok"))
    if errors:
        errors.sort(key=lambda e: e[0])
        raise RanksFailedError("\n".join(text for _, _, text in errors), errors[0][1])
    return results


def _transient(err: RanksFailedError) -> bool:
    """A port taken meanwhile by another process."""
    text = err.message.lower()
    return "address already in use" in text or "eaddrinuse" in text


def run_workers(
    fn: Callable | str,
    args: Sequence = (),
    world: int = 2,
    timeout_s: float = 150.0,
    env: Mapping[str, str] | None = None,
) -> list:
    """`fn(rank, world, *args)` on `world` processes; its JSON results by rank.

    Retried once if the chosen port was taken meanwhile (other test runs on
    the machine pick free ports too); never with a fault schedule in `env`,
    nor for any other failure. (A rank killed by SIGABRT at teardown, "terminate
    called without an active exception", was a shoal bug: a DDP reducer that
    outlived the process group; `runtime.release_before_shutdown` fixed it.)
    """
    try:
        return _run_once(fn, args, world, timeout_s, env)
    except RanksFailedError as err:
        if (env and shoal_env.FAULTS in env) or not _transient(err):
            raise
        warnings.warn(f"retrying a {world}-rank run after: {err.message.splitlines()[0]}", stacklevel=2)
    return _run_once(fn, args, world, timeout_s, env)


def _run_once(fn, args, world, timeout_s, env) -> list:
    with Processes() as procs:
        out_dir = procs.logs / "results"
        out_dir.mkdir()
        ranks = start_ranks(procs, fn, args, world, out_dir, timeout_s, env)
        return collect(wait_all(ranks, out_dir=out_dir), out_dir)
