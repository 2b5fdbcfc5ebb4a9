"""A new process in place of a lost one: it becomes the backup again of the shards that process held.

Why: after a failover each shard the dead process held goes on with one copy
(`shoal.ps.replication`), so a second failure would lose it. The launcher starts
a process in the dead one's place (`shoal.ps.servers`, `SHOAL_PS_REPLACEMENT`),
which, for each such shard:

1. waits until the shard's record names a primary other than itself and no backup
   (the survivor has claimed the shard), then opens a replica and a link as a
   backup does and publishes the replica's address in its slot, where a worker
   started later reads it;
2. asks that primary (`ADD_BACKUP`, signed as any request, with a one-time id) to
   take it as backup, again every `ASK_S` until answered;
3. the primary, between two inputs, moves the record to the next generation with
   this process as backup (compare-and-set, as a claim), connects its link, sends
   its whole state over it (`shoal.ps.snapshot`) and then every input as before,
   holding its replies until the new backup acknowledged them; and tells every
   worker where the new backup listens (`NEW_BACKUP`), so that a takeover by it later
   reaches them;
4. the replacement installs the state, then applies the inputs: from here on it
   is an ordinary backup, which takes the shard over if the primary goes.

A replacement that gets no state within the servers' timeout, or whose primary
goes before the state is whole, gives the shard up (its state is in doubt).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import zmq

from shoal.comm import replay
from shoal.comm.wire import WireError
from shoal.errors import ShoalError
from shoal.ps import snapshot
from shoal.ps import store as ps_store
from shoal.ps.protocol import ADD_BACKUP, NEW_BACKUP, OBSERVER
from shoal.ps.records import Records
from shoal.ps.replication import PRIMARY, Claim, PrimaryLink

if TYPE_CHECKING:
    from shoal.ps.server import Server

log = logging.getLogger("shoal.ps.replacement")

ASK_S = 1.0
"""How often a replacement asks the primary again until its state arrives."""
MAX_ADDRESS = 300
"""The longest published address (endpoint, session, CURVE flag) accepted in a request."""


class Joining:
    """A replacement backup's first phase: asking the primary, then taking its state."""

    def __init__(
        self,
        server: Server,
        records: Records,
        primary: ps_store.ServerAddress,
        holders: frozenset[int],
    ) -> None:
        assert server.link is not None and not isinstance(server.link, PrimaryLink)
        self.server, self.records, self.holders = server, records, holders
        self.primary = primary
        self.sock = server.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        server.codec.transport.connect(self.sock)
        self.sock.connect(primary.endpoint)
        mine = ps_store.ServerAddress(server.endpoint, server.index, server.session)
        self.request = {
            "op": ADD_BACKUP,
            "src": OBSERVER,
            "process": server.process,
            "link": server.link.address.value,
            "replica": mine.value,
            **primary.header,
        }
        self.asked = 0.0
        self.deadline = time.monotonic() + server.timeout_s
        self.state: dict | None = None
        self.tensors: list = []

    def wait(self, primary_lost: bool) -> None:
        """Ask (again) while no state has come; give the shard up if it cannot come any more."""
        now = time.monotonic()
        if primary_lost:
            return self._give_up("its primary went before the shard's state was whole")
        if now > self.deadline:
            return self._give_up(f"no state came from the primary within {self.server.timeout_s:g}s")
        if self.state is None and now - self.asked >= ASK_S:
            self.asked = now
            self.sock.send_multipart(self.server.codec.encode({**self.request, "seq": replay.one_time_id()}))

    def receive(self, frames: list) -> None:
        """One message of the primary's state (the header first, then a tensor each); the last installs it."""
        server = self.server
        try:
            header, tensors = server.codec.decode(frames)
            if self.state is None:
                self.state = header
            elif len(tensors) == 1 and header.get("tensor") == len(self.tensors):
                self.tensors += tensors
            else:
                raise WireError("malformed", "a state message out of order")
            if len(self.tensors) < self.state.get("count", 0):
                return
            snapshot.load(server, self.state, self.tensors)
            gen, primary, backup = self.state["record"]
            record = ps_store.ShardRecord(int(gen), int(primary), int(backup))
        except (WireError, KeyError, TypeError, ValueError, StopIteration) as exc:
            return self._give_up(f"the primary's state does not install ({exc})")
        server.claim = Claim(self.records, server.index, record, self.holders)
        self.close()
        server.joining = None
        log.warning(
            "server process %d is the backup of shard %d again (generation %d, clock %d)",
            server.process,
            server.index,
            record.gen,
            server.gate.bsp_done if server.gate else 0,
        )

    def _give_up(self, why: str) -> None:
        self.close()
        self.server.joining = None
        self.server.fenced(why)

    def close(self) -> None:
        self.sock.close(linger=0)


def add_backup(server: Server, request: dict) -> None:
    """The primary's side of a replacement's request: take it as backup (see the module's steps 3)."""
    claim = server.claim
    if server.role != PRIMARY or claim is None or server.gate is None or server.link is not None:
        raise WireError("not_now", "only a started primary without a backup takes one")
    process = request.get("process")
    if (
        not isinstance(process, int)
        or isinstance(process, bool)
        or process == server.process
        or process not in claim.holders
        or claim.record.backup is not None
    ):
        raise WireError("malformed", f"process {process!r} cannot be shard {server.index}'s backup")
    try:
        link = _address(server.index, request.get("link"))
        replica = _address(server.index, request.get("replica"))
    except ShoalError as err:
        raise WireError("malformed", str(err)) from None
    if not claim.add(process):
        raise WireError("not_now", claim.lost_why)
    server.link = PrimaryLink(server.ctx, server.codec, link, server.out_now)
    state, tensors = snapshot.take(server)
    state["record"] = list(claim.record)
    server.link.forward("snapshot", frames=server.codec.encode(state))
    for i, tensor in enumerate(tensors):
        server.link.forward("snapshot", frames=server.codec.encode({"tensor": i}, [tensor]))
    gen = claim.record.gen
    for w, ident in server.members.ident.items():
        if server.members.live(w):
            server.sock.send_multipart(
                [ident, *server.codec.encode({"op": NEW_BACKUP, "gen": gen, "replica": replica.value})]
            )
    message = f"server process {process} is shard {server.index}'s backup again (generation {gen})"
    log.warning("%s", message)
    if server.events:
        server.events.publish(
            "event", {"message": message, "backup": server.index, "gen": gen, "unix_time": time.time()}
        )


def _address(shard: int, value: object) -> ps_store.ServerAddress:
    if not isinstance(value, str) or len(value) > MAX_ADDRESS or not value.startswith(("tcp://", "ipc://")):
        raise ShoalError(f"{str(value)[:80]!r} is not a server address")
    return ps_store.ServerAddress.parse(shard, value)
