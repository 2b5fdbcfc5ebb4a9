"""Three embedded control-plane members for a test or a benchmark, started with the one harness.

with Processes() as procs:
    cluster = Cluster.start(procs, tmp_path)          # on 127.0.0.1, or hosts=TestHosts
    with cluster.client() as ctl:
        ctl.put("k", 1)
    cluster.kill(cluster.leader())
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from shoal.control import RaftControl
from shoal.control.launch import free_pair, member_argv
from shoal.procfs import children_of
from tests.helpers.procs import Proc, Processes

KEY = "control-plane-test-key-0123456789"
START_S = 60.0
"""How long members may take to elect a first leader on a loaded machine."""


def members_of(launcher: int) -> dict[int, int]:
    """The control members a `shoal` launcher started (`--control raft`): index -> pid, from /proc."""
    found = {}
    for pid in children_of(launcher):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"shoal.control.member" in argv:
            found[int(argv[argv.index(b"--index") + 1])] = pid
    return found


def member_ports(count: int = 3) -> list[int]:
    """Ports p with p+1 free too (member i serves clients on its port + 1), as the launcher picks them."""
    ports: list[int] = []
    while len(ports) < count:
        ports.append(free_pair("127.0.0.1", tuple(ports)))
    return ports


@dataclass
class Cluster:
    procs: Processes
    members: list[str]
    dirs: list[Path]
    argv_wrap: list = field(default_factory=list)
    running: list[Proc | None] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)

    @classmethod
    def start(cls, procs: Processes, tmp: Path, hosts=None, port: int = 7400, env: dict | None = None) -> Cluster:
        """Three members on 127.0.0.1 (free ports), or one on each of `hosts` (same port, own address);
        `env` is added to the members' environment."""
        if hosts is None:
            members = [f"127.0.0.1:{p}" for p in member_ports()]
            wrap = [lambda argv: argv] * 3
        else:
            members = [f"{hosts[i].address}:{port}" for i in range(3)]
            wrap = [hosts[i].argv for i in range(3)]
        cluster = cls(procs, members, [tmp / f"member{i}" for i in range(3)], wrap, env=dict(env or {}))
        cluster.running = [None] * 3
        for i in range(3):
            cluster.restart(i)
        return cluster

    def restart(self, i: int) -> Proc:
        """(Re)start member i on its own directory (its journal: term, vote, log)."""
        argv = self.argv_wrap[i](member_argv(i, self.members, self.dirs[i]))
        name = f"member{i}-{time.monotonic_ns()}"
        proc = self.procs.start(argv, timeout=600, env={"SHOAL_JOB_KEY": KEY, **self.env}, name=name)
        self.running[i] = proc
        return proc

    def kill(self, i: int) -> None:
        """SIGKILL member i."""
        proc = self.running[i]
        assert proc is not None
        proc.kill()
        self.running[i] = None

    def client(self, timeout: float = 10.0, key: str = KEY) -> RaftControl:
        return RaftControl(self.members, key=key, timeout=timeout)

    def wait_ready(self, timeout: float = START_S) -> None:
        """Until a write commits (a leader with a majority)."""
        with self.client(timeout=timeout) as ctl:
            ctl.put("ready", True)

    def leader(self, timeout: float = 10.0) -> int:
        """The index of the member that leads now (asked of every member)."""
        end = time.monotonic() + timeout
        with self.client() as ctl:
            while time.monotonic() < end:
                for i in range(3):
                    if self.running[i] is None:
                        continue
                    try:
                        if ctl.local(i, "\0", timeout=0.5)["leader"]:
                            return i
                    except Exception:
                        pass
                time.sleep(0.05)
        raise AssertionError(f"no leader among {self.members} within {timeout} s")
