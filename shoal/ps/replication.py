"""Primary-backup replication of a parameter-server shard: no acknowledged update is lost.

Why this way. A server's state is a deterministic function of the inputs it
applies in order (the workers' messages and the departures it declares), so
a backup that applies the same inputs in the same order holds the same
values, optimizer state and clocks, bit for bit. The primary forwards each
input it accepted (the worker's own signed frames, without a copy) over a
dedicated link before applying it (a pull: below), and holds every reply it
then produces until the backup has acknowledged the inputs it depends on: a
worker never sees a result the backup could not reproduce. The backup
acknowledges on receipt, before it applies, so the primary waits one round
trip, not for the backup's arithmetic (Li et al., OSDI 2014, acknowledge a
push once copied; so do we). An uncompressed pull changes nothing a reply shows (only its own bookkeeping:
sequence number, read waiting, staleness base), so it is not sent on its own:
it goes over with the next input, one link message for both, or after
`DEFER_S`, and its answer waits only for the inputs before it. A primary lost
in between loses nothing a worker saw: the worker resends a pull it got no
answer to, and the sequence numbers of its later messages are higher still.

Under ASP (every key of the shard, uncompressed pulls) a pull's answer does
not wait even for that: ASP promises no particular order of pushes, so the
answer goes out at once, and it names (`safe`) the newest of this worker's
messages the backup holds. That, not the answer, acknowledges a push: the
worker keeps every message after `safe` and resends it to a promoted backup,
which applies it exactly once; the values the worker read may then have had a
push applied that the new primary applies later, in another order, which ASP
allows. Where the order is the result (BSP, bit for bit) or the clocks are
(SSP), answers wait as above.

Failure. Each side watches the link: ZeroMQ heartbeats on it close a
connection silent for `LEASE_S` (a stopped peer), and a killed peer's kernel
closes it at once; the socket monitor reports the close. Whoever sees the
other go claims the shard's record (`shoal.ps.records`: in the job's control
plane when it runs one, else in its store; compare-and-set of "GEN PRIMARY
BACKUP"): the backup to become primary, the primary to go on alone. Exactly one claim of a generation wins; the loser is
fenced: it stops serving the shard, and anything it sends later names an old
generation or is never acknowledged. A primary that cannot reach the store
(a partition) cannot win and stops acknowledging: its replies wait for a
backup acknowledgement that never comes. A promoted backup tells every
worker (`TAKEOVER` with the new generation); each worker resends what that
shard has not answered yet (`shoal.ps.client`), and the sequence numbers
make every resent message apply exactly once.

A shard left with one copy gets a new backup when the launcher starts a
process in place of the one that went (`shoal.ps.replacement`), so a second
failure later is survived too.
"""

from __future__ import annotations

import logging
import queue
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

import zmq
from zmq.utils.monitor import recv_monitor_message

from shoal.comm.wire import Codec, WireError
from shoal.ps import store as ps_store
from shoal.ps.protocol import ACK, REPLICA, REPLICATE, TAKEOVER
from shoal.ps.records import Records

if TYPE_CHECKING:
    from shoal.ps.server import Server

log = logging.getLogger("shoal.ps.replication")

PRIMARY = "primary"
BACKUP = "backup"
FENCED = "fenced"
"""A replica that lost its shard to the other (or whose state is in doubt): it serves nothing more."""
LEASE_S = 1.5
"""A link silent this long after a heartbeat is closed: how long a stopped peer keeps its role.
ZeroMQ's I/O thread answers heartbeats without Python's GIL, so a replica busy computing keeps it."""
ACK_LEASE_S = 10.0
"""The backstop: a backup whose link is up but that acknowledged nothing this long (its loop is stuck)
is given up. Long, because a loop starved of CPU on a loaded machine must not lose its role."""
DEFER_S = 0.01
"""How long a deferred input (a pull) waits for the next input to go with (`PrimaryLink.forward`)."""
HEARTBEAT_IVL_MS = 200
LINK_EVENTS = zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED
CLAIM_TIMEOUT_S = 2.0
"""A claim the store has not answered in this long failed (the store is out of reach: a partition)."""


