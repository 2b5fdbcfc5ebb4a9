"""The worker's side of the parameter server: one DEALER socket per server.

`push` and `request_pull` only queue messages: ZeroMQ's I/O thread sends them
while the worker goes on (zero_grad, the next batch), and gradient buffers
go out without a copy. `wait_pull` blocks until every server has answered
the pull, which is when the consistency rule allowed it; the time spent
there is the step's wait time. Replies arrive in order per server, and a
server always handles a worker's push before its next pull. Every request
names its server and that server's session (`shoal.comm.replay`), and every
socket proves the job's key at connection (`shoal.comm.security`).

Each Client is one incarnation of its worker (a random token, also its
ZeroMQ routing id on every server): a restarted worker is a new incarnation,
and `init` then rejoins the running servers, which answer with the clock
they hold for it (`shoal.ps.membership`).

Replicated shards (`shoal.ps.replication`): the client connects to both
replicas of each shard and talks to the primary. Until a shard answers a
request it keeps what it sent since that shard's last answer (gradients
copied: the model's buffers change); when the backup announces a takeover
with a newer generation, it turns to it and sends those messages again with
their sequence numbers, so the new primary applies exactly the ones the old
one had not forwarded. Only the current primary is heard; an answer naming
another request (`re`) than the one awaited is an old duplicate and dropped.
When the primary takes a replacement process as its new backup
(`shoal.ps.replacement`), it says where that listens (`NEW_BACKUP`) and the
client connects to it in place of the lost one.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import threading
import time
from collections.abc import Iterator

import torch
import zmq

from shoal import faults
from shoal.comm import replay
from shoal.comm.wire import Codec, WireError
from shoal.errors import ShoalError
from shoal.ps.protocol import (
    BYE,
    ERROR,
    INIT,
    NEW_BACKUP,
    OBSERVER,
    PARAMS,
    PING,
    PULL,
    PUSH,
    RESTORE,
    RESTORED,
    STATE,
    STATS,
    TAKEOVER,
)
from shoal.ps.store import ServerAddress, Shard, ShardRecord

Replies = list[tuple[dict, list[torch.Tensor]]]
"""One (header, tensors) answer per server, in server order."""

ANSWERED = (PARAMS, STATE, RESTORED)
"""The replies that answer a request (everything sent to that shard before it is then held)."""


class Client:
    def __init__(
        self,
        servers: list[ServerAddress] | list[Shard],
        codec: Codec,
        rank: int,
        world: int,
        timeout_s: float,
        pieces: list[list[str]] | None = None,
    ):
        self.codec, self.rank, self.world, self.timeout_s = codec, rank, world, timeout_s
        self.pieces = pieces  # each shard's piece names, for the sentence when one is lost
        self.shards = [s if isinstance(s, Shard) else Shard([s], ShardRecord(1, s.index, None)) for s in servers]
        self.replicated = any(len(s.replicas) > 1 for s in self.shards)
        self.current = [s.current for s in self.shards]  # the primary's position in each shard's replicas
        self.gen = [s.record.gen for s in self.shards]
        self.incarnation = f"{rank}-{secrets.token_hex(8)}"
        self.ctx = zmq.Context()
        self.replica_socks = [[self._connect(a) for a in shard.replicas] for shard in self.shards]
        self.seq = 0
        self.unanswered: list[list[tuple[int, dict, list[torch.Tensor]]]] = [[] for _ in self.shards]
        """Per shard, replicated: (seq, header, tensors) sent since its last answer, to resend after a takeover."""
        self.awaited = [0] * len(self.shards)  # the seq of each shard's newest request that expects an answer
        self.takeovers: list[dict] = []  # {"shard", "gen", "unix_time"} per takeover seen
        self.trackers: list[zmq.MessageTracker] = []
        self.bytes_pushed = 0
        self.bytes_pulled = 0

    def _connect(self, address: ServerAddress) -> zmq.Socket:
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 5000)
        sock.setsockopt(zmq.ROUTING_ID, self.incarnation.encode())  # the servers fence other processes by it
        self.codec.transport.connect(sock)
        sock.connect(address.endpoint)
        return sock

    @property
    def socks(self) -> list[zmq.Socket]:
        """Each shard's primary's socket."""
        return [socks[c] for socks, c in zip(self.replica_socks, self.current, strict=True)]

    @property
    def servers(self) -> list[ServerAddress]:
        return [s.replicas[c] for s, c in zip(self.shards, self.current, strict=True)]

    @property
    def endpoints(self) -> list[str]:
        return [a.endpoint for a in self.servers]

    def _send(self, server: int, header: dict, tensors=(), track: bool = False):
        self.seq += 1
        header = {**header, "src": self.rank, "seq": self.seq}
        if header["op"] in (INIT, PULL, STATE, RESTORE):
            self.awaited[server] = self.seq
        if self.replicated:  # kept until answered (the model's gradient buffers change before that); the
            kept = [t.detach().clone() for t in tensors]  # copies go out too: never changed, nothing to wait for
            self.unanswered[server].append((self.seq, header, kept))
            tensors, track = kept, False
        frames = self.codec.encode({**header, **self.servers[server].header}, list(tensors))
        if track:
            return self.socks[server].send_multipart(frames, copy=False, track=True)
        self.socks[server].send_multipart(frames)
        return None

    def _take_over(self, server: int, replica: int, header: dict) -> None:
        """The shard's other replica says it is primary now: turn to it and resend what is unanswered."""
        gen = header.get("gen")
        if not isinstance(gen, int) or isinstance(gen, bool) or gen <= self.gen[server]:
            return  # an old or repeated announcement
        self.gen[server], self.current[server] = gen, replica
        self.takeovers.append({"shard": server, "gen": gen, "unix_time": time.time()})
        address = self.servers[server]
        for _, sent, tensors in self.unanswered[server]:
            frames = self.codec.encode({**sent, "resend": True, **address.header}, tensors)
            self.socks[server].send_multipart(frames)

    def _new_backup(self, server: int, header: dict) -> bool:
        """The shard's primary took a replacement process as its backup: connect to it (a takeover by it
        later reaches this worker only then). Whether the sockets changed."""
        gen, value = header.get("gen"), header.get("replica")
        if not isinstance(gen, int) or isinstance(gen, bool) or gen <= self.gen[server] or not isinstance(value, str):
            return False
        if len(self.shards[server].replicas) != 2:
            return False
        try:
            address = ServerAddress.parse(server, value)
        except ShoalError:
            return False
        other = 1 - self.current[server]
        self.replica_socks[server][other].close(linger=0)
        self.replica_socks[server][other] = self._connect(address)
        self.shards[server].replicas[other] = address
        self.gen[server] = gen
        return True

    def init(self, specs: list[dict], values: list[list[torch.Tensor]]) -> Replies:
        """Join every server (rank 0 sends the initial values); the servers' answers, each with the
        clock to go on from: 0, or, when this worker rejoins a running job, the pushes it holds from it."""
        for s, (spec, vals) in enumerate(zip(specs, values, strict=True)):
            header = {
                "op": INIT,
                "world": self.world,
                "spec": spec,
                "incarnation": self.incarnation,
                "pid": os.getpid(),
            }
            self._send(s, header, vals if self.rank == 0 else ())
        return self._collect(PARAMS, clock=None)

    def push(
        self,
        clock: int,
        per_server: list[tuple[list[str], list[torch.Tensor]]],
        hp: list[dict],
        codes: list[list[dict]] | None = None,
        skip: bool = False,
        parts: list[int] | None = None,
    ) -> None:
        """Queue this clock's gradients for every server (every server gets a push, maybe empty).

        With compression, `codes[s]` holds each key's payload header and the
        tensors are the payloads' tensors in key order; `skip` pushes nothing
        but the clock (a step dropped for a non-finite gradient); `parts[s]`:
        how many parts of this push went to server s before (`push_part`). A SIGTERM meanwhile (torch's
        agent restarting this worker) waits until every server's message is out (`_sigterm_after`)."""
        with _sigterm_after(self.ctx):
            self._push(clock, per_server, hp, codes, skip, parts)

    def _push(
        self,
        clock: int,
        per_server: list[tuple[list[str], list[torch.Tensor]]],
        hp: list[dict],
        codes: list[list[dict]] | None,
        skip: bool,
        parts: list[int] | None,
    ) -> None:
        for s, (keys, grads) in enumerate(per_server):
            header = {"op": PUSH, "clock": clock, "keys": keys, "hp": hp}
            if codes is not None:
                header["codes"] = codes[s]
            if skip:
                header["skip"] = True
            if parts is not None and parts[s]:
                header["parts"] = parts[s]
            tracker = self._send(s, header, grads, track=True)
            self._track(tracker)
            self.bytes_pushed += sum(g.numel() * g.element_size() for g in grads)
            if s == 0 and len(per_server) > 1 and faults.scheduled("push"):
                if tracker is not None:  # the first server's message out before the fault acts
                    tracker.wait(self.timeout_s)
                else:
                    time.sleep(0.5)  # replicated: a copy went out, with no tracker
                faults.at_step("push", self.rank, clock + 1)

    def push_part(self, server: int, clock: int, keys: list[str], grads: list[torch.Tensor]) -> None:
        """Queue an early part of this clock's push for `server` (uncompressed; see `shoal.ps.parts`):
        the server checks it now and applies it with the clock's last message, `push(..., parts=)`."""
        self._track(self._send(server, {"op": PUSH, "clock": clock, "keys": keys, "part": True}, grads, track=True))
        self.bytes_pushed += sum(g.numel() * g.element_size() for g in grads)

    def _track(self, tracker: zmq.MessageTracker | None) -> None:
        self.trackers = [t for t in self.trackers if not t.done]  # sent long ago: forget
        if tracker is not None:  # None: a copy went out (replicated), the buffers are free at once
            self.trackers.append(tracker)

    def wait_sent(self) -> None:
        """Block until ZeroMQ no longer reads the pushed gradient buffers."""
        for t in self.trackers:
            if not t.done:
                t.wait(self.timeout_s)
        self.trackers = []

    def request_pull(self, clock: int, exact: bool = False, previous: list[bool] | None = None) -> None:
        """Ask every server for the parameters of `clock`; `exact`: whole values even when pulls are
        compressed (`shoal.ps.pull_codec`); `previous[s]`: server s holds this worker's push of `clock`
        already (a rejoin after a death mid-push), and answers with the values from before it
        (`shoal.ps.reads.answer_previous`)."""
        for s in range(len(self.socks)):
            header = {"op": PULL, "clock": clock, **({"exact": True} if exact else {})}
            if previous is not None and previous[s]:
                header["previous"] = True
            self._send(s, header)

    def state(self, clock: int) -> Replies:
        """Every server's values and optimizer state once all workers have pushed `clock` times."""
        for s in range(len(self.socks)):
            self._send(s, {"op": STATE, "clock": clock})
        return self._collect(STATE, clock)

    def restore(self, layouts: list[list], tensors: list[list[torch.Tensor]]) -> None:
        """Worker 0 only, before the first push: put a checkpoint back on every server."""
        for s, (layout, ts) in enumerate(zip(layouts, tensors, strict=True)):
            self._send(s, {"op": RESTORE, "state": layout}, ts)
        self._collect(RESTORED, 0)

    def wait_pull(self, clock: int) -> Replies:
        """Every server's answer to the pull for `clock`."""
        return self._collect(PARAMS, clock)

    def _collect(self, op: str, clock: int | None) -> Replies:
        """Every shard's answer `op` for `clock` (None: any clock, a join's)."""
        poller, where = self._poller()
        replies: dict[int, tuple[dict, list]] = {}
        deadline = time.monotonic() + self.timeout_s
        while len(replies) < len(self.shards):
            left = deadline - time.monotonic()
            if left <= 0:
                raise self._abort(self._unanswered([i for i in range(len(self.shards)) if i not in replies], clock))
            for sock, _ in poller.poll(int(min(left, 1.0) * 1000)):
                s, r = where[sock]
                frames = sock.recv_multipart(copy=False)
                try:
                    header, tensors = self.codec.decode(frames)
                except WireError as err:
                    raise self._abort(
                        f"worker {self.rank}: a bad message from parameter server {s} ({err}); "
                        "do all processes share the job key?"
                    ) from None
                if header.get("op") == TAKEOVER and r != self.current[s]:
                    self._take_over(s, r, header)
                    continue
                if header.get("op") == NEW_BACKUP and r == self.current[s]:
                    if self._new_backup(s, header):
                        poller, where = self._poller()
                        break  # the poll's other sockets are read on the next turn
                    continue
                if header.get("op") == PING or r != self.current[s]:
                    continue  # a liveness probe, or a replica that is not (or no longer) the primary
                if header.get("op") == ERROR:
                    raise self._abort(str(header.get("message", "the parameter server stopped the job")))
                if self.replicated and header.get("op") in ANSWERED and header.get("re") != self.awaited[s]:
                    continue  # an answer sent again after a takeover, already taken
                if header.get("op") != op or (clock is not None and header.get("clock") != clock):
                    raise self._abort(
                        f"worker {self.rank}: parameter server {s} answered {header.get('op')} "
                        f"for clock {header.get('clock')}, expected clock {clock}"
                    )
                self.bytes_pulled += sum(t.numel() * t.element_size() for t in tensors)
                self._answered(s, header)
                replies[s] = (header, tensors)
        return [replies[s] for s in range(len(self.shards))]

    def _answered(self, server: int, header: dict) -> None:
        """Forget what the answer says both copies of the shard hold: it and everything sent before
        (`re`), or, for an ASP answer that did not wait for the backup, up to `safe` (`shoal.ps.replication`)."""
        done = header.get("re", self.seq)
        safe = header.get("safe")
        if isinstance(safe, int) and not isinstance(safe, bool):
            done = min(done, safe)
        self.unanswered[server] = [u for u in self.unanswered[server] if u[0] > done]

    def _poller(self) -> tuple[zmq.Poller, dict[zmq.Socket, tuple[int, int]]]:
        """A poller over every replica's socket, and where each socket is (shard, replica)."""
        poller = zmq.Poller()
        where: dict[zmq.Socket, tuple[int, int]] = {}
        for s, socks in enumerate(self.replica_socks):
            for r, sock in enumerate(socks):
                poller.register(sock, zmq.POLLIN)
                where[sock] = (s, r)
        return poller, where

    def _abort(self, message: str) -> ShoalError:
        """The error that ends this worker's part in the job, every socket of its context closed first
        (the worker's event publisher shares it): left open, a socket found only by the garbage
        collector can hold ZeroMQ's term, and the process, forever at exit."""
        self.ctx.destroy(linger=0)
        return ShoalError(message)

    def _unanswered(self, lost: list[int], clock: int | None) -> str:
        """The sentence for shards that did not answer in time: which, what they hold, and what it means
        (kept short: the launcher quotes the first 300 characters)."""
        if not any(len(self.shards[i].replicas) > 1 for i in lost):
            return (
                f"worker {self.rank}: no answer from parameter server(s) {[self.endpoints[i] for i in lost]} "
                f"within {self.timeout_s:.0f}s (clock {clock}); a server or another worker may have died"
            )
        names = [n for i in lost for n in self.pieces[i]] if self.pieces is not None else []
        shown = ", ".join(names[:4]) + (f" +{len(names) - 4} more" if len(names) > 4 else "")
        return (
            f"worker {self.rank}: parameter-server shard(s) {lost} ({shown}) lost: neither process holding "
            f"them answered within {self.timeout_s:.0f}s (clock {clock})"
        )

    def stats(self, server: int) -> tuple[dict, list[torch.Tensor]]:
        return request_stats(self.ctx, self.servers[server], self.codec, self.timeout_s)

    def close(self) -> None:
        if self.ctx.closed:
            return  # aborted: nothing more to say
        for s in range(len(self.shards)):
            self._send(s, {"op": BYE})
        self._wait_goodbyes()
        # Then to each backup, so that its worker closing is no death to it: only now, since a backup
        # that every worker said goodbye to takes nothing over, and before the primary's answer it
        # may not hold all of this worker's pushes yet (an ASP answer does not wait for it).
        for s in range(len(self.shards)):
            for r, sock in enumerate(self.replica_socks[s]):
                if r != self.current[s]:
                    header = {"op": BYE, "src": self.rank, "seq": self.seq, **self.shards[s].replicas[r].header}
                    sock.send_multipart(self.codec.encode(header))
        for socks in self.replica_socks:
            for sock in socks:
                sock.close()  # LINGER lets the goodbyes go out
        self.ctx.term()

    def _wait_goodbyes(self, wait_s: float = 5.0) -> None:
        """Until each shard's primary answered the goodbye (at most `wait_s`: a server that is gone does
        not hold the worker's exit): closed before that, the connection could look like a death. The
        answer waits until the backup holds everything before it; a backup that takes over meanwhile
        gets what the old primary had not acknowledged (an ASP push after the last `safe`) again."""
        poller, where = self._poller()
        waiting = set(range(len(self.shards)))
        deadline = time.monotonic() + min(wait_s, self.timeout_s)
        while waiting and (left := deadline - time.monotonic()) > 0:
            for sock, _ in poller.poll(int(left * 1000)):
                s, r = where[sock]
                try:
                    header, _ = self.codec.decode(sock.recv_multipart(copy=False))
                except WireError:
                    continue
                if header.get("op") == TAKEOVER and r != self.current[s]:
                    self._take_over(s, r, header)  # resends the goodbye too: it is unanswered
                elif header.get("op") == BYE and r == self.current[s]:
                    waiting.discard(s)


