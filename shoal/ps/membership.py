"""Which workers a parameter server counts as alive, and which process speaks for each.

Why the servers need it: `shoal run --max-restarts N` (and `shoal train` with
`launch.max_restarts`) keeps the servers running while torch's elastic agent
restarts the workers, so a server must notice a worker that died or hangs, stop
waiting for it where the consistency rule allows (ASP, SSP; BSP waits for its
replacement), and take the replacement back at the clock the server holds for
it, without ever applying one of its pushes twice.

Detection, and why this way: ZeroMQ's own heartbeats on the server's ROUTER
(ZMTP PING/PONG every `HEARTBEAT_IVL_MS`) close the connection of a worker
silent for `HEARTBEAT_TIMEOUT_MS`; the worker's side is answered by its ZeroMQ
I/O thread, which runs without Python's GIL, so a worker busy computing still
answers and only a stopped (SIGSTOP) or frozen one does not. A killed worker's
connection is closed by its kernel at once. Every `PROBE_S` the server sends
each live worker a small authenticated PING with ROUTER_MANDATORY set: ZeroMQ
refuses it (EHOSTUNREACH) once the connection is gone, and the worker is
declared departed. So a SIGKILL is seen within about `PROBE_S` and a SIGSTOP
within `HEARTBEAT_IVL_MS + HEARTBEAT_TIMEOUT_MS + PROBE_S` (about 4.5 s: the
lease; a shorter stall only delays the job), with no thread, no extra socket
and no other process. The launcher's pids would not
do: torch's agent owns the workers (and restarts them itself) and a worker on
another machine is out of the launcher's reach; control-plane leases need a
keep-alive thread that holds the GIL and a control plane, which not every job runs.

Fencing: each worker process draws a random `incarnation`, uses it as its
ZeroMQ routing id and sends it in its INIT. A server refuses messages for
worker w while w is departed, and from any connection of an earlier
incarnation of w (the late pushes of a hung worker that wakes after it was
declared dead and replaced): they are dropped and answered with ERROR, so that process stops and the
launcher's restart path runs; a fenced process that reconnects is sent that
ERROR at the next probe even if it sends nothing. An INIT that repeats an
incarnation already seen is a replay and is dropped.

The departure event the server publishes names the worker's pid (from its
INIT); the launcher that started the worker SIGKILLs it (`shoal.ps.monitor`),
so a hung worker takes torch's agent's restart path at once instead of when
it wakes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import zmq

from shoal.comm.wire import Codec, WireError
from shoal.ps import server_state
from shoal.ps.protocol import ERROR, PARAMS, PING

if TYPE_CHECKING:
    from shoal.ps.server import Server

log = logging.getLogger("shoal.ps.membership")

HEARTBEAT_IVL_MS = 200
"""ZeroMQ PING interval on the server's connections to workers."""
HEARTBEAT_TIMEOUT_MS = 4000
"""A connection with no traffic this long after a PING is closed (a stopped or frozen worker): the lease.
Longer than the stalls a loaded machine or a short SIGSTOP cause, which must only delay a job."""
PROBE_S = 0.25
"""How often the server checks that each live worker's connection still exists."""
MAX_INCARNATION = 64
"""The longest incarnation token accepted (it is also a ZeroMQ routing id)."""


def heartbeat(sock: zmq.Socket) -> None:
    """Have ZeroMQ close a server connection whose worker stops answering PINGs."""
    sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
    # No HEARTBEAT_TTL: with it a worker would drop its connection to a server that hangs, and with
    # it the pushes ZeroMQ had already written there; without, they arrive when the server goes on.


