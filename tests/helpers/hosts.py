"""Test hosts: Linux network namespaces joined by veth pairs to one bridge.

Each host is a namespace with its own loopback and one interface (`eth0`)
whose address lies in a /24 of 10.213.0.0/16 chosen for this set of hosts;
the bridge in the root namespace has no address, so the hosts reach each
other and nothing else (no route leaves the bridge). Links are shaped on
each host's egress with `tc`: netem (rate, delay, loss) where the kernel has
it, else a token bucket (rate only; `Link.applied` says which).

Everything is named with a per-instance tag and removed on `close()`, also
after a failed test, after killing (by pid) whatever still runs in a host.
Processes are started with the one harness (`tests.helpers.procs`), each
command wrapped by `Host.argv`.
Needs root (CAP_NET_ADMIN); `require_root()` skips a test with the reason.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
from dataclasses import dataclass, field

SUBNET_PREFIX = "10.213"
"""The tests' private range: every address a TestHosts uses is 10.213.N.H on its own bridge."""


def can_make_hosts() -> str:
    """'' when this process can create test hosts, else the reason it cannot."""
    if os.geteuid() != 0:
        return "test hosts need root (network namespaces, veth, tc)"
    if not shutil.which("ip") or not shutil.which("tc"):
        return "test hosts need iproute2's `ip` and `tc`"
    return ""


def require_root() -> None:
    """Skip the calling pytest test when test hosts cannot be made here."""
    import pytest

    reason = can_make_hosts()
    if reason:
        pytest.skip(reason)


def _ip(*args: str, netns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    cmd = ["ip", *(["-n", netns] if netns else []), *args]
    return subprocess.run(cmd, capture_output=True, text=True, check=check, timeout=30)


@dataclass
class Link:
    """What shaping a host's link asked for and what the kernel applied."""

    rate: str | None = None
    delay: str | None = None
    loss: str | None = None
    applied: str = ""


@dataclass
class Host:
    index: int
    netns: str
    address: str
    link: Link = field(default_factory=Link)

    def argv(self, command: list[str]) -> list[str]:
        """`command` run inside this host's namespace."""
        return ["ip", "netns", "exec", self.netns, *command]


class TestHosts:
    """N hosts on one bridge: `with TestHosts(3) as hosts: hosts[0].address ...`."""

    __test__ = False  # not a pytest class

    def __init__(self, count: int, subnet: int | None = None):
        if not 1 <= count <= 200:
            raise ValueError("between 1 and 200 test hosts")
        self.tag = secrets.token_hex(3)  # interface names stay under 15 characters
        self.subnet = subnet if subnet is not None else secrets.randbelow(250) + 1
        self.bridge = f"shb{self.tag}"
        self.hosts: list[Host] = []
        self._count = count

    # ------------------------------------------------------------ lifecycle
    def __enter__(self) -> TestHosts:
        try:
            self.open()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getitem__(self, i: int) -> Host:
        return self.hosts[i]

    def __len__(self) -> int:
        return len(self.hosts)

    def open(self) -> None:
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("link", "set", self.bridge, "up")
        for i in range(self._count):
            netns, veth = f"shn{self.tag}{i}", f"shv{self.tag}{i}"
            _ip("netns", "add", netns)
            host = Host(i, netns, f"{SUBNET_PREFIX}.{self.subnet}.{i + 1}")
            self.hosts.append(host)
            _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", netns)
            _ip("link", "set", veth, "master", self.bridge, "up")
            _ip("addr", "add", f"{host.address}/24", "dev", "eth0", netns=netns)
            _ip("link", "set", "eth0", "up", netns=netns)
            _ip("link", "set", "lo", "up", netns=netns)

    def close(self) -> None:
        """Kill what runs in the hosts (by pid), then remove namespaces and links."""
        for host in self.hosts:
            self.kill(host.index)
            _ip("netns", "del", host.netns, check=False)  # takes its end of the veth pair along
        for i in range(self._count):
            _ip("link", "del", f"shv{self.tag}{i}", check=False)
        _ip("link", "del", self.bridge, check=False)
        self.hosts = []

    def kill(self, i: int) -> list[int]:
        """SIGKILL every process in host i (by pid), as if the machine died; their pids."""
        listed = list(map(int, _ip("netns", "pids", self.hosts[i].netns, check=False).stdout.split()))
        for pid in listed:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return listed

    # -------------------------------------------------------------- shaping
    def shape(self, i: int, rate: str | None = None, delay: str | None = None, loss: str | None = None) -> Link:
        """Shape host i's egress ("100mbit", "0.5ms", "1%"); every host shaped alike shapes each link both ways."""
        host = self.hosts[i]
        link = Link(rate, delay, loss)
        netem = ["netem", *(["rate", rate] if rate else []), *(["delay", delay] if delay else [])]
        netem += ["loss", loss] if loss else []
        netem += ["limit", "100000"]
        done = self._tc(host, "replace", "dev", "eth0", "root", *netem)
        if done.returncode == 0:
            link.applied = "netem " + " ".join(netem[1:])
        elif rate and not loss:
            # No netem in this kernel: a token bucket gives the rate; no delay is added.
            self._tc(host, "replace", "dev", "eth0", "root", "tbf", "rate", rate, "burst", "256kb", "latency", "100ms")
            link.applied = f"tbf rate {rate}"
        else:
            raise RuntimeError(f"cannot shape host {i}: {done.stderr.strip()} (netem is missing from this kernel)")
        host.link = link
        return link

    def _tc(self, host: Host, *args: str) -> subprocess.CompletedProcess:
        cmd = ["ip", "netns", "exec", host.netns, "tc", "qdisc", *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30)

    # ----------------------------------------------------------- partitions
    def cut(self, a: int, b: int) -> None:
        """Drop every packet between hosts a and b (both ways) until `heal`."""
        for src, dst in ((a, b), (b, a)):
            _ip("route", "add", "blackhole", f"{self.hosts[dst].address}/32", netns=self.hosts[src].netns)

    def heal(self, a: int, b: int) -> None:
        for src, dst in ((a, b), (b, a)):
            _ip("route", "del", "blackhole", f"{self.hosts[dst].address}/32", netns=self.hosts[src].netns, check=False)
