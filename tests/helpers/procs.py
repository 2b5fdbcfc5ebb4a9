"""The one way tests and benchmarks start processes.

Every process runs in its own session, with a deadline, with the environment
`child_env` builds, its stdout and stderr captured in files. Each carries a
marker variable (`MARK`) that its descendants inherit, so whatever it started,
in any session, can be found in /proc afterwards: `Processes.close()` kills
every process group it started and then every marked process still alive, by
pid, whatever happened in the test.

    with Processes() as procs:
        proc = procs.start([sys.executable, "-c", "print(1)"], timeout=30)
        done = proc.wait()          # returncode, stdout, stderr, survivors
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from shoal import env as shoal_env

ROOT = Path(__file__).resolve().parents[2]
T = TypeVar("T")
MARK = "TESTS_PROCESS_MARK"
"""Set in every process the helpers start (and inherited by theirs); the value names the start."""


def free_port(host: str = "127.0.0.1") -> int:
    """A port free now on `host` (another process may take it before we bind: callers retry)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of every process a test starts: this one's, with this
    checkout first on PYTHONPATH (children import this `shoal` and `tests`),
    unbuffered output, a wide console, no inherited fault schedule, and `extra`."""
    base = {k: v for k, v in os.environ.items() if k not in (shoal_env.FAULTS, MARK)}
    path = os.pathsep.join(filter(None, [str(ROOT), base.get("PYTHONPATH", "")]))
    return {**base, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1", "COLUMNS": "200", **(extra or {})}


def pid_alive(pid: int) -> bool:
    """Whether `pid` is a live process (a zombie counts as dead)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return False


def marked_pids(value: str, prefix: bool = False) -> list[int]:
    """Live processes whose environment has MARK=`value` (or a value starting with it)."""
    want = f"{MARK}={value}".encode()
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                entries = f.read().split(b"\0")
        except OSError:
            continue
        if any(e.startswith(want) if prefix else e == want for e in entries) and pid_alive(int(name)):
            found.append(int(name))
    return found


def _kill(pid: int, group: bool = False) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        (os.killpg if group else os.kill)(pid, signal.SIGKILL)


@dataclass
class Finished:
    """How a process ended; `survivors` are its descendants still alive when it exited."""

    args: list[str]
    returncode: int | None
    stdout: str
    stderr: str
    survivors: list[int] = field(default_factory=list)
    timed_out: bool = False


@dataclass
class Proc:
    args: list[str]
    popen: subprocess.Popen
    mark: str
    deadline: float
    out: Path | None
    err: Path | None

    @property
    def pid(self) -> int:
        return self.popen.pid

    def poll(self) -> int | None:
        return self.popen.poll()

    def stdout(self) -> str:
        return self.out.read_text(errors="replace") if self.out else ""

    def stderr(self) -> str:
        return self.err.read_text(errors="replace") if self.err else ""

    def until(self, check: Callable[[], T], timeout: float) -> T:
        """`check()`'s first truthy value, asked every 0.05 s; AssertionError (with the end of its stderr)
        if the process ends first or `timeout` seconds pass."""
        deadline = time.monotonic() + timeout
        while not (found := check()):
            assert self.poll() is None, f"it ended early:\n{self.stderr()[-3000:]}"
            assert time.monotonic() < deadline, f"waited {timeout:g} s in vain:\n{self.stderr()[-3000:]}"
            time.sleep(0.05)
        return found

    def kill(self) -> None:
        """SIGKILL its process group (it leads one)."""
        _kill(self.pid, group=True)
        self.popen.wait()

    def wait(self, grace_s: float = 5.0) -> Finished:
        """Wait until it exits or its deadline passes (then kill it: `timed_out`); `survivors`
        are what it started that is still alive `grace_s` after it exited."""
        try:
            self.popen.wait(max(0.0, self.deadline - time.monotonic()))
            timed_out = False
        except subprocess.TimeoutExpired:
            self.kill()
            timed_out = True
        until = time.monotonic() + grace_s
        while (survivors := marked_pids(self.mark)) and time.monotonic() < until:
            time.sleep(0.1)
        return Finished(self.args, self.popen.returncode, self.stdout(), self.stderr(), survivors, timed_out)


class Processes:
    """Processes started for one test (or one benchmark run), all killed on close."""

    def __init__(self) -> None:
        self.token = secrets.token_hex(6)
        self._dir = tempfile.TemporaryDirectory(prefix="shoal-procs-")
        self.logs = Path(self._dir.name)
        self.procs: list[Proc] = []
        self.adopted: list[subprocess.Popen] = []

    def env(self, extra: Mapping[str, str] | None = None, mark: str = "") -> dict[str, str]:
        """`child_env(extra)` marked as this session's (for processes started elsewhere)."""
        return child_env({**(extra or {}), MARK: f"{self.token}.{mark or 'x'}"})

    def start(
        self,
        args: list[str],
        timeout: float,
        env: Mapping[str, str] | None = None,
        cwd: Path | str | None = None,
        name: str = "",
        capture: bool = True,
    ) -> Proc:
        """Start `args` in a new session with `child_env(env)`; output to files under `logs`
        (or, without `capture`, to this process's console: a benchmark's progress)."""
        name = name or f"p{len(self.procs)}"
        mark = f"{self.token}.{name}"
        out, err = (self.logs / f"{name}.out", self.logs / f"{name}.err") if capture else (None, None)
        with contextlib.ExitStack() as files:
            o, e = (files.enter_context(open(path, "wb")) if path else None for path in (out, err))
            popen = subprocess.Popen(
                [str(a) for a in args],
                cwd=cwd or ROOT,
                env=child_env({**(env or {}), MARK: mark}),
                stdin=subprocess.DEVNULL,
                stdout=o,
                stderr=e,
                start_new_session=True,
            )
        proc = Proc([str(a) for a in args], popen, mark, time.monotonic() + timeout, out, err)
        self.procs.append(proc)
        return proc

    def adopt(self, popen: subprocess.Popen) -> None:
        """Kill `popen` on close as well (a process that shoal code started for the test)."""
        self.adopted.append(popen)

    def alive(self) -> list[int]:
        """Every live process this session started, at any depth."""
        return marked_pids(f"{self.token}.", prefix=True)

    def close(self) -> None:
        for proc in self.procs:
            _kill(proc.pid, group=True)
        for popen in self.adopted:
            _kill(popen.pid)
        for pid in self.alive():  # descendants that left their group or session
            _kill(pid)
        for popen in [p.popen for p in self.procs] + self.adopted:
            with contextlib.suppress(subprocess.TimeoutExpired):
                popen.wait(10)
        self._dir.cleanup()

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
