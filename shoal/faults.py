"""Failures on a schedule, for tests and benchmarks only (not a user option).

The schedule is JSON in the `SHOAL_FAULTS` environment variable, read here
and nowhere else:

    {"record": "/tmp/faults.jsonl", "seed": 0,
     "faults": [{"role": "worker", "rank": 1, "step": 5, "action": "kill"},
                {"role": "server", "rank": 0, "step": 3, "action": "stop", "seconds": 2},
                {"role": "worker", "rank": "*", "step": "*", "action": "sleep", "seconds": 0.02, "prob": 0.1}]}

(a bare list is the `faults` alone). Each fault names a `role` ("worker",
"server" or "push"), a `rank` (an int or "*"), a `step` (an int, 1-based, or "*" for
every step) and an `action`:

- `raise`: raise `InjectedFaultError` (a RuntimeError) in the process;
- `kill`: SIGKILL the process itself;
- `stop`: SIGSTOP itself for `seconds` (a detached `sh` sends SIGCONT, or ends early if
  the process is killed meanwhile);
- `sleep`: sleep `seconds` (a straggler);
- `kill-launcher`: SIGKILL the process's parent, the launcher that started it (a
  worker's `shoal run`/`shoal train` on its machine), and go on;
- `stop-launcher`: SIGSTOP that launcher for `seconds` (a hung launcher), and go on.

A fault fires with probability `prob` (default 1), drawn from a generator
seeded by the schedule's `seed`, the role and the rank, so a run's
stragglers are reproducible. A worker's step N is the start of its N-th call
of the prepared optimizer's `step()` (each micro-step counts under
`grad_accum`); a server's step N is the arrival of the first push of the
workers' N-th step; a `push` fault acts in a parameter-server worker's N-th
push between its message to the first server and to the others, once that
first message is out (a worker that dies mid-push leaves the servers a clock
apart). Before acting, each fired fault is appended to `record`
(one JSON line; fsynced before `raise`, `kill` and `stop`), so a test can
assert that the failure really fired. A fault already in `record` for this
role, rank and step does not fire again: a worker that the elastic agent
restarts (`--max-restarts`) and that redoes that step is not killed twice.
Without a record a restarted process fires it again. Under `shoal train`
a worker's step counts on from the step it resumed at. A schedule that does not parse stops
the process at its first step with a ValueError naming the entry.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from dataclasses import dataclass
from typing import TypeGuard

from shoal import env

ROLES = ("worker", "server", "push")
ACTIONS = ("raise", "kill", "stop", "sleep", "kill-launcher", "stop-launcher")


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
    seed: int = 0


KEYS = ("role", "rank", "step", "action", "seconds", "prob")


def parse(text: str) -> Schedule:
    """The schedule in `text` (JSON); ValueError naming the entry that is wrong."""
    try:
        raw = json.loads(text) if text.strip() else []
    except json.JSONDecodeError as err:
        raise ValueError(f"{env.FAULTS} is not valid JSON ({err})") from None
    table: object = {"faults": raw} if isinstance(raw, list) else raw
    seed = table.get("seed", 0) if isinstance(table, dict) else None
    if (
        not isinstance(table, dict)
        or not isinstance(table.get("faults", []), list)
        or set(table) - {"faults", "record", "seed"}
        or not _is_int(seed)
    ):
        raise ValueError(
            f"{env.FAULTS} must be a JSON list of faults or an object with 'faults', 'record' and 'seed' (an integer)"
        )
    faults = tuple(_fault(i, entry) for i, entry in enumerate(table.get("faults", [])))
    return Schedule(faults, str(table.get("record") or ""), seed)


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _fault(index: int, entry: object) -> Fault:
    where = f"{env.FAULTS} fault {index} ({json.dumps(entry)})"
    if not isinstance(entry, dict):
        raise ValueError(f"{where} must be a JSON object with keys {', '.join(KEYS)}")
    unknown = sorted(set(entry) - set(KEYS))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; a fault has {', '.join(KEYS)}")
    role, action = entry.get("role"), entry.get("action")
    if role not in ROLES:
        raise ValueError(f"{where}: 'role' must be one of {', '.join(ROLES)}")
    if action not in ACTIONS:
        raise ValueError(f"{where}: 'action' must be one of {', '.join(ACTIONS)}")
    rank, step = entry.get("rank", "*"), entry.get("step", "*")
    for name, value in (("rank", rank), ("step", step)):
        if value != "*" and (not _is_int(value) or value < (1 if name == "step" else 0)):
            low = 1 if name == "step" else 0
            raise ValueError(f"{where}: '{name}' must be an integer >= {low} or '*'")
    seconds, prob = entry.get("seconds", 0.0), entry.get("prob", 1.0)
    for name, value in (("seconds", seconds), ("prob", prob)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where}: '{name}' must be a number")
    if action in ("stop", "sleep", "stop-launcher") and not seconds > 0:
        raise ValueError(f"{where}: '{action}' needs 'seconds' > 0")
    if seconds < 0 or not 0.0 <= prob <= 1.0:
        raise ValueError(f"{where}: 'seconds' must be >= 0 and 'prob' in [0, 1]")
    return Fault(role, None if rank == "*" else rank, None if step == "*" else step, action, float(seconds), prob)


_schedule: Schedule | None = None
_rngs: dict[tuple[str, int], random.Random] = {}
_fired: dict[str, set[tuple[str, int, int, str]]] = {}
"""Per record: (role, rank, step, action) of every fault in it, read once per process."""


def schedule() -> Schedule:
    """This process's schedule, parsed once from the environment."""
    global _schedule
    if _schedule is None:
        _schedule = parse(os.environ.get(env.FAULTS, ""))
    return _schedule


