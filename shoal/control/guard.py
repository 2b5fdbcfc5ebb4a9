"""A launcher's watch over its job's control plane, for as long as the job runs.

A job started with a control plane keeps there what its failovers are decided
by (the shards' records, `shoal.ps.records`) and who is alive (each launcher's
liveness record, `launcher/<node>` under `members/`). Raft goes on with one
member of three lost; a member of this machine that exits is started again
on its address from its journal (term, vote and log are there: Raft-safe), so
that a later loss is survived too. When no leader with a majority renews the
launcher's lease for a whole `LEASE_S`, nothing a failover needs can be
decided any more: the launcher stops its workers and the job ends with one
sentence naming the members that do not answer, instead of running on until
a failure it could not recover from.
"""

from __future__ import annotations

import _thread
import signal
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Callable

from shoal.control.base import ControlError, ControlPlane
from shoal.control.keeper import Held, hold
from shoal.procfs import state_of

LEASE_S = 5.0
"""How long the job runs on without a majority of the control plane's members."""
MEMBER_RESTARTS = 3
"""How many times a launcher starts each of its members again."""
POLL_S = 0.2


class Guard:
    """Holds `name`'s liveness record on `control`; restarts this machine's `local` members (index to
    process) through `restart(index)`; sets `sentence` and stops the main thread once the lease is lost."""

    def __init__(
        self,
        control: ControlPlane,
        name: str,
        members: list[str],
        local: dict[int, subprocess.Popen] | None = None,
        restart: Callable[[int], subprocess.Popen] | None = None,
    ) -> None:
        self.control = control
        self.name = name
        self.members = members
        self.local = local if local is not None else {}
        self.restart = restart
        self.restarts: Counter[int] = Counter()
        self.sentence = ""
        """Why the job was stopped ("" while it runs)."""
        self.held: Held | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="shoal-control-guard", daemon=True)

    def start(self) -> Guard:
        self.held = hold(self.control, self.name, {"members": len(self.members)}, ttl=LEASE_S)
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop watching (before this machine's members are ended) and give the liveness record up."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        if self.held is not None:
            self.held.close()

    def _run(self) -> None:
        assert self.held is not None
        while not self._stop.wait(POLL_S):
            if self.held.lost.is_set():
                self.sentence = self._lost()
                if not self._stop.is_set():
                    stop_main()
                return
            self._restart_exited()

    def _restart_exited(self) -> None:
        for i, proc in list(self.local.items()):
            code = proc.poll()
            if code is None or self.restart is None or self.restarts[i] >= MEMBER_RESTARTS or self._stop.is_set():
                continue
            self.restarts[i] += 1
            how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
            print(
                f"shoal: control member {i} ({self.members[i]}) {how}; started again from its journal "
                f"({self.restarts[i]} of {MEMBER_RESTARTS})",
                file=sys.stderr,
                flush=True,
            )
            self.local[i] = self.restart(i)

    def _lost(self) -> str:
        """One sentence: which members do not answer, and what to do."""
        silent = []
        for i, address in enumerate(self.members):
            if self._answers(i):
                continue
            proc = self.local.get(i)
            if proc is not None and proc.poll() is not None:
                how = " (exited)"
            elif proc is not None and state_of(proc.pid) in ("T", "t"):
                how = " (stopped)"
            else:
                how = ""
            silent.append(f"{i} on {address}{how}")
        if not self.members:  # etcd, or members started elsewhere: only they know who is missing
            lost = "did not answer"
        else:
            who = f"member(s) {', '.join(silent)} do not answer" if silent else "no leader was elected"
            need = f"{len(self.members) // 2 + 1} of its {len(self.members)} members must answer"
            lost = f"lost its majority ({need}; {who})"
        return (
            f"the control plane {lost} for {LEASE_S:g} s, so no failover could be decided and the job was "
            "stopped; bring those members back or restore the network between them, then start the job again"
        )

    def _answers(self, i: int) -> bool:
        local = getattr(self.control, "local", None)  # the embedded members answer one by one
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
