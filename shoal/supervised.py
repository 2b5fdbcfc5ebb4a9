"""What a launcher shares with the supervisor that starts it again (`shoal.launch.supervisor`).

A private folder named after the supervisor, which outlives a killed launcher:
the processes that serve until the launcher ends them (control-plane members,
whose Raft journals are there too, and parameter servers) leave their pids in
it, so that the supervisor does not count them among the workers, and the
launcher started again finds its members' journals. Its own module, below the
layers that write to it (`shoal.control.launch`, `shoal.ps.servers`) and the
launcher that reads it. And what every worker a shoal launcher started does
at start (`die_with_launcher`), supervised or not.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import stat
import tempfile
from pathlib import Path

from shoal import env
from shoal.errors import ShoalError

PR_SET_PDEATHSIG = 1


def owner() -> int | None:
    """The pid of this process's launcher's supervisor (None: not supervised)."""
    text = os.environ.get(env.SUPERVISED, "")
    return int(text) if text.isdigit() else None


def folder(owner: int) -> Path:
    """The supervisor's folder (`owner`: its pid); the supervisor removes it when it ends."""
    return Path(tempfile.gettempdir()) / f"shoal-control-of-{owner}"


def is_private(path: Path, check: bool = True) -> bool:
    """Whether `path` is a directory of this user that no one else may enter (a member unpickles its
    journal there, and the supervisor trusts the pids: another user's folder would be theirs to write);
    with `check`, ShoalError (one sentence) when it exists and is not."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return False
    ok = stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o077
    if check and not ok:
        raise ShoalError(
            f"{path}, where this machine's launcher keeps its control-plane journals and server pids for its "
            "supervisor, is not a private folder of this user: remove it and start the job again"
        )
    return ok


def private_folder(owner: int) -> Path:
    """The supervisor's folder, made private (0700) if it is not there; ShoalError if it is not private."""
    path = folder(owner)
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700)
    is_private(path)
    return path


def tell(name: str, pid: int) -> None:
    """Under a supervisor, leave `pid` as `<name>.pid` (e.g. member0, server1) in its folder: a process that
    serves until the launcher ends it, not a worker."""
    supervisor = owner()
    if supervisor is not None:
        (private_folder(supervisor) / f"{name}.pid").write_text(str(pid))


def serving_pids(owner: int) -> set[int]:
    """The pids the launcher left with `tell` (control-plane members and parameter servers)."""
    pids: set[int] = set()
    with contextlib.suppress(OSError):
        for path in [*folder(owner).glob("member*.pid"), *folder(owner).glob("server*.pid")]:
            with contextlib.suppress(OSError, ValueError):
                pids.add(int(path.read_text()))
    return pids


def die_with_launcher() -> None:
    """In a worker that a shoal launcher started (`shoal.init()`): be SIGKILLed as soon as the launcher dies.

    Otherwise a worker whose launcher was killed runs on, alone: under a supervisor until it ends it
    (with short steps, into steps the others will redo, or to the job's end, which the others then
    wait for); without one to the job's end, its output in its log files only, with no agent to
    restart it or the others, which restart (or stop) theirs only once their workers fail.
    """
    supervisor = owner()
    if supervisor is None and not os.environ.get(env.LAUNCHED):
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if supervisor is not None and os.getppid() == supervisor:  # the launcher died before that: an orphan
        os.kill(os.getpid(), signal.SIGKILL)
