"""The static rendezvous in numbered rounds, so that a machine's launcher started again rejoins the job.

torch's static rendezvous (`StaticTCPRendezvous`) has no rounds: a restart of
the workers passes it at once, and every round's workers meet in the one store
that machine 0's launcher holds, under the same keys (gloo's addresses, e.g.
`default_pg/0//cpu//0/<rank>`, are never removed). Workers that start seconds
apart (a machine's launcher started again by its supervisor, a slow machine)
then read a peer's address of the round before, and the one whose turn it is
to connect gets `Connection refused` or waits for a connection that never
comes. Here (backend `BACKEND`, used across machines with --max-restarts):

- every rendezvous is a numbered round that all machines' agents enter before
  any starts its workers (`join_round`): a machine enters the round after the
  last one it completed, or the newest one any machine entered if that is later,
  so a machine whose launcher was started again, which remembers no round
  (the store does, on machine 0), joins the round the others restart in;
- each round's workers get a bootstrap store of their own, so no round reads
  another's keys: machine 0's agent opens a fresh one for each round on a
  free port of its rendezvous address only (`shoal.comm.signed_store.listen`;
  torch's, which worker rank 0 would host, listens on every interface), names
  it in the round's keys, and closes the round before's; the workers connect
  to it as clients (`use_agent_store`);
- a launcher started again whose job had meanwhile finished on the other
  machines (its own was killed after the workers' last collective) does not
  wait for a round nobody enters: in its first round it watches for the
  finished agents' marker (`shoal.launch.finished`) and stops with
  `FinishedElsewhereError`, after counting itself in their exit barrier.
- in a parameter-server job (`FOLLOW` in the rendezvous's configs) an agent
  whose workers are healthy restarts them into a newer round that another
  machine entered (`waiting_in_newer_round`, torch's `num_nodes_waiting`: a
  membership change, which uses none of --max-restarts). A parameter-server
  worker goes on when another machine's worker dies (a data-parallel one fails
  in its next collective and so restarts anyway), so without it the machine
  whose workers, or whose launcher, died waits in the new round for agents that
  never come. Only there: a data-parallel worker restarted that way would see
  the restart count unchanged and might not resume from its recovery point
  (`shoal.train.recovery.restarted`); a parameter-server worker resumes from
  the clock the servers hold for it.
"""

from __future__ import annotations

import os
import time
from datetime import timedelta
from typing import Any

from torch.distributed import DistStoreError, PrefixStore, TCPStore  # pyright: ignore[reportPrivateImportUsage]
from torch.distributed.elastic.rendezvous import (
    RendezvousInfo,
    RendezvousParameters,
    RendezvousStoreInfo,
    RendezvousTimeoutError,
    rendezvous_handler_registry,
)
from torch.distributed.elastic.rendezvous.static_tcp_rendezvous import StaticTCPRendezvous, create_rdzv_handler

from shoal import env
from shoal.comm.signed_store import listen
from shoal.launch import finished

BACKEND = "shoal-static"
PREFIX = "shoal/rounds/"
FOLLOW = "follow_newer_rounds"
"""The rendezvous config that makes healthy workers follow a newer round (parameter-server jobs)."""


class RestartTimeoutError(RendezvousTimeoutError):
    """A round after the first (a restart of the workers) that not every machine came to: the job had started."""


def join_round(store: Any, node: int, nodes: int, timeout_s: float, finished_run: str = "") -> int:
    """Enter the next round as machine `node` of `nodes` and wait until all have entered it; its number.

    Raises `RendezvousTimeoutError`, naming the machines that did not come, after `timeout_s`. With
    `finished_run` (a launcher started again, in its first round), raises `FinishedElsewhereError`
    as soon as an agent of that run says its workers finished (`shoal.launch.finished`): the others,
    done, will not come, and their agents end as soon as this one counts itself in their exit barrier."""
    completed = f"{PREFIX}node{node}"
    last = int(store.get(completed)) if store.check([completed]) else 0
    number = _raise_to(store, f"{PREFIX}newest", last + 1)
    keys = [f"{PREFIX}{number}/node{i}" for i in range(nodes)]
    store.set(keys[node], "1")
    try:
        if finished_run:
            _wait_unless_finished(store, keys, timeout_s, finished_run)
        else:
            store.wait(keys, timedelta(seconds=timeout_s))
    except DistStoreError:
        missing = [i for i, key in enumerate(keys) if not store.check([key])]
        kind = RendezvousTimeoutError if number == 1 else RestartTimeoutError
        raise kind(
            f"machine(s) {', '.join(map(str, missing))} did not come to round {number} of the static rendezvous "
            f"within {timeout_s:g} s"
        ) from None
    store.set(completed, str(number))
    return number


