"""Failures on a schedule, for tests and benchmarks only (not a user option).

The schedule is JSON in the `SHOAL_FAULTS` environment variable, read here
and nowhere else:

    {"record": "/tmp/faults.jsonl",
     "faults": [{"role": "worker", "rank": 1, "step": 5, "action": "kill"},
                {"role": "server", "rank": 0, "step": 3, "action": "stop", "seconds": 2},
                {"role": "worker", "rank": "*", "step": "*", "action": "sleep", "seconds": 0.02, "prob": 0.1}]}

(a bare list is the `faults` alone). Each fault names a `role` ("worker" or
"server"), a `rank` (an int or "*"), a `step` (an int, 1-based, or "*" for
every step) and an `action`:

- `raise`: raise `InjectedFaultError` (a RuntimeError) in the process;
- `kill`: SIGKILL the process itself;
- `stop`: SIGSTOP itself for `seconds` (a detached `sh` sends SIGCONT);
- `sleep`: sleep `seconds` (a straggler), with probability `prob` (default 1).

A worker's step N is the start of its N-th call of the prepared
optimizer's `step()` (each micro-step counts under `grad_accum`); a server's
step N is the arrival of the first push of the workers' N-th step. Before acting, each
fired fault except `sleep` is appended to `record` (one JSON line, fsynced),
so a test can assert that the failure really fired.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from dataclasses import dataclass

from shoal import env

ROLES = ("worker", "server")
ACTIONS = ("raise", "kill", "stop", "sleep")


class InjectedFaultError(RuntimeError):
    """Raised by a scheduled `raise` fault."""


@dataclass(frozen=True)
class Fault:
    role: str
    rank: int | None  # None: every rank
    step: int | None  # None: every step
    action: str
    seconds: float = 0.0
    prob: float = 1.0

    def matches(self, role: str, rank: int, step: int) -> bool:
        return self.role == role and self.rank in (None, rank) and self.step in (None, step)


@dataclass(frozen=True)
class Schedule:
    faults: tuple[Fault, ...] = ()
    record: str = ""


def parse(text: str) -> Schedule:
    """The schedule in `text` (JSON); ValueError naming the entry that is wrong."""
    raw = json.loads(text) if text.strip() else []
    if isinstance(raw, list):
        raw = {"faults": raw}
    if not isinstance(raw, dict) or not isinstance(raw.get("faults", []), list):
        raise ValueError(f"{env.FAULTS} must be a JSON list of faults or an object with 'faults' and 'record'")
    faults = tuple(_fault(entry) for entry in raw.get("faults", []))
    return Schedule(faults, str(raw.get("record") or ""))


def _fault(entry: object) -> Fault:
    if not isinstance(entry, dict):
        raise ValueError(f"a fault must be a JSON object, not {entry!r}")
    role, action = entry.get("role"), entry.get("action")
    if role not in ROLES or action not in ACTIONS:
        raise ValueError(f"fault {entry!r}: role must be one of {ROLES} and action one of {ACTIONS}")
    rank, step = entry.get("rank", "*"), entry.get("step", "*")
    for name, value in (("rank", rank), ("step", step)):
        if value != "*" and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise ValueError(f"fault {entry!r}: {name} must be an integer >= 0 or '*'")
    seconds, prob = float(entry.get("seconds", 0.0)), float(entry.get("prob", 1.0))
    if seconds < 0 or not 0.0 <= prob <= 1.0:
        raise ValueError(f"fault {entry!r}: seconds must be >= 0 and prob in [0, 1]")
    return Fault(role, None if rank == "*" else rank, None if step == "*" else step, action, seconds, prob)


_schedule: Schedule | None = None
_rng = random.Random()


def schedule() -> Schedule:
    """This process's schedule, parsed once from the environment."""
    global _schedule
    if _schedule is None:
        _schedule = parse(os.environ.get(env.FAULTS, ""))
        _rng.seed(os.getpid())
    return _schedule


def at_step(role: str, rank: int, step: int) -> None:
    """Fire every fault scheduled for this role, rank and step (no-op without a schedule)."""
    sched = schedule()
    for fault in sched.faults:
        if fault.matches(role, rank, step):
            _fire(fault, sched.record, role, rank, step)


def _fire(fault: Fault, record: str, role: str, rank: int, step: int) -> None:
    if fault.action == "sleep":
        if fault.prob >= 1.0 or _rng.random() < fault.prob:
            time.sleep(fault.seconds)
        return
    if record:
        line = json.dumps({"role": role, "rank": rank, "step": step, "action": fault.action, "pid": os.getpid()})
        with open(record, "a") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
    if fault.action == "raise":
        raise InjectedFaultError(f"injected fault: {role} {rank} at step {step}")
    if fault.action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if fault.action == "stop":
        # A stopped process cannot wake itself: a detached shell sends SIGCONT.
        subprocess.Popen(
            ["/bin/sh", "-c", f"sleep {fault.seconds}; kill -CONT {os.getpid()}"],
            start_new_session=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.kill(os.getpid(), signal.SIGSTOP)


def fired(record: str) -> list[dict]:
    """The faults recorded in `record` (for tests)."""
    try:
        with open(record) as f:
            return [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        return []