def scheduled(role: str) -> bool:
    """Whether any fault names `role` (a cheap test before work that only a fault needs)."""
    return any(f.role == role for f in schedule().faults)


def at_step(role: str, rank: int, step: int) -> None:
    """Fire every fault scheduled for this role, rank and step (no-op without a schedule)."""
    sched = schedule()
    for fault in sched.faults:
        if not fault.matches(role, rank, step):
            continue
        done = _already_fired(sched.record)
        key = (role, rank, step, fault.action)
        if key in done:
            continue  # fired before a restart: the step is being redone
        if _draw(fault.prob, sched.seed, role, rank):
            if sched.record:
                done.add(key)
            _fire(fault, sched.record, role, rank, step)


def _already_fired(record: str) -> set[tuple[str, int, int, str]]:
    if record not in _fired:
        _fired[record] = {(r["role"], r["rank"], r["step"], r["action"]) for r in fired(record)} if record else set()
    return _fired[record]


def _draw(prob: float, seed: int, role: str, rank: int) -> bool:
    if prob >= 1.0:
        return True
    rng = _rngs.setdefault((role, rank), random.Random(f"{seed}:{role}:{rank}"))
    return rng.random() < prob


def _fire(fault: Fault, record: str, role: str, rank: int, step: int) -> None:
    if record:
        line = json.dumps(
            {
                "role": role,
                "rank": rank,
                "step": step,
                "action": fault.action,
                "pid": os.getpid(),
                "unix_time": time.time(),
            }
        )
        with open(record, "a") as f:
            f.write(line + "\n")
            f.flush()
            if fault.action != "sleep":  # the process may end or stop next: the line must be on disk
                os.fsync(f.fileno())
    if fault.action == "sleep":
        time.sleep(fault.seconds)
    if fault.action == "raise":
        raise InjectedFaultError(f"injected fault: {role} {rank} at step {step}")
    if fault.action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if fault.action == "kill-launcher":
        os.kill(os.getppid(), signal.SIGKILL)
    if fault.action in ("stop", "stop-launcher"):
        # A stopped process cannot wake itself: a detached shell sends SIGCONT, or ends
        # as soon as the process is gone (killed while stopped), leaving nothing behind.
        pid = os.getpid() if fault.action == "stop" else os.getppid()
        ticks = max(1, round(fault.seconds * 10))
        waker = f"i=0; while [ $i -lt {ticks} ]; do sleep 0.1; kill -0 {pid} 2>/dev/null || exit 0; i=$((i+1)); done"
        subprocess.Popen(
            ["/bin/sh", "-c", f"{waker}; kill -CONT {pid}"],
            start_new_session=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.kill(pid, signal.SIGSTOP)


def fired(record: str) -> list[dict]:
    """The faults recorded in `record` (for tests)."""
    try:
        with open(record) as f:
            return [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        return []
