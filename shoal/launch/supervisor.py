"""Start this machine's launcher again when it is killed.

Why: torch's elastic agent restarts workers, but nothing restarts the agent
(the launcher) itself. When the launcher of a machine dies (SIGKILL, the OOM
killer), the agents on the other machines restart their workers and wait in
the rendezvous for this machine until the rendezvous timeout (under the static
rendezvous, in the round they restart in: `shoal.launch.rounds`); on a cluster
systemd or Kubernetes would start it again, for a job started by hand nobody
does. So on a machine where that helps (`reason_to_supervise`), the process
the user started only supervises: it runs the real launcher as its child,
the same command again, and when the child dies by a signal it starts it
again, up to `--max-restarts` times, first ending whatever the dead launcher
left running (its workers, in their own sessions, would otherwise go on with
the old round; its control-plane members, which the new launcher starts
again on the same addresses from their journals in its folder, `shoal.supervised`; its
parameter servers, which go by themselves at once, whose shards the other
machines' copies have taken over and which the new launcher starts again as
replacements, `shoal.ps.servers`). It is made a child subreaper (prctl), so
those orphans become its children and are found by parent pid, never by name.
It imports no torch and holds nothing else: if the supervisor itself is
killed, the launcher goes on and the job with it.

A launcher that stays stopped (SIGSTOP: a hang) for the process group's
timeout is ended the same way and started again, unless all its workers had
already finished well (then the job is done here and the supervisor exits 0;
its control-plane members and parameter servers, which run until the launcher
ends them, are not counted as workers). So is a killed launcher whose workers,
orphaned, had all exited 0 by themselves before they were ended (PDEATHSIG
reaches a worker only once the launcher's exit is complete, and with short
steps it may have finished the job by then): a launcher started again would
wait in a rendezvous that the others, done, never come to.
A killed launcher whose orphaned workers were ended before they exited is
started again even when they had passed the job's last collective; that one
finds the job marked finished by the other machines' agents and exits 0
(`shoal.launch.finished`), which the supervisor passes on.
A launcher that exits by itself (a finished job, a failed one, Ctrl-C, or a
SIGTERM/SIGHUP the supervisor passed on) is not started again; whatever it
left running is ended.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from shoal import env, supervised
from shoal.comm.netif import is_this_machine
from shoal.config import split_endpoint
from shoal.procfs import children_of, state_of

PR_SET_CHILD_SUBREAPER = 36
PASSED_ON = (signal.SIGTERM, signal.SIGHUP)
"""Signals the supervisor forwards to its launcher (Ctrl-C's SIGINT reaches the launcher itself: same group)."""


def reason_to_supervise(
    nnodes: int,
    backend: str,
    endpoint: str,
    max_restarts: int,
    *,
    servers: int,
    control: str,
    node_rank: int,
    replication: int | None = None,
) -> str:
    """'' when a launcher started again here rejoins the job, else why it would not (so it is not supervised).

    It rejoins a dynamic rendezvous (c10d, etcd), where torch's agents on the other
    machines take a machine that comes back, and the static one, which runs in rounds
    with restarts (`shoal.launch.rounds`): the new agent joins the round the others
    restart their workers in. The machine that holds the job's store dies with it:
    machine 0 under the static rendezvous, and under c10d the machine whose address
    is the endpoint. Parameter servers started here come back when their shards
    are replicated (`replication`, by default with 2 servers or more): when the
    launcher dies they die with it, the copies on other machines take their
    shards over (machine 0, refused anyway, is the only one that can hold both
    copies of a shard), and the new launcher starts them again as replacements,
    which become those shards' backups again (`shoal.ps.replacement`); a shard
    with one copy would be lost with them. Embedded control-plane members
    (`control` "raft") come back as the same members (`shoal.control.launch`),
    except on machine 0, whose launcher holds the store where the members'
    addresses meet; any other spec starts nothing here.
    """
    if os.environ.get(env.SUPERVISED):
        return "already supervised"
    if nnodes <= 1 or max_restarts <= 0:
        return "one machine, or no restarts"
    if backend == "static" and node_rank == 0:
        return "this machine holds the static rendezvous's store"
    if servers and (replication if replication is not None else min(servers, 2)) < 2:
        return "parameter servers run here with one copy of each shard, which would be lost with the launcher"
    if backend == "c10d" and _is_local(endpoint):
        return "this machine holds the c10d store"
    if control == "raft" and node_rank == 0:
        return "this machine holds the store where the control plane's members meet"
    return ""


def _is_local(endpoint: str) -> bool:
    host, _ = split_endpoint(endpoint)
    try:
        address = socket.gethostbyname(host)
    except OSError:
        return True  # the launcher says what is wrong with it
    return is_this_machine(address)


def supervise(argv: list[str], restarts: int, hang_s: float) -> int:
    """Run `python -m shoal.cli argv...` and start it again when a signal kills it, or when it stays
    stopped (a hang) for `hang_s` while its workers still run; its exit code."""
    _become_subreaper()
    stopping = False
    child: subprocess.Popen | None = None

    def pass_on(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        if child is not None and signum in PASSED_ON:
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(signum)

    for sig in (*PASSED_ON, signal.SIGINT):
        signal.signal(sig, pass_on)
    started = 0
    environ = {**os.environ, env.SUPERVISED: str(os.getpid())}
    try:
        while True:
            child = subprocess.Popen([sys.executable, "-m", "shoal.cli", *argv], env=environ)
            reaped: dict[int, int] = {}  # orphans that ended while the launcher's own exit was awaited
            code, hung = _wait(child, hang_s, reaped)
            if hung is None and (code >= 0 or stopping):
                end_orphans()  # anything it started and left behind (none when it ended its own)
                return code if code >= 0 else 128 - code
            members = supervised.serving_pids(os.getpid())  # they serve until the launcher ends them
            ended = {**reaped, **end_orphans()}
            if hung is not None:
                if hung and all(ended.get(pid) == 0 for pid in hung):  # its workers had all finished, and well
                    _say(
                        f"this machine's launcher hung (stopped for {hang_s:g} s) after its workers finished; ended it"
                    )
                    return 0
                what = f"hung (stopped for {hang_s:g} s)"
            else:
                what = f"was killed by {_signal_name(-code)}"
                workers = [c for pid, c in ended.items() if pid not in members]
                if workers and all(c == 0 for c in workers):  # they finished by themselves, and well
                    _say(f"this machine's launcher {what} after its workers finished; the job is done here")
                    return 0
            if started >= restarts:
                _say(
                    f"this machine's launcher {what} and was restarted {restarts} time(s), all that --max-restarts "
                    "allows; the job goes on without this machine only if the others take it"
                )
                return 128 - code
            started += 1
            environ[env.RELAUNCHED] = str(started)
            _say(
                f"this machine's launcher {what}; ended the {len(ended)} process(es) it left and started it "
                f"again ({started} of {restarts})"
            )
    finally:
        remove_recovery_folders(os.getpid())
        shutil.rmtree(supervised.folder(os.getpid()), ignore_errors=True)


def _say(line: str) -> None:
    print(f"shoal: {line}", file=sys.stderr, flush=True)


def _wait(child: subprocess.Popen, hang_s: float, reaped: dict[int, int]) -> tuple[int, list[int] | None]:
    """The launcher's exit code (negative: the signal that killed it); and, if it stayed stopped for `hang_s`
    and was SIGKILLed here, its children then (else None). An orphan that ends meanwhile is reaped here, its
    exit code put in `reaped`: when the launcher is killed, its orphaned workers may die (PDEATHSIG) and be
    reported before the launcher is."""
    stopped_since: float | None = None
    while True:
        pid, status = os.waitpid(-1, os.WUNTRACED | (os.WNOHANG if stopped_since is not None else 0))
        if pid == child.pid and os.WIFSTOPPED(status):
            stopped_since = time.monotonic()
        elif pid == child.pid:
            child.returncode = os.waitstatus_to_exitcode(status)
            return child.returncode, None
        elif pid and not os.WIFSTOPPED(status):
            reaped[pid] = os.waitstatus_to_exitcode(status)
        elif pid == 0 and stopped_since is not None:  # still stopped? (SIGCONT is not reported)
            if state_of(child.pid) not in ("T", "t"):
                stopped_since = None
            elif time.monotonic() - stopped_since >= hang_s:
                members = supervised.serving_pids(os.getpid())  # they serve until the launcher ends them
                workers = [pid for pid in children_of(child.pid) if pid not in members]
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child.pid, signal.SIGKILL)
                os.waitpid(child.pid, 0)
                child.returncode = -signal.SIGKILL
                return child.returncode, workers
            else:
                time.sleep(0.2)


def _become_subreaper() -> None:
    """Orphaned descendants become this process's children (Linux); without it they go to init."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def end_orphans(timeout_s: float = 10.0) -> dict[int, int]:
    """SIGKILL and reap every child of this process (what a dead launcher left to it); each one's exit code
    (negative: a signal; a process that had ended by itself keeps its own)."""
    ended: dict[int, int] = {}
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        pids = children_of(os.getpid())
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)  # a zombie ignores it and keeps its status
        for pid in pids:
            with contextlib.suppress(ChildProcessError):
                ended[pid] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    return ended


def recovery_folder_prefix(owner: int) -> str:
    """The name of a launcher's recovery folder in /dev/shm begins with this; `owner` is the supervisor's pid
    when there is one, so that a launcher started again finds its predecessor's recovery points."""
    return f"shoal-recovery-{owner}-"


def remove_recovery_folders(owner: int) -> None:
    with contextlib.suppress(OSError):
        for folder in Path("/dev/shm").glob(recovery_folder_prefix(owner) + "*"):
            shutil.rmtree(folder, ignore_errors=True)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"