class Membership:
    """Per worker: its current incarnation and connection, and whether it is alive.

    `on_depart(worker)` is called once when a live worker's connection is found
    gone; the server then stops counting it (SSP) and drops its waiting reads.
    """

    def __init__(self, sock: zmq.Socket, codec: Codec, index: int, on_depart: Callable[[int], None]) -> None:
        self.sock = sock
        self.codec = codec
        self.index = index
        self.on_depart = on_depart
        self.ident: dict[int, bytes] = {}
        self.pids: dict[int, int] = {}
        self.fenced: dict[bytes, int] = {}
        """Connections of departed or replaced processes not yet told to stop, and their worker."""
        self.stale: dict[bytes, int] = {}
        """Every connection of a departed or replaced process, and its worker."""
        self.seen: dict[int, set[str]] = {}
        self.departed: set[int] = set()
        self.finished: set[int] = set()
        """Workers that said goodbye: their connection closing is no death."""
        self.departures: list[dict] = []
        """The server's record: {"worker", "clock", "unix_time"} per departure."""
        self.rejoins: list[dict] = []
        """{"worker", "clock", "unix_time"} per rejoin."""
        self.last_probe = 0.0

    def admit(self, src: int, incarnation: object, ident: bytes) -> bool:
        """An INIT from `src`: True if it comes from a new incarnation (its sequence numbers start
        afresh); WireError for a repeated or malformed one. Without a token only a first join is
        possible (and the sender is who the ROUTER says)."""
        if incarnation is None:
            return src not in self.ident
        if not isinstance(incarnation, str) or not 1 <= len(incarnation) <= MAX_INCARNATION:
            raise WireError("malformed", f"bad incarnation {str(incarnation)[:80]!r}")
        seen = self.seen.setdefault(src, set())
        if incarnation in seen:
            raise WireError("replayed", f"worker {src}'s incarnation {incarnation} joined before")
        seen.add(incarnation)
        return True

    def joined(self, src: int, ident: bytes, pid: object = None) -> None:
        """`src` now speaks through `ident` (process `pid`) and is alive."""
        old = self.ident.get(src)
        if old is not None and old != ident:
            self.fenced[old] = self.stale[old] = src
        self.ident[src] = ident
        if isinstance(pid, int) and not isinstance(pid, bool) and pid > 0:
            self.pids[src] = pid
        self.departed.discard(src)
        self.finished.discard(src)

    def rejoined(self, src: int, ident: bytes, clock: int, pid: object = None) -> None:
        self.joined(src, ident, pid)
        self.rejoins.append({"worker": src, "clock": clock, "unix_time": time.time()})
        log.warning("server %d: worker %d rejoined at clock %d", self.index, src, clock)

    def speaks_for(self, src: int, ident: bytes) -> bool:
        """Whether a message from `ident` may act for worker `src`: not while `src` is departed, never from
        a process it replaced. (Other connections are trusted as before: every message is authenticated.)"""
        return src not in self.departed and self.stale.get(ident) != src

    def stop_message(self, src: int) -> dict:
        return {
            "op": ERROR,
            "message": f"worker {src} was declared dead by parameter server {self.index} (its connection closed "
            "or it did not answer heartbeats) and its messages are refused; this process stops so that the "
            "launcher restarts it",
        }

    def refuse(self, src: int, ident: bytes) -> None:
        """Drop a message from a dead or replaced incarnation of `src`, and tell that process to stop."""
        self.send(ident, self.stop_message(src))
        self.fenced.pop(ident, None)
        raise WireError("stale_sender", f"worker {src}'s message came from a dead or replaced process")

    def probe(self, clocks: list[int]) -> None:
        """Every PROBE_S: declare departed each live worker whose connection is gone."""
        now = time.monotonic()
        if now - self.last_probe < PROBE_S:
            return
        self.last_probe = now
        ping = self.codec.encode({"op": PING})
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        try:
            gone = [w for w, ident in self.ident.items() if self.live(w) and not self.reachable(ident, ping)]
            for ident, w in list(self.fenced.items()):
                if self.reachable(ident, self.codec.encode(self.stop_message(w))):  # it woke up: told to stop
                    del self.fenced[ident]
        finally:
            self.sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
        for w in gone:
            self.declare(w, clocks[w])

    def declare(self, w: int, clock: int) -> None:
        """Worker `w` is departed (found gone here, or by the primary this backup follows)."""
        if not self.live(w) or w not in self.ident:
            return
        self.departed.add(w)
        self.fenced[self.ident[w]] = self.stale[self.ident[w]] = w
        self.departures.append({"worker": w, "clock": clock, "unix_time": time.time()})
        log.warning("server %d: worker %d departed at clock %d (its connection closed)", self.index, w, clock)
        self.on_depart(w)

    def live(self, w: int) -> bool:
        return w not in self.departed and w not in self.finished

    def reachable(self, ident: bytes, ping: list) -> bool:
        try:
            self.sock.send_multipart([ident, *ping], flags=zmq.NOBLOCK)
        except zmq.Again:
            return True  # connected, its queue full: alive (a hung peer's connection is closed by the heartbeat)
        except zmq.ZMQError as err:
            if err.errno == zmq.EHOSTUNREACH:
                return False
            raise
        return True

    def send(self, ident: bytes, header: dict) -> None:
        self.sock.send_multipart([ident, *self.codec.encode(header)])

    def stats(self) -> dict:
        return {"departures": self.departures, "rejoins": self.rejoins, "departed": sorted(self.departed)}


