"""A parameter-server job on one machine talks over `ipc://` sockets in a private directory.

Why: on one machine CURVE's encryption was about 38% of a PS-BSP job's CPU
per step (docs/benchmarks-ps.md), and what it buys there, that no process
without the job key gets a byte in, a directory gives for nothing. The
launcher makes one directory per job (mode 0700, owned by the user; `make_dir`),
names it to every server and worker in SHOAL_PS_IPC_DIR, and removes it when
the job ends, also when it fails. Every parameter-server socket (servers,
their replication links, the launcher's event subscriber) binds a Unix
socket in it (`endpoint`), and every process of the job connects there
without CURVE, and its messages carry no per-message MAC
(`shoal.comm.security.Transport.private_dir`).

What holds: another user cannot open the directory, so cannot connect, send
a frame or make a process hold memory; nothing crosses a network, so there
is no path to tamper with or record. The same user could connect, but the
same user can read the job key from any of the job's processes anyway
(/proc/PID/environ), and with it pass CURVE and the MAC too. The headers'
session and sequence checks (`shoal.comm.replay`) stay as they are.

Across machines (`--nnodes` > 1 or `--server-nodes`) nothing changes: TCP
with CURVE. SHOAL_PS_IPC=0 keeps TCP with CURVE on one machine too.
"""

from __future__ import annotations

import os
import secrets
import shutil
import stat
import tempfile
from collections.abc import Mapping
from pathlib import Path

from shoal import env
from shoal.errors import ConfigError, ShoalError
from shoal.procfs import remove_orphaned

SCHEME = "ipc://"
MAX_PATH = 107
"""The longest path of a Unix socket (`sun_path` holds 108 bytes with the closing NUL)."""
NAME_ROOM = 40
"""What a socket's name (`endpoint`) may add to the directory's path."""


def enabled(environ: Mapping[str, str] | None = None) -> bool:
    """Whether a one-machine parameter-server job uses ipc:// (SHOAL_PS_IPC unset or 1) or TCP with CURVE (0)."""
    value = (os.environ if environ is None else environ).get(env.PS_IPC, "1").strip()
    if value not in ("0", "1"):
        raise ConfigError(f"{env.PS_IPC} must be 0 or 1, not {value!r}", env.PS_IPC)
    return value == "1"


def make_dir() -> str:
    """A new private directory for one job's sockets (0700, this user's), under the temporary directory,
    named after this launcher's pid; first, those of this user's launchers that are gone are removed
    (a SIGKILLed one could not remove its own)."""
    remove_orphaned(Path(tempfile.gettempdir()), "shoal-ipc-")
    path = tempfile.mkdtemp(prefix=f"shoal-ipc-{os.getpid()}-")  # mode 0700, owned by this process's user
    if len(path) + NAME_ROOM > MAX_PATH:
        remove(path)
        raise ConfigError(
            f"the temporary directory {tempfile.gettempdir()!r} is too long a path for Unix sockets; "
            f"set TMPDIR to a shorter one, or {env.PS_IPC}=0",
            env.PS_IPC,
        )
    return path


def remove(path: str | None) -> None:
    """Remove a job's directory and the sockets left in it (nothing where `path` is None)."""
    if path:
        shutil.rmtree(path, ignore_errors=True)


def environ_for(path: str | None) -> dict[str, str]:
    """What the launcher adds to the environment of the job's processes (nothing without a directory)."""
    return {env.PS_IPC_DIR: path} if path else {}


def job_dir(environ: Mapping[str, str] | None = None) -> str | None:
    """This process's job directory (SHOAL_PS_IPC_DIR), checked; None where the launcher named none."""
    path = (os.environ if environ is None else environ).get(env.PS_IPC_DIR, "")
    if not path:
        return None
    check_dir(path)
    return path


def check_dir(path: str) -> None:
    """ShoalError (one sentence) unless `path` is an absolute directory, not a link, owned by this user,
    that only this user may open (0700): else a stranger could connect where no CURVE checks them."""
    try:
        st = os.lstat(path)
    except OSError as exc:
        raise ShoalError(
            f"the job's socket directory {path!r} ({env.PS_IPC_DIR}) cannot be read ({exc.strerror}); "
            "did its launcher exit?"
        ) from None
    mode = stat.S_IMODE(st.st_mode)
    if not os.path.isabs(path) or not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or mode != 0o700:
        raise ShoalError(
            f"the job's socket directory {path!r} ({env.PS_IPC_DIR}) must be an absolute directory owned by "
            f"this user with mode 0700 (it has owner {st.st_uid}, mode {mode:o}); let the launcher make it, "
            f"or set {env.PS_IPC}=0"
        )


def endpoint(path: str, name: str) -> str:
    """A fresh endpoint for one socket in the job's directory: `name` and a random suffix, so a process
    started again in place of another never binds (and so unlinks) a socket that one may still hold."""
    return f"{SCHEME}{path}/{name}-{secrets.token_hex(4)}"


def check_endpoint(endpoint: str, path: str | None, peer: str) -> None:
    """ShoalError (one sentence) unless `endpoint`, which `peer` published, is a socket in this job's
    directory `path`, or, where there is none, a tcp:// endpoint."""
    if path is None:
        if not endpoint.startswith("tcp://"):
            raise ShoalError(f"{peer} published {endpoint[:120]!r}, which is not a tcp:// endpoint")
        return
    where = endpoint.removeprefix(SCHEME)
    name = os.path.basename(where)
    inside = os.path.dirname(where) == path and name not in ("", ".", "..") and os.path.normpath(where) == where
    if not endpoint.startswith(SCHEME) or not inside:
        raise ShoalError(f"{peer} published {endpoint[:120]!r}, which is not a socket in this job's directory {path}")
