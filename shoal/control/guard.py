"""A launcher's watch over its job's control plane.

A job started with a control plane keeps there what its failovers are decided
by (the shards' records, `shoal.ps.records`) and who is alive (each launcher's
liveness record, `launcher/<node>` under `members/`). Raft goes on with one
member of three lost; a member this launcher started that exits is started
again on its address from its journal (term, vote and log are there:
Raft-safe), so that a later loss is survived too (`member_exited`). While the
workers run (`guarding`), once no leader with a majority has renewed the
launcher's lease for a whole `LEASE_S`, nothing a failover needs can be
decided any more: the launcher stops its workers and the job ends with one
sentence naming the members that do not answer, instead of running on until a
failure it could not recover from. Only while they run: at the job's end the
machines' launchers end their members one after the other.
"""

from __future__ import annotations

import _thread
import contextlib
import signal
import threading
from collections.abc import Iterator

from shoal import logs
from shoal.control.base import ControlError, ControlPlane
from shoal.control.keeper import hold
from shoal.control.keeper import log as keeper_log
from shoal.errors import WorkerError

LEASE_S = 5.0
"""How long a job's workers run on without a majority of the control plane's members."""
MEMBER_RESTARTS = 3
"""How many times a launcher starts each of its members again."""
POLL_S = 0.2
FIRST_CALL_S = 120.0
"""How long the first call (the lease) may wait: members started with the job may still elect a first leader."""


def member_exited(members: list[str], i: int, code: int) -> str:
    """The line for a member of this launcher's that exited, which `shoal.respawn` starts again."""
    how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
    return f"control member {i} ({members[i]}) {how}; started again from its journal"


@contextlib.contextmanager
def guarding(spec: str, job_key: str, node_rank: int) -> Iterator[None]:
    """The block (the workers' run) under the job's control plane `spec` ("": none): this launcher holds
    `launcher/<node_rank>` there, and once that lease is lost the block is stopped as a SIGTERM would stop
    it and ends in WorkerError with one sentence."""
    if not spec:
        yield
        return
    from shoal.control.client import RaftControl, connect

    with connect(spec, key=job_key, timeout=FIRST_CALL_S) as ctl, logs.quiet(keeper_log.name):
        held = hold(ctl, f"launcher/{node_rank}", {}, ttl=LEASE_S)  # its warnings: the sentence says it
        ctl.timeout = round(LEASE_S / 3, 1)  # then a renewal gives up within a third of the lease
        stopped, said = threading.Event(), []

        def watch() -> None:
            while not stopped.wait(POLL_S):
                if held.lost.is_set():
                    said.append(lost(ctl, ctl.members if isinstance(ctl, RaftControl) else []))
                    if not stopped.is_set():
                        stop_main()
                    return

        watcher = threading.Thread(target=watch, name="shoal-control-guard", daemon=True)
        watcher.start()
        try:
            yield
        except BaseException:
            if said:  # what stopped the workers: the guard, not a signal or a worker of theirs
                raise WorkerError(said[0]) from None
            raise
        finally:
            stopped.set()
            watcher.join()
            held.close()


def lost(control: ControlPlane, members: list[str]) -> str:
    """One sentence: the control plane lost its majority; which of `members` do not answer; what to do."""
    if not members:  # etcd, whose members only it knows
        what = "did not answer"
    else:
        silent = [f"{i} on {address}" for i, address in enumerate(members) if not _answers(control, i)]
        who = f"member(s) {', '.join(silent)} do not answer" if silent else "no leader was elected"
        what = f"lost its majority ({len(members) // 2 + 1} of its {len(members)} members must answer; {who})"
    return (
        f"the control plane {what} for {LEASE_S:g} s, so no failover could be decided and the job was stopped; "
        "bring those members back or restore the network between them, then start the job again"
    )


def _answers(control: ControlPlane, i: int) -> bool:
    local = getattr(control, "local", None)  # the embedded members answer one by one
    if local is None:
        return False
    try:
        local(i, timeout=0.5)
    except ControlError:
        return False
    return True


def stop_main() -> None:
    """Raise in the main thread what a SIGTERM would: under torch's agent (whose handler raises its
    SignalException) it stops the workers; before the agent runs, a KeyboardInterrupt does."""
    if callable(signal.getsignal(signal.SIGTERM)):
        _thread.interrupt_main(signal.SIGTERM)
    else:
        _thread.interrupt_main()