def _heartbeat(sock: zmq.Socket) -> None:
    sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, int(LEASE_S * 1000))


class _Watch:
    """Whether a link's peer connected and then went away (the socket monitor's events)."""

    def __init__(self, sock: zmq.Socket) -> None:
        self.events = sock.get_monitor_socket(LINK_EVENTS)
        self.up = False
        self.lost = False

    def check(self) -> bool:
        """True once a peer that had connected is gone."""
        while self.events.poll(0):
            event = recv_monitor_message(self.events)["event"]
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.up = True
            elif event == zmq.EVENT_DISCONNECTED and self.up:
                self.lost = True
        return self.lost

    def close(self) -> None:
        self.events.close(linger=0)


def _bounded(call: Callable[[], bool], seconds: float) -> bool:
    """`call()`, or TimeoutError once it has run `seconds`. A TCPStore request into a partition
    blocks until TCP gives up, many minutes on (the store's own timeout does not bound a
    compare-and-set), so it runs in a daemon thread that is left behind if it never returns."""
    result: list = []

    def run() -> None:
        try:
            result.append((True, call()))
        except Exception as exc:
            result.append((False, exc))

    thread = threading.Thread(target=run, name="shoal-claim", daemon=True)
    thread.start()
    thread.join(seconds)
    if not result:
        raise TimeoutError(f"the store did not answer within {seconds:g}s")
    ok, value = result[0]
    if not ok:
        raise value
    return value


class Claim:
    """The shard's record (in the control plane or the job's store: `shoal.ps.records`), and the
    compare-and-set that changes it."""

    def __init__(
        self,
        records: Records,
        shard: int,
        record: ps_store.ShardRecord,
        holders: frozenset[int] = frozenset(),
    ) -> None:
        self.records, self.shard, self.record = records, shard, record
        self.holders = holders or frozenset(p for p in record[1:] if p is not None)
        """The processes that may hold the shard (its first primary and backup, or their replacements)."""
        self.lost_why = ""  # why the last claim did not win

    def take(self, primary: int, reason: str) -> bool:
        """Make process `primary` the shard's only holder in the next generation; whether this claim won."""
        return self._swap(ps_store.ShardRecord(self.record.gen + 1, primary, None), reason)

    def add(self, backup: int) -> bool:
        """Make process `backup` (a replacement) the primary's backup in the next generation; whether it won."""
        new = ps_store.ShardRecord(self.record.gen + 1, self.record.primary, backup)
        return self._swap(new, f"process {backup} replaces the shard's lost copy")

    def _swap(self, new: ps_store.ShardRecord, reason: str) -> bool:
        primary = new.primary
        try:
            old = self.record
            won = _bounded(lambda: self.records.compare_set(self.shard, old, new), CLAIM_TIMEOUT_S)
        except Exception as exc:  # out of reach: a partition, the launcher is gone, no majority
            log.warning("shard %d: could not claim generation %d (%s): %s", self.shard, new.gen, reason, exc)
            self.lost_why = f"it cannot reach {self.records.where} to claim the shard"
            return False
        self.lost_why = "the other replica claimed the shard first"
        if won:
            self.record = new
        log.warning(
            "shard %d: %s; process %d %s generation %d",
            self.shard,
            reason,
            primary,
            "holds" if won else "lost the claim to",
            new.gen,
        )
        return won