def rejoin(server: Server, ident: bytes, src: int, spec: dict, pid: object, seq: int) -> None:
    """A new process of worker `src` (its predecessor died or hangs) joins `server`'s running job.

    It is answered at once with the clock the server holds for it (and the
    current values, which it does not train with: it pulls for that clock next,
    answered when the rule allows). At once, because under BSP the others'
    pulls may wait for this worker's push, and torch's agent restarts them all,
    so they may meet in a collective of their own before that push."""
    gate = server.joined_gate(src)
    if spec != server.joined[src][1]:
        message = f"worker {src} rejoined with another model or optimizer than it joined with; it must build the same"
        server.members.send(ident, {"op": ERROR, "message": message})
        raise WireError("bad_init", message)
    clock = gate.pushed[src]
    server.joined[src] = (ident, spec)
    server.init_seq[src] = seq
    server.members.rejoined(src, ident, clock, pid)
    gate.absent.discard(src)
    server.bye.discard(src)
    server.pending = [r for r in server.pending if r.worker != src]
    server.parts.take(src)  # a push its predecessor sent only in part: the new process sends it again whole
    if server.pulls is not None:  # compressed pulls: the new process holds none of its predecessor's values
        server.pulls.replaced(src)
    publish(server, "rejoined", src, clock)
    header = {"op": PARAMS, "clock": clock, "applied": server.applied, "rejoined": True, "re": server.init_seq[src]}
    server.send(ident, header, [p.param for p in server.pieces.values()])
    server.answer_ready()


def depart(server: Server, worker: int) -> None:
    """`worker`'s connection is gone (it died or hangs): `server` stops counting it where the rule allows
    (SSP, ASP; BSP still needs its push) and forgets its waiting reads."""
    gate = server.joined_gate(worker)
    gate.absent.add(worker)
    server.pending = [r for r in server.pending if r.worker != worker]
    publish(server, "departed", worker, gate.pushed[worker])
    server.answer_ready()


def publish(server: Server, what: str, worker: int, clock: int) -> None:
    """An event line for the launcher's record (`ps_events.jsonl`): who left or came back, when, at which clock."""
    if server.events:
        message = f"server {server.index}: worker {worker} {what} at clock {clock}"
        event = {"message": message, what: worker, "clock": clock, "unix_time": time.time()}
        if worker in server.members.pids:
            event["pid"] = server.members.pids[worker]
        server.events.publish("event", event)


def publish_final(server: Server) -> None:
    """Every worker said goodbye: the server's own record of the run (pushes, rejoins, drops) for the launcher's."""
    if server.events:
        message = f"server {server.index}: every worker finished"
        server.events.publish("event", {"message": message, "final": server_state.stats(server)})
