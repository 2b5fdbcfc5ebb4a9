"""How a launcher starts the embedded members, and `shoal run --control`.

`serving(control, key)` runs for the length of a job: for `raft` it starts
three members on this machine (free ports on 127.0.0.1, files in a private
temporary directory), waits until they commit a first write, and kills them
by pid at the end; on several machines (`--nnodes`) member i runs on machine
i mod nnodes, so any one machine may be lost, and the launchers exchange the
members' addresses through a signed store on machine 0's rendezvous port + 1.
For `raft://H:P,...` or `etcd://HOST:PORT` it only passes the spec on.
Workers find it in SHOAL_CONTROL (`shoal.control.connect`).

Under a supervisor (`shoal.launch.supervisor`, on a machine other than 0) a
launcher that was killed is started again, and it starts its members again as
the same members: on the addresses its predecessor published (the other
members and the running workers know only those) and from the same
directories, in the supervisor's folder (`shoal.supervised`), where each member's Raft
journal (term, vote, log) is, which makes the restart Raft-safe.
"""

from __future__ import annotations

import contextlib
import functools
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from shoal import env, supervised
from shoal.comm.netif import address_towards
from shoal.config import is_control_spec, split_endpoint
from shoal.control.guard import MEMBER_RESTARTS, member_exited
from shoal.errors import ConfigError, ShoalError
from shoal.respawn import Respawner

if TYPE_CHECKING:
    from shoal.control.client import RaftControl

SESSION_KEY = "shoal/control/session"
"""Across machines: the job's session in the members' meeting store, drawn by machine 0's launcher."""
MEMBERS = 3
"""Three members: any one may be lost; two lost stop the job (no majority)."""
START_S = 120.0
"""How long local members may take to elect a first leader on a loaded machine (they start in well under a second)."""
Share = Callable[[list[int], Callable[[], str], bool], list[str]]
"""`_exchange`'s `share(mine, draw, again)`."""


def member_argv(index: int, members: list[str], directory: Path | str) -> list[str]:
    """The command of member `index` of `members` (host:port each), keeping its files in `directory`."""
    argv = [sys.executable, "-m", "shoal.control.member", "--index", str(index)]
    return [*argv, "--members", ",".join(members), "--dir", str(directory)]


def spec(members: list[str]) -> str:
    """The `connect` spec of these members."""
    return "raft://" + ",".join(members)


def client_address(raft_address: str) -> str:
    """The client endpoint of the member whose Raft address is host:port (the next port)."""
    host, port = raft_address.rsplit(":", 1)
    return f"{host}:{int(port) + 1}"