class PrimaryLink:
    """The primary's side: forwards inputs to the backup, holds replies until it acknowledged them."""

    def __init__(
        self, ctx: zmq.Context, codec: Codec, backup: ps_store.ServerAddress, send: Callable[[list, bool], None]
    ) -> None:
        self.codec = codec
        self.backup = backup
        self.send = send  # the server's worker-facing send: ([ident, *frames], copy)
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTING_ID, f"primary-{secrets.token_hex(8)}".encode())
        codec.transport.connect(self.sock)
        _heartbeat(self.sock)
        self.watch = _Watch(self.sock)
        self.sock.connect(backup.endpoint)
        self.sent = 0  # inputs forwarded
        self.acked = 0  # inputs the backup holds
        self.since: deque[tuple[int, float]] = deque()  # (input, when forwarded), not yet acknowledged
        self.held: deque[tuple[int, list]] = deque()  # (input it depends on, frames with the worker's ident)
        self.needed = 0  # the newest input a reply depends on: the newest one not deferred
        self.deferred: list[tuple[str, bytes, int, list | tuple]] = []  # inputs not sent yet (forward's arguments)
        self.deferred_at = 0.0  # when the oldest of them was deferred
        self.marks: deque[tuple[int, bytes, int]] = deque()  # (input, worker's routing id, its seq), not acked
        self.safe: dict[bytes, int] = {}  # per worker process (routing id): its newest seq the backup holds

    def forward(
        self,
        kind: str,
        ident: bytes = b"",
        frames: list | tuple = (),
        worker: int = -1,
        defer: bool = False,
        seq: int | None = None,
    ) -> None:
        """Input `kind` ("input": a worker's message as received, `seq` its sequence number; "depart":
        `worker` declared departed). `defer`: an input no reply depends on (an uncompressed pull changes
        only its own bookkeeping), sent with the next input that is not deferred, or after `DEFER_S`;
        the inputs keep their order."""
        self.sent += 1
        if seq is not None:
            self.marks.append((self.sent, ident, seq))
        self.deferred.append((kind, ident, worker, frames))
        if not defer:
            self.needed = self.sent
            self.flush()
        elif len(self.deferred) == 1:
            self.deferred_at = time.monotonic()

    def flush(self) -> None:
        """Send every input not sent yet, in order, in one link message: its header lists each input
        (kind, the worker's routing id, the departed worker, its frame count) and names the last."""
        if not self.deferred:
            return
        inputs = [[kind, ident.hex(), worker, len(frames)] for kind, ident, worker, frames in self.deferred]
        header = {"op": REPLICATE, "src": REPLICA, "seq": self.sent, "inputs": inputs, **self.backup.header}
        frames = [f for *_, fs in self.deferred for f in fs]
        self.sock.send_multipart([*self.codec.encode(header), *frames], copy=False)
        self.since.append((self.sent, time.monotonic()))
        self.deferred.clear()

    def out(self, frames: list, fresh: bool, at_once: bool = False) -> None:
        """A reply produced by the newest input: sent once the backup holds every input it depends on
        (`at_once`: an ASP answer, which names what the backup holds instead; still behind any reply
        held before it). Held, a reply whose buffers are not `fresh` is copied, since the optimizer
        changes them in place."""
        if self.acked >= self.needed or (at_once and not self.held):
            self.send(frames, not fresh)
        elif fresh:
            self.held.append((self.needed, frames))
        else:
            self.held.append((self.needed, [bytes(f) if isinstance(f, memoryview) else f for f in frames]))

    def on_ack(self) -> None:
        """Read the backup's acknowledgements; send the replies they release."""
        while self.sock.poll(0):
            try:
                header, _ = self.codec.decode(self.sock.recv_multipart(copy=False))
            except WireError:
                continue
            n = header.get("seq")
            if header.get("op") == ACK and isinstance(n, int) and self.acked < n <= self.sent:
                self.acked = n
        while self.marks and self.marks[0][0] <= self.acked:
            _, ident, seq = self.marks.popleft()
            self.safe[ident] = seq
        while self.since and self.since[0][0] <= self.acked:
            self.since.popleft()
        while self.held and self.held[0][0] <= self.acked:
            self.send(self.held.popleft()[1], False)

    def lost(self) -> str:
        """Why the backup is gone ("" while it is not)."""
        if self.watch.check():
            return "its backup's link closed"
        if self.since and time.monotonic() - self.since[0][1] > ACK_LEASE_S:
            return f"its backup acknowledged nothing for {ACK_LEASE_S:g}s"
        return ""

    def release_all(self) -> None:
        """Going on alone: every held reply goes out now."""
        while self.held:
            self.send(self.held.popleft()[1], False)

    def close(self) -> None:
        self.watch.close()
        self.sock.close(linger=0)


