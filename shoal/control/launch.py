"""How a launcher starts the embedded members, and `shoal run --control`.

`serving(control, key)` runs for the length of a job: for `raft` it starts
three members on this machine (free ports on 127.0.0.1, files in a private
temporary directory), waits until they commit a first write, and kills them
by pid at the end; for `raft://H:P,...` or `etcd://HOST:PORT` it only passes
the spec on. Workers find it in SHOAL_CONTROL (`shoal.control.connect`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from shoal import env
from shoal.errors import ConfigError

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


def _free_pair() -> int:
    """A port p with p+1 free as well (now: the members bind them a moment later)."""
    while True:
        with socket.socket() as a, socket.socket() as b:
            a.bind(("127.0.0.1", 0))
            p = a.getsockname()[1]
            with contextlib.suppress(OSError):
                b.bind(("127.0.0.1", p + 1))
                return p


@contextlib.contextmanager
def serving(control: str, job_key: str, nnodes: int = 1) -> Iterator[dict[str, str]]:
    """The control plane for one job; yields the environment the workers need."""
    if not control:
        yield {}
        return
    if control.startswith(("raft://", "etcd://")):
        yield {env.CONTROL: control}
        return
    if control != "raft":
        raise ConfigError(f"--control {control!r} is not raft, raft://H:P,H:P,H:P or etcd://HOST:PORT", "control")
    if nnodes > 1:
        raise ConfigError(
            "--control raft starts its members on one machine only for now; on several machines start them "
            "with `python -m shoal.control.member` and give --control raft://H:P,H:P,H:P",
            "control",
        )
    from shoal.control.client import RaftControl

    members = [f"127.0.0.1:{_free_pair()}" for _ in range(MEMBERS)]
    procs: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory(prefix="shoal-control-") as tmp:
        try:
            for i in range(MEMBERS):
                with open(Path(tmp) / f"member{i}.log", "wb") as log:
                    argv = member_argv(i, members, Path(tmp) / f"member{i}")
                    child_env = {**os.environ, env.JOB_KEY: job_key}
                    procs.append(subprocess.Popen(argv, env=child_env, stdout=log, stderr=log, start_new_session=True))
            with RaftControl(members, key=job_key, timeout=START_S) as ctl:
                ctl.put("job/started", True)
            yield {env.CONTROL: spec(members)}
        finally:
            for proc in procs:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGKILL)
                proc.wait()