def free_pair(host: str, taken: tuple[int, ...] = ()) -> int:
    """A port p on `host`, with p+1 free as well, below the kernel's range of ephemeral ports: a member
    binds them a moment later, and a port from that range (what binding port 0 gives) may meanwhile
    become the source port of some process's outgoing connection (the members' own connections to
    each other, under load): then the member cannot bind it. `taken`: ports already handed out."""
    low = _ephemeral_low()
    rng = random.SystemRandom()
    for _ in range(1000):
        p = rng.randrange(max(1024, low // 2), low - 1)
        if any(abs(p - q) <= 1 for q in taken):
            continue
        with socket.socket() as a, socket.socket() as b, contextlib.suppress(OSError):
            a.bind((host, p))
            b.bind((host, p + 1))
            return p
    raise ShoalError(f"found no free pair of ports on {host} below {low} for the control plane's members")


def _ephemeral_low() -> int:
    """The lowest port Linux gives outgoing connections (/proc/sys/net/ipv4/ip_local_port_range)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def _drawer(host: str) -> Callable[[], str]:
    """`draw()`: a new member address HOST:PORT on `host`, its ports apart from those drawn before."""
    drawn: list[int] = []

    def draw() -> str:
        drawn.append(free_pair(host, tuple(drawn)))
        return f"{host}:{drawn[-1]}"

    return draw


def _member_key(index: int) -> str:
    """Where member `index`'s address is published in the meeting store."""
    return f"shoal/control/member/{index}"


@contextlib.contextmanager
def serving(
    control: str, job_key: str, nnodes: int = 1, node_rank: int = 0, rdzv_endpoint: str = ""
) -> Iterator[dict[str, str]]:
    """The control plane for one job; yields the environment the workers need. With `nnodes` > 1
    every machine's launcher calls this: member i runs on machine i mod nnodes (three machines at
    most), and the members' addresses meet in a store on machine 0 (`_exchange`)."""
    if not is_control_spec(control):
        raise ConfigError(f"--control {control!r} is not raft, raft://H:P,H:P,H:P or etcd://HOST:PORT", "control")
    if not control:
        yield {}
        return
    if control != "raft":  # raft://... or etcd://...: started elsewhere
        yield {env.CONTROL: control}
        return
    if nnodes == 1:
        draw = _drawer("127.0.0.1")
        members = [draw() for _ in range(MEMBERS)]
        with _running(members, list(range(MEMBERS)), job_key, node_rank):
            yield {env.CONTROL: spec(members)}
        return
    if not os.environ.get(env.JOB_KEY):  # each launcher would draw its own: no member could talk to another
        raise ConfigError(
            "--control raft on several machines needs the same secret on every machine: set "
            f"{env.JOB_KEY} (e.g. to the output of `openssl rand -hex 32`) before `shoal` on each",
            "control",
        )
    mine = [i for i in range(MEMBERS) if i % nnodes == node_rank]
    again = bool(os.environ.get(env.RELAUNCHED))  # keep the addresses the others and the workers know
    with _exchange(job_key, node_rank, rdzv_endpoint) as share:
        members = share(mine, _drawer(address_towards(split_endpoint(rdzv_endpoint)[0])), again)
        with _running(members, mine, job_key, node_rank):
            yield {env.CONTROL: spec(members)}


@contextlib.contextmanager
def _running(members: list[str], mine: list[int], job_key: str, node_rank: int) -> Iterator[None]:
    """Members `mine` of `members` run on this machine (files in `_files`) until the block ends, when
    they are killed by pid; first, a write commits (a majority is up). A launcher started again by its
    supervisor says that each of its members came back with its journal (the term it read there)."""
    from shoal.control.client import RaftControl

    print(f"shoal: control plane {spec(members)} ({len(mine)} of its members here)", file=sys.stderr, flush=True)
    procs: dict[int, subprocess.Popen] = {}
    with _files() as folder:

        def start(i: int) -> subprocess.Popen:
            with open(folder / f"member{i}.log", "ab") as log:  # appended: a restarted member's follows
                argv = member_argv(i, members, folder / f"member{i}")
                child_env = {**os.environ, env.JOB_KEY: job_key}
                procs[i] = subprocess.Popen(argv, env=child_env, stdout=log, stderr=log, start_new_session=True)
            supervised.tell(f"member{i}", procs[i].pid)  # the supervisor's hang check skips it
            return procs[i]

        try:
            for i in mine:
                start(i)
            ctl = RaftControl(members, key=job_key, timeout=START_S)  # typed as such: `__enter__` says ControlPlane
            with ctl:
                ctl.put(f"job/started/{node_rank}", True)
                if os.environ.get(env.RELAUNCHED):
                    for i, proc in procs.items():
                        term = _started_term(ctl, i, proc, folder / f"member{i}.log")
                        journal = "its journal" if term else "an empty journal"  # a new member's term is 0
                        line = f"control member {i} came back on {members[i]} with {journal} (term {term} at start)"
                        print(f"shoal: {line}", file=sys.stderr, flush=True)
            why = functools.partial(member_exited, members)
            respawner = Respawner(procs, lambda i, _: start(i), why, MEMBER_RESTARTS, "shoal-control-restarts")
            try:
                yield
            finally:
                respawner.close()
        finally:
            for proc in procs.values():
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGKILL)
                proc.wait()


@contextlib.contextmanager
def _files() -> Iterator[Path]:
    """Where this machine's members keep their files: a private temporary directory, removed at the end;
    under a supervisor, its folder (`shoal.supervised`) instead, which a killed launcher leaves for the
    next one (emptied by a first launcher: a pid the supervisor has may have been an earlier one's)."""
    owner = supervised.owner()
    if owner is None:
        with tempfile.TemporaryDirectory(prefix="shoal-control-") as tmp:
            yield Path(tmp)
        return
    if not os.environ.get(env.RELAUNCHED) and supervised.is_private(supervised.folder(owner), check=False):
        shutil.rmtree(supervised.folder(owner))
    yield supervised.private_folder(owner)


def _started_term(ctl: RaftControl, i: int, proc: subprocess.Popen, log: Path) -> int:
    """The term member `i` (this launcher's `proc`) read from its journal at start; ShoalError if it exits."""
    from shoal.control.base import ControlError

    deadline = time.monotonic() + START_S
    while True:
        try:
            return int(ctl.local(i)["started_term"])
        except ControlError:
            code = proc.poll()
            if code is not None or time.monotonic() > deadline:
                said = log.read_text(errors="replace").strip().splitlines()[-1:] or ["nothing"]
                raise ShoalError(
                    f"control member {i} was started again on {ctl.members[i]} and "
                    f"{'exited with code ' + str(code) if code is not None else 'does not answer'}; it said: "
                    f"{said[0]}"
                ) from None
            time.sleep(0.1)  # it is still starting (Python, pysyncobj): a refused try returns at once


@contextlib.contextmanager
def _exchange(job_key: str, node_rank: int, rdzv_endpoint: str) -> Iterator[Share]:
    """Where the machines' launchers tell each other their members' addresses: a store that machine
    0's launcher opens on the rendezvous port + 1 for the length of the job, each value signed with
    the job key (a stranger who reaches it cannot point a worker at its own member). Yields
    `share(mine, draw, again)`: publish an address from `draw()` for each of this machine's members (`again`:
    only for those its predecessor had not published), return all MEMBERS, in order."""
    from shoal.comm.signed_store import open_shared

    host, port = split_endpoint(rdzv_endpoint)
    try:
        store = open_shared(host, port + 1, job_key.encode(), node_rank == 0, START_S, SESSION_KEY)
    except ShoalError:
        raise
    except Exception as exc:
        raise ShoalError(
            f"the control plane's members meet on machine 0's rendezvous port + 1 ({host}:{port + 1}) and that "
            f"failed ({' '.join(str(exc).split())[:200]}); is the port free there, and is machine 0's launcher "
            "running?"
        ) from None

    def share(mine: list[int], draw: Callable[[], str], again: bool) -> list[str]:
        for i in mine:
            if not (again and store.raw.check([_member_key(i)])):  # a launcher started again keeps what it published
                store.set(_member_key(i), draw())
        keys = [_member_key(i) for i in range(MEMBERS)]
        store.wait_or_say(
            keys,
            START_S,
            f"the control plane's {MEMBERS} members were not all announced within {START_S:g}s: "
            "start a launcher on every machine with the same --control raft",
        )
        return [store.get(k) for k in keys]

    yield share