@contextlib.contextmanager
def _sigterm_after(ctx: zmq.Context, linger_ms: int = 2000) -> Iterator[None]:
    """Hold a SIGTERM until the block's messages are out, then end as it would have ended this process.

    Why: a worker ended between its push to one server and to the next leaves the first a clock
    ahead; restarted, it computes that step again from the values the server ahead kept
    (`shoal.ps.reads.answer_previous`), but under compressed pulls none are kept and the run is
    no longer bit for bit. torch's agent sends SIGTERM to restart workers (and SIGKILL only 5 s
    later), at any point of a step. In the main thread only (where Python runs handlers).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got: list[int] = []
    before = signal.signal(signal.SIGTERM, lambda signum, _frame: got.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if before is None else before)
        if got:
            ctx.destroy(linger=linger_ms)  # what is queued goes out first
            signal.raise_signal(signal.SIGTERM)


def request_stats(
    ctx: zmq.Context, server: ServerAddress, codec: Codec, timeout_s: float = 10.0
) -> tuple[dict, list[torch.Tensor]]:
    """A server's counters and current parameters (read-only; for tools and tests)."""
    endpoint = server.endpoint
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    codec.transport.connect(sock)
    sock.connect(endpoint)
    try:
        header = {"op": STATS, "src": OBSERVER, "seq": replay.one_time_id(), **server.header}
        sock.send_multipart(codec.encode(header))
        if not sock.poll(timeout_s * 1000):
            raise ShoalError(f"parameter server {endpoint} did not answer a stats request within {timeout_s:.0f}s")
        header, tensors = codec.decode(sock.recv_multipart())
        return header, [t.clone() for t in tensors]
    finally:
        sock.close()
