"""How a launcher starts the embedded members, and `shoal run --control`.

`serving(control, key)` runs for the length of a job: for `raft` it starts
three members on this machine (free ports on 127.0.0.1, files in a private
temporary directory), waits until they commit a first write, and kills them
by pid at the end; on several machines (`--nnodes`) member i runs on machine
i mod nnodes, so any one machine may be lost, and the launchers exchange the
members' addresses through a signed store on machine 0's rendezvous port + 1.
For `raft://H:P,...` or `etcd://HOST:PORT` it only passes the spec on.
Workers find it in SHOAL_CONTROL (`shoal.control.connect`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from shoal import env
from shoal.comm.netif import address_towards
from shoal.config import is_control_spec, split_endpoint
from shoal.errors import ConfigError, ShoalError

SESSION_KEY = "shoal/control/session"
"""Across machines: the job's session in the members' meeting store, drawn by machine 0's launcher."""
MEMBERS = 3
"""Three members: any one may be lost; two lost stop the job (no majority)."""
START_S = 120.0
"""How long local members may take to elect a first leader on a loaded machine (they start in well under a second)."""


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


def _free_pair(host: str) -> int:
    """A port p on `host` with p+1 free as well (now: the members bind them a moment later)."""
    while True:
        with socket.socket() as a, socket.socket() as b:
            a.bind((host, 0))
            p = a.getsockname()[1]
            with contextlib.suppress(OSError):
                b.bind((host, p + 1))
                return p


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
        members = [f"127.0.0.1:{_free_pair('127.0.0.1')}" for _ in range(MEMBERS)]
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
    with _exchange(job_key, node_rank, rdzv_endpoint) as share:
        here = address_towards(split_endpoint(rdzv_endpoint)[0])
        members = share(mine, {i: f"{here}:{_free_pair(here)}" for i in mine})
        with _running(members, mine, job_key, node_rank):
            yield {env.CONTROL: spec(members)}


@contextlib.contextmanager
def _running(members: list[str], mine: list[int], job_key: str, node_rank: int) -> Iterator[None]:
    """Members `mine` of `members` run on this machine (files in a private temporary directory)
    until the block ends, when they are killed by pid; first, a write commits (a majority is up)."""
    from shoal.control.client import RaftControl

    print(f"shoal: control plane {spec(members)} ({len(mine)} of its members here)", file=sys.stderr, flush=True)
    procs: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory(prefix="shoal-control-") as tmp:
        try:
            for i in mine:
                with open(Path(tmp) / f"member{i}.log", "wb") as log:
                    argv = member_argv(i, members, Path(tmp) / f"member{i}")
                    child_env = {**os.environ, env.JOB_KEY: job_key}
                    procs.append(subprocess.Popen(argv, env=child_env, stdout=log, stderr=log, start_new_session=True))
            with RaftControl(members, key=job_key, timeout=START_S) as ctl:
                ctl.put(f"job/started/{node_rank}", True)
            yield
        finally:
            for proc in procs:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGKILL)
                proc.wait()


@contextlib.contextmanager
def _exchange(job_key: str, node_rank: int, rdzv_endpoint: str) -> Iterator[Callable[[list[int], dict], list[str]]]:
    """Where the machines' launchers tell each other their members' addresses: a store that machine
    0's launcher opens on the rendezvous port + 1 for the length of the job, each value signed with
    the job key (a stranger who reaches it cannot point a worker at its own member). Yields
    `share(mine, addresses)`: publish this machine's, return all MEMBERS, in order."""
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

    def share(mine: list[int], addresses: dict[int, str]) -> list[str]:
        for i in mine:
            store.set(f"shoal/control/member/{i}", addresses[i])
        keys = [f"shoal/control/member/{i}" for i in range(MEMBERS)]
        store.wait_or_say(
            keys,
            START_S,
            f"the control plane's {MEMBERS} members were not all announced within {START_S:g}s: "
            "start a launcher on every machine with the same --control raft",
        )
        return [store.get(k) for k in keys]

    yield share