class BackupLink:
    """The backup's side: the link socket the primary connects to. A thread of its own reads it and
    acknowledges each input on receipt, so the primary's replies wait one round trip, not for this
    process's loop, which may be busy applying the other shard it holds (torch's arithmetic releases
    the GIL); the loop applies what the thread took (`receive`). Only that thread uses the socket."""

    def __init__(self, ctx: zmq.Context, codec: Codec, host: str, advertise: str, shard: int) -> None:
        self.codec = codec
        self.shard = shard
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        codec.transport.listen(self.sock)
        _heartbeat(self.sock)  # after listen, which sets the job's generous defaults
        endpoint = codec.transport.bind(self.sock, host, f"link-shard{shard}", advertise)
        self.address = ps_store.ServerAddress(endpoint, shard, secrets.token_hex(8))
        self.watch = _Watch(self.sock)
        self.primary: bytes | None = None  # the routing id of the primary's link, fixed by its first input
        self.outer = len(codec.encode({}))  # frames of a message without tensors (the codec's layout)
        self.seq = 0
        self.taken: queue.SimpleQueue[tuple[dict, bytes, list]] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"shoal-backup-link-{shard}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            if self.sock.poll(50):
                self._take(ack=True)

    def _take(self, ack: bool) -> None:
        """Read every input waiting; acknowledge the newest with one ACK."""
        taken = 0
        while self.sock.poll(0):
            for forwarded in self._check(self.sock.recv_multipart(copy=False)):
                self.taken.put(forwarded)
                taken += 1
        if ack and taken and self.primary is not None:
            self.sock.send_multipart([self.primary, *self.codec.encode({"op": ACK, "seq": self.seq})])

    def receive(self) -> list[tuple[dict, bytes, list]]:
        """Every input the thread took and acknowledged, in order (header, worker ident, the worker's
        frames); a message that failed a check was dropped there."""
        out = []
        while True:
            try:
                out.append(self.taken.get_nowait())
            except queue.Empty:
                return out

    def stop(self) -> None:
        """Stop the thread (the primary is gone), then take what is left in the socket."""
        if self._thread.is_alive():
            self._stop.set()
            self._thread.join()
            self._take(ack=False)

    def _check(self, frames: list) -> list[tuple[dict, bytes, list]]:
        """A link message's inputs, in order, each (header, worker ident, the worker's frames); none if
        it fails a check (then nothing of it is taken)."""
        ident, rest = frames[0].bytes, frames[1:]
        try:
            header, tensors = self.codec.decode(rest[: self.outer])  # the link header carries no tensors
            if header.get("op") != REPLICATE or header.get("src") != REPLICA or tensors:
                raise WireError("bad_op")
            if header.get("to") != self.shard or header.get("session") != self.address.session:
                raise WireError("wrong_session")
            if self.primary is not None and ident != self.primary:
                raise WireError("stale_sender", "forwarded by another primary")
            inputs = _inputs(header.get("inputs"), len(rest) - self.outer)
            seq = header.get("seq")
            if not isinstance(seq, int) or seq != self.seq + len(inputs):
                raise WireError("replayed", f"forwarded inputs up to {seq!r} after {self.seq}")
        except WireError as err:
            log.warning("shard %d backup dropped a link message: %s", self.shard, err)
            return []
        self.primary, self.seq = ident, seq
        out, at = [], self.outer
        for kind, who, worker, count in inputs:
            out.append(({"kind": kind, "worker": worker}, who, rest[at : at + count]))
            at += count
        return out

    def lost(self) -> bool:
        return self.watch.check()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.watch.close()
        self.sock.close(linger=0)


def _inputs(inputs: object, frames: int) -> list[tuple[str, bytes, int, int]]:
    """A link header's list of inputs, checked: each [kind, ident (hex), worker, frame count], at
    least one, their frame counts adding up to the `frames` that follow; WireError otherwise."""
    out = []
    for entry in inputs if isinstance(inputs, list) else ():
        if not (isinstance(entry, list) and len(entry) == 4):
            raise WireError("malformed", "a forwarded input is [kind, ident, worker, frames]")
        kind, who, worker, count = entry
        if not (isinstance(kind, str) and isinstance(who, str) and _count(worker, -1) and _count(count, 0)):
            raise WireError("malformed", "a forwarded input's fields have the wrong types")
        try:
            out.append((kind, bytes.fromhex(who), worker, count))
        except ValueError:
            raise WireError("malformed", "a forwarded input's routing id is not hex") from None
    if not out or sum(e[3] for e in out) != frames:
        raise WireError("malformed", "a forwarded message's frame count is wrong")
    return out