def _wait_unless_finished(store: Any, keys: list[str], timeout_s: float, run_id: str) -> None:
    """`store.wait(keys)`, looking for the marker that the job finished meanwhile (DistStoreError: timeout)."""
    deadline = time.monotonic() + timeout_s
    while not store.check(keys):
        if finished.seen(store, run_id):
            finished.leave_exit_barrier(store, run_id)
            raise finished.FinishedElsewhereError()
        if time.monotonic() >= deadline:
            raise DistStoreError("timeout")
        time.sleep(finished.POLL_S)


def waiting_in_newer_round(store: Any, node: int, nodes: int) -> int:
    """How many of the `nodes` machines wait in a round after the last one machine `node` completed (0: none)."""
    newest, completed = f"{PREFIX}newest", f"{PREFIX}node{node}"
    if not store.check([newest, completed]):
        return 0  # before this machine's first round: nothing to follow yet
    number = int(store.get(newest))
    if number <= int(store.get(completed)):
        return 0
    return sum(store.check([f"{PREFIX}{number}/node{i}"]) for i in range(nodes))


def _raise_to(store: Any, key: str, at_least: int) -> int:
    """Atomically make the integer at `key` at least `at_least` (absent: 0); the value it has then."""
    current = b""
    while True:
        value = int(current) if current else 0
        if value >= at_least:
            return value
        got = store.compare_set(key, current, str(at_least).encode())
        if got == str(at_least).encode():
            return at_least
        current = got


class RoundedStaticRendezvous(StaticTCPRendezvous):
    """torch's static rendezvous (ranks from --node-rank, the store machine 0 holds), in rounds."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._bootstrap: TCPStore | None = None  # machine 0: this round's store for the workers
        # a launcher started again, until its first round: the job may have finished meanwhile
        self._watch = bool(os.environ.get(env.RELAUNCHED))

    def get_backend(self) -> str:
        return BACKEND

    @property
    def use_agent_store(self) -> bool:
        return True  # workers connect to the round's store that machine 0's agent holds

    follow = False
    """Restart healthy workers into a newer round (`FOLLOW`; see the module's last point)."""

    def num_nodes_waiting(self) -> int:
        if not self.follow or self._store is None:
            return 0
        try:
            return waiting_in_newer_round(PrefixStore(self.run_id, self._store), self.rank, self.world_size)
        except (DistStoreError, RuntimeError, ValueError):  # machine 0's store gone: the workers will say so
            return 0

    def next_rendezvous(self) -> RendezvousInfo:
        info = super().next_rendezvous()
        watch, self._watch = self._watch, False
        timeout_s = self.timeout.total_seconds()
        number = join_round(info.store, self.rank, self.world_size, timeout_s, self.run_id if watch else "")
        own = PrefixStore(f"{PREFIX}{number}/", info.store)
        port = None
        if self.rank == 0:
            self._bootstrap = None  # the round before's: its workers are gone
            self._bootstrap = listen(self.master_addr, 0, timeout_s)  # on machine 0's rendezvous address only
            port = self._bootstrap.port
        bootstrap = RendezvousStoreInfo.build(self.rank, own, local_addr=self.master_addr, server_port=port)
        return RendezvousInfo(info.store, self.rank, self.world_size, bootstrap)


def _create(params: RendezvousParameters) -> RoundedStaticRendezvous:
    base = create_rdzv_handler(params)  # its checks and defaults
    assert isinstance(base, StaticTCPRendezvous)
    timeout = int(base.timeout.total_seconds())
    handler = RoundedStaticRendezvous(
        base.master_addr, base.master_port, base.rank, base.world_size, base.run_id, timeout
    )
    handler.follow = params.get_as_bool(FOLLOW, False) or False
    return handler


def register() -> str:
    """Make `BACKEND` known to torch's launcher (again: a no-op); its name."""
    rendezvous_handler_registry.register(BACKEND, _create)
    return BACKEND
