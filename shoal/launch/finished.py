"""The job finished elsewhere: what a launcher started again does when the others are already done.

A machine's launcher can be killed after its workers' last collective but
before they exit. The other machines' workers then finish and their agents
wait in torch's exit barrier; this machine's supervisor sees its orphaned
workers killed (PDEATHSIG), not exited 0, and starts the launcher again, whose
agent would wait for a rendezvous round that nobody enters any more. So:

- an agent whose workers all exited 0 writes a marker into the job's store
  (the raw store under the rendezvous: machine 0's for the static rounds, the
  endpoint's for c10d) under a key named after the rendezvous's run id
  (`mark`), before it waits in the exit barrier;
- a launcher started again (env `RELAUNCHED`), and only in its first
  rendezvous, watches for that marker while it waits (`shoal.launch.rounds`
  for the static rounds; `closing_when_finished` for c10d, which closes the
  rendezvous so that torch's wait ends) and stops with `FinishedElsewhereError`,
  which the command line reports in one line and exits 0. An agent that took
  part in a round never acts on the marker: its own workers' failure after
  the others finished is a real failure, reported as such.

The launcher started again also counts itself in the other agents' exit
barrier (`leave_exit_barrier`), so that they end at once instead of waiting its
timeout. torch keeps that barrier in the round's store, whose prefix under c10d
only its private state names; shoal's agents run it in the raw store under the
run id instead (`exit_store`), where the launcher started again finds it, and
the marker says how many agents it counts.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

from shoal.errors import ShoalError

PREFIX = "shoal/finished/"
POLL_S = 0.2
"""How often a waiting launcher looks for the marker."""
EXIT_BARRIER = "torchelastic/agent/terminal_state"
"""torch's exit-barrier key prefix in the agents' store (`_TERMINAL_STATE_SYNC_ID`, torch 2.13)."""


class FinishedElsewhereError(ShoalError):
    """The job had finished on the other machines when this machine's launcher was started again: exit 0."""

    exit_code = 0

    def __init__(self) -> None:
        super().__init__(
            "the job had finished on the other machines when this machine's launcher was started again "
            "(its workers here were ended after the job's last collective); nothing left to run here"
        )


def key(run_id: str) -> str:
    return f"{PREFIX}{run_id}"


def raw(store: Any) -> Any:
    """The store under any `PrefixStore`s: the marker's key does not depend on a round's prefix."""
    while hasattr(store, "underlying_store"):
        store = store.underlying_store
    return store


def mark(store: Any, run_id: str, nodes: int) -> None:
    """Say in the job's store that this agent's workers all finished well, and how many agents its exit
    barrier counts (best effort: the job is done)."""
    with contextlib.suppress(Exception):
        raw(store).set(key(run_id), str(nodes))


def exit_store(store: Any, run_id: str) -> Any:
    """Where the agents of run `run_id` wait for each other at the end: one place per job (the barrier
    runs once, at the job's successful end), found from the raw store alone."""
    from torch.distributed import PrefixStore  # pyright: ignore[reportPrivateImportUsage]

    return PrefixStore(f"shoal/exit/{run_id}", raw(store))


def seen(store: Any, run_id: str) -> bool:
    """Whether an agent of the job said its workers finished well."""
    try:
        return bool(raw(store).check([key(run_id)]))
    except Exception:  # the store went away with the job
        return False


def leave_exit_barrier(store: Any, run_id: str) -> None:
    """Count this machine in the exit barrier of run `run_id` (`exit_store`), as its agent would have had
    it not been killed, so that the agents waiting in it end now (best effort)."""
    with contextlib.suppress(Exception):
        nodes = int(raw(store).get(key(run_id)))
        barrier = exit_store(store, run_id)
        if barrier.add(f"{EXIT_BARRIER}/num_members", 1) == nodes:
            barrier.set(f"{EXIT_BARRIER}/last_member", "<val_ignored>")


@contextlib.contextmanager
def closing_when_finished(host: str, port: int, run_id: str, nodes: int) -> Iterator[threading.Event]:
    """While the block runs (a launcher started again waits in torch's c10d rendezvous), watch the job's
    store at `host:port` for the marker of `run_id`; once it is there, set the event yielded and close the
    rendezvous, so that the wait ends (`RendezvousClosedError`, or `RendezvousGracefulExitError` for a node
    torch kept as a spare; the job is over: the other agents close it themselves when they end). It is
    closed through a handler of the watcher's own, as another machine would: the waiting one's state is
    not shared across threads."""
    found, done = threading.Event(), threading.Event()

    def watch() -> None:
        from torch.distributed import TCPStore  # pyright: ignore[reportPrivateImportUsage]
        from torch.distributed.elastic.rendezvous.c10d_rendezvous_backend import C10dRendezvousBackend
        from torch.distributed.elastic.rendezvous.dynamic_rendezvous import DynamicRendezvousHandler

        try:
            store = TCPStore(host, port, is_master=False, timeout=timedelta(seconds=30))
            while not done.wait(POLL_S):
                if seen(store, run_id):
                    found.set()
                    leave_exit_barrier(store, run_id)
                    backend = C10dRendezvousBackend(store, run_id)
                    DynamicRendezvousHandler.from_backend(run_id, store, backend, nodes, nodes).set_closed()
                    return
        except Exception:  # the store went away: the waiting rendezvous says so itself
            return

    thread = threading.Thread(target=watch, name="shoal-finished-watch", daemon=True)
    thread.start()
    try:
        yield found
    finally:
        done.set()