def _count(value: object, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def replay(server: Server, header: dict, ident: bytes, frames: list) -> None:
    """Apply one forwarded input on the backup, as the primary applied it."""
    kind = header.get("kind")
    if server.joining is not None:  # a replacement: the primary's state comes first, then its inputs
        if kind != "snapshot":
            return server.fenced("an input came before the shard's state was whole")
        return server.joining.receive(frames)
    if kind == "depart":
        worker = header.get("worker")
        if isinstance(worker, int) and server.gate is not None and 0 <= worker < server.gate.workers:
            server.members.declare(worker, server.gate.pushed[worker])
        return
    try:
        inner, tensors = server.codec.decode(frames)
        src = inner.get("src")
        if not isinstance(src, int) or isinstance(src, bool):
            raise WireError("bad_sender")
        server.apply(ident, src, inner.get("op"), inner, tensors)
    except WireError as err:  # the primary dropped it too: the same checks on the same state
        server.dropped[err.reason] += 1


def follow(server: Server) -> None:
    """Apply what the primary forwarded (a backup), release what the backup acknowledged (a primary);
    claim the shard when the other replica is gone."""
    link = server.link
    if isinstance(link, BackupLink):
        for forwarded in link.receive():
            replay(server, *forwarded)
        if server.joining is not None:  # a replacement still waiting for the shard's state
            return server.joining.wait(link.lost())
        if link.lost() and _job_over(server):
            return _retire(server, "its primary stopped")
        if link.lost() and server.claim is not None:
            link.stop()  # every input the primary got out before it went is applied before the claim
            for forwarded in link.receive():
                replay(server, *forwarded)
            if server.claim.take(server.process, f"the primary of shard {server.index} is gone"):
                promote(server)
            else:
                server.fenced(server.claim.lost_why)
    elif isinstance(link, PrimaryLink):
        link.on_ack()
        if link.deferred and time.monotonic() - link.deferred_at > DEFER_S:
            link.flush()
        why = link.lost()
        if why and _job_over(server):
            link.release_all()
            return _retire(server, why)
        if why and server.claim is not None:
            if server.claim.take(server.process, why):
                link.release_all()
                link.close()
                server.link = None
            else:
                server.fenced(server.claim.lost_why)


def _job_over(server: Server) -> bool:
    """Every worker said goodbye: a replica that goes now is being stopped with the job (machines'
    launchers stop their servers one after the other), not lost, and nothing is left to take over."""
    return server.workers is not None and len(server.members.finished) >= server.workers


def _retire(server: Server, why: str) -> None:
    """The job is over: no claim, no takeover; the replica stays, idle, until its launcher stops it
    (had it exited, its launcher would start a replacement in its place)."""
    log.info("server process %d: %s after the job ended; shard %d retires", server.process, why, server.index)
    if server.link is not None:
        server.link.close()
    server.link = None
    server.role = FENCED


def promote(server: Server) -> None:
    """This backup is the shard's primary now: tell the workers, and answer what waits."""
    assert isinstance(server.link, BackupLink) and server.claim is not None
    server.link.close()
    server.link = None
    server.role = PRIMARY
    server.events = server.quiet_events
    now = time.monotonic()
    server.pending = [r._replace(since=now) for r in server.pending]
    server.first_join = now
    gen = server.claim.record.gen
    for w, ident in server.members.ident.items():
        if server.members.live(w):
            server.sock.send_multipart([ident, *server.codec.encode({"op": TAKEOVER, "gen": gen})])
    log.warning("server process %d took shard %d over (generation %d)", server.process, server.index, gen)
    if server.events:
        message = f"server process {server.process} took shard {server.index} over (generation {gen})"
        server.events.publish(
            "event", {"message": message, "takeover": server.index, "gen": gen, "unix_time": time.time()}
        )
    server.answer_ready()
