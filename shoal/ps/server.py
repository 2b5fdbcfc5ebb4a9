"""One parameter-server process: holds its pieces of the parameters, applies
pushed gradients with the user's optimizer, answers pulls when the
consistency rule allows.

Single-threaded on purpose: one ZeroMQ ROUTER socket, one loop, so every
update to a piece happens in one order and no lock is needed. ZeroMQ's own
I/O thread overlaps the network with the arithmetic.

Guarantees:
- a message that fails authentication, is malformed or oversized (over the
  workers' `max_bytes` once they joined, `SHOAL_PS_MAX_BYTES` before), names
  an unknown piece or param group, has a field of the wrong type or range
  (hyperparameters included: finite, >= 0 where torch requires it, the
  optimizer's switches as they were at start), a wrong shape or dtype, a
  wrong clock, another run's or server's session or a replayed sequence
  number (`shoal.comm.replay`) is dropped and counted in `dropped`; it
  changes nothing;
- a gradient with inf or NaN is applied as a skip (counted in `nonfinite`),
  as a worker skips a compressed step that overflowed, so a BSP clock is
  dropped for every worker and never waits for the refused push;
- a worker that dies is declared departed within about 0.5 s, one that
  hangs after about 4.5 s (`shoal.ps.membership`): ASP and SSP pulls stop waiting for it, BSP waits
  for its replacement, which rejoins at the clock held for it (so no push is
  applied twice); messages from a departed or replaced process are dropped;
- a pull that waits longer than `timeout_s` (a worker died and no
  replacement came), or a join that does, stops the server with one
  sentence naming the workers it waited for, sent to every waiting worker
  as an error so that the job stops too; any exception no check foresaw
  does the same at once.

Checkpoints: `state` answers, once every worker has pushed the asked clock
and those pushes are applied, with each piece's values and optimizer state;
`restore` (from worker 0, before any push) puts them back. So a checkpoint
is one consistent cut of the servers, written by the workers with the rest
of the run.

A server process (`shoal.ps.process`) holds one such replica, or two when
shards are replicated (`shoal.ps.replication`: a primary answers the
workers, its backup applies the same inputs); the messages are listed in
`shoal.ps.protocol`.
"""

from __future__ import annotations

import logging
import sys
import time
from collections import Counter

import torch
import zmq

from shoal import faults
from shoal.comm import replay
from shoal.comm.pubsub import Publisher
from shoal.comm.wire import Codec, WireError
from shoal.compress.base import Receiver
from shoal.ps import membership, optim, reads, replacement, replication, server_state, startup
from shoal.ps.consistency import Gate
from shoal.ps.parts import Parts
from shoal.ps.pieces import PieceState, all_gradients_finite, pushed_pieces, received_gradients
from shoal.ps.protocol import (
    ADD_BACKUP,
    BYE,
    ERROR,
    INIT,
    OBSERVER,
    PULL,
    PUSH,
    RESTORE,
    STATE,
    STATS,
    whole,
)
from shoal.ps.pull_codec import PullEncoder
from shoal.ps.replication import FENCED, PRIMARY, BackupLink, Claim, PrimaryLink
from shoal.ps.startup import positive_bytes, positive_seconds

log = logging.getLogger("shoal.ps.server")

MAX_WORKERS = 1 << 16
"""The largest world size an init may announce (and the bound on `src` before one has)."""


class Server:
    """One replica of shard `index`: its primary (it answers the workers) or its backup (it applies
    what the primary forwards, `shoal.ps.replication`); `process` is the server process holding it."""

    link: PrimaryLink | BackupLink | None = None
    """Replicated: the link to the backup (a primary's) or from the primary (a backup's)."""
    claim: Claim | None = None
    """Replicated: the shard's record, to take it over or to go on alone."""
    joining: replacement.Joining | None = None
    """A replacement backup until it holds the shard's state (`shoal.ps.replacement`)."""
    quiet_events: Publisher | None = None
    """A backup's event channel, published on once it is primary."""
    events: Publisher | None = None
    """The launcher's event channel, when it listens."""
    handling = ""
    """What the loop is doing, for an unexpected error's sentence."""
    error = ""
    """Why this replica stopped the job."""
    done = False

    def __init__(
        self,
        index: int,
        codec: Codec,
        host: str = "127.0.0.1",
        timeout_s: float = 60.0,
        advertise: str = "",
        role: str = PRIMARY,
        process: int | None = None,
    ):
        self.index = index
        self.process = index if process is None else process
        self.role = role
        self.codec = codec
        self.timeout_s = timeout_s
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.MAXMSGSIZE, codec.max_bytes)  # ZeroMQ drops a bigger frame before we see it
        self.sock.setsockopt(zmq.LINGER, 2000)
        codec.transport.listen(self.sock)  # CURVE: only the job's processes get a message in
        membership.heartbeat(self.sock)  # after listen (its defaults are generous): a silent worker departs
        # in the job's private directory on one machine; else every interface, reached by this machine's address
        self.endpoint = codec.transport.bind(self.sock, host, f"server{self.process}-shard{index}", advertise)
        self.session = replay.new_session()  # in every request's signed header: nothing recorded elsewhere passes
        self.once = replay.Once()  # one-time ids of stats requests
        self.dropped: Counter[str] = Counter()
        self.last_drop: dict[int, str] = {}  # per worker: why its last refused message was refused
        self.ceiling = codec.max_bytes  # SHOAL_PS_MAX_BYTES; the workers' max_message_mb governs below it
        self.flags: list[dict] = []  # per param group: the optimizer switches fixed at start
        self.nonfinite = 0  # pushes or BSP averages with inf/NaN, skipped
        self.workers: int | None = None
        self.joined: dict[int, tuple[bytes, dict]] = {}
        self.init_seq: dict[int, int] = {}  # each worker's INIT, named in the first reply
        self.initial: list[torch.Tensor] = []
        self.pieces: dict[str, PieceState] = {}
        self.order: list[str] = []
        self.optim_name = ""
        self.hp: list[dict] = []
        self.gate: Gate | None = None
        self.async_keys = False
        self.seq: dict[int, int] = {}
        self.accum: dict[int, dict[str, torch.Tensor]] = {}
        self.accum_count: Counter[int] = Counter()
        self.skipped_clocks: set[int] = set()  # BSP clocks a worker skipped (non-finite gradient): dropped whole
        self.skipped = 0
        self.receiver: Receiver | None = None  # when pushes are compressed
        self.pulls: PullEncoder | None = None  # when pulls are compressed
        self.parts = Parts()  # pushes sent in several messages, until their last one
        self.pending: list[reads.PendingRead] = []
        self.kept: dict[int, list[torch.Tensor | None]] = {}  # BSP values of recent clocks (`reads.keep`)
        self.applied = 0  # pushes whose updates are in the parameters
        self.read_applied: dict[int, int] = {}
        self.staleness: dict[int, float] = {}
        self.bye: set[int] = set()
        self.first_join = 0.0
        self.clocks_seen = 0
        self.members = membership.Membership(self.sock, codec, index, self.departed)

    # ------------------------------------------------------------------ loop
    def sockets(self) -> list[zmq.Socket]:
        """What the process's loop polls for this replica (a backup's link has a thread of its own)."""
        return [self.sock] + ([self.link.sock] if isinstance(self.link, PrimaryLink) else [])

    def step(self, readable: set[zmq.Socket]) -> None:
        """One turn of the process's loop: the messages waiting, then the clocks, the workers and the link."""
        try:
            self.handling = "waiting for messages"
            if self.sock in readable:
                frames = self.sock.recv_multipart(copy=False)
                self.handle(frames[0].bytes, frames[1:])
            if self.link is not None:
                self.handling = "following the shard's other replica"
                replication.follow(self)
            if self.role == PRIMARY and not self.done:
                self.handling = "checking timeouts"
                self.check_timeouts()
                if self.gate is not None:
                    self.handling = "checking that the workers are alive"
                    self.members.probe(self.gate.pushed)
        except Exception as exc:  # a bug, or input no check foresaw: stop the job now, in one sentence
            log.exception("parameter server %d: unexpected error while %s", self.index, self.handling)
            self.fail(
                f"parameter server {self.index} stopped on an unexpected {type(exc).__name__} "
                f"({' '.join(str(exc).split())[:300]}) while "
                f"{self.handling}; its state can no longer be trusted, so the job is stopped "
                f"(this is a bug: please report it with the server's log)"
            )

    def close(self, linger_ms: int | None = None) -> None:
        if self.link is not None:
            self.link.close()
        self.sock.close(linger=linger_ms)
        self.codec.transport.close(self.ctx)  # the ZAP handler's sockets first, or term() waits for them
        self.ctx.term()

    # ----------------------------------------------------------- replication
    def fenced(self, why: str) -> None:
        """Another replica holds the shard now: this one stops, and says nothing to the workers."""
        log.warning("server process %d gives shard %d up: %s", self.process, self.index, why)
        self.role = FENCED
        self.done = True

    def departed(self, worker: int) -> None:
        """`worker` was declared dead: the backup is told, as an input, before anything depends on it."""
        if isinstance(self.link, PrimaryLink):
            self.link.forward("depart", worker=worker)
        membership.depart(self, worker)

    def out_now(self, frames: list, copy: bool) -> None:
        self.sock.send_multipart(frames, copy=copy)

    def out(self, frames: list, fresh: bool, at_once: bool = False) -> None:
        """A reply to a worker ([ident, *frames]): now, or once the backup holds what it depends on
        (`at_once`: an ASP answer, `PrimaryLink.out`).
        `fresh`: its buffers are not changed later (a snapshot), so ZeroMQ may send them without a copy."""
        if self.role != PRIMARY:
            return
        if isinstance(self.link, PrimaryLink):
            self.link.out(frames, fresh, at_once)
        else:
            self.sock.send_multipart(frames, copy=not fresh)

    def handle(self, ident: bytes, frames: list[zmq.Frame]) -> None:
        """One message. Its frames become the server's: a pushed gradient's memory may become a sum."""
        src: object = None
        try:
            header, tensors = self.codec.decode(frames)
            op, src = header.get("op"), header.get("src")
            if not whole(src) or not OBSERVER <= src < (self.workers or MAX_WORKERS):
                raise WireError("bad_sender")
            if not replay.addressed(header, self.session, self.index):
                raise WireError("wrong_session")  # recorded in another run, or meant for another server
            self.handling = f"handling a {str(op)[:20]!r} message from worker {src}"
            if op in (STATS, ADD_BACKUP) and not self.once.fresh(header.get("seq")):
                raise WireError("replayed")
            if op == STATS:
                values = [p.param for p in self.pieces.values()]  # any replica answers, at once
                return self.out_now([ident, *self.codec.encode(server_state.stats(self), values)], copy=True)
            if op == ADD_BACKUP:  # a replacement process asks to hold this shard again
                return replacement.add_backup(self, header)
            if self.role != PRIMARY:
                if op == BYE and src in self.joined:  # a worker leaving says so to every replica: its
                    self.members.finished.add(src)  # connection closing is then no death, whoever is primary
                    return
                raise WireError("not_primary")  # workers turn to a backup only after it took over
            if op != INIT and src != OBSERVER and not self.members.speaks_for(src, ident):
                self.members.refuse(src, ident)
            if isinstance(self.link, PrimaryLink):  # replayed there with the same checks; a pull goes with the next
                seq = header.get("seq")
                defer = op == PULL and self.pulls is None
                self.link.forward("input", ident, frames, defer=defer, seq=seq if whole(seq) else None)
            self.apply(ident, src, op, header, tensors)
        except WireError as err:
            self.dropped[err.reason] += 1
            if whole(src) and 0 <= src < (self.workers or 0):
                self.last_drop[src] = str(err)
            log.debug("server %d dropped a message: %s", self.index, err)

    def apply(self, ident: bytes, src: int, op: object, header: dict, tensors: list[torch.Tensor]) -> None:
        """An authenticated request from worker `src`, checked against this replica's state and applied;
        the backup applies the primary's forwarded requests here too, so both change alike."""
        seq = header.get("seq")
        if op == INIT and self.members.admit(src, header.get("incarnation"), ident):
            self.seq.pop(src, None)  # a new process of this worker numbers its messages afresh
        if src == OBSERVER or not whole(seq):
            raise WireError("replayed")
        if seq <= self.seq.get(src, -1):
            if header.get("resend") is True and op in (PULL, STATE):
                return reads.answer_again(self, ident, src, seq, header, PULL if op == PULL else STATE)
            raise WireError("replayed")
        self.dispatch(ident, src, op, header, tensors)
        self.seq[src] = seq
        self.last_drop.pop(src, None)

    def dispatch(self, ident: bytes, src: int, op: object, header: dict, tensors: list[torch.Tensor]) -> None:
        """One authenticated, fresh request from worker `src`, to its handler."""
        if op == INIT:
            self.on_init(ident, src, header, tensors)
        elif op == PUSH:
            self.on_push(src, header, tensors)
        elif op in (PULL, STATE):
            reads.on_pull(self, ident, src, header, PULL if op == PULL else STATE)
        elif op == RESTORE:
            server_state.restore(self, ident, src, header, tensors)
        elif op == BYE:
            self.joined_gate(src)
            self.bye.add(src)  # the server stays up for stats until the launcher stops it
            self.members.finished.add(src)
            # answered, so the worker closes its connection only once this is read: its closing is
            # then never mistaken for a death (a probe could see it gone before the goodbye was read)
            self.send(ident, {"op": BYE, "re": header["seq"]})
            if len(self.bye) == self.workers:
                membership.publish_final(self)
        else:
            raise WireError("bad_op")

    def send(self, ident: bytes, header: dict, tensors: list[torch.Tensor] | tuple = ()) -> None:
        if self.role != PRIMARY:
            return  # a backup's replies go nowhere: not even encoded (a MAC pass over the values)
        # not fresh: the bytes are taken now, before the optimizer changes the tensors in place
        self.out([ident, *self.codec.encode(header, list(tensors))], fresh=False)

    # -------------------------------------------------------------- messages
    def on_init(self, ident: bytes, src: int, header: dict, tensors: list[torch.Tensor]) -> None:
        world, spec = header.get("world"), header.get("spec")
        if not whole(world) or not 1 <= world <= MAX_WORKERS or not isinstance(spec, dict) or src >= world:
            raise WireError("malformed", f"bad init (world size {world!r}, at most {MAX_WORKERS})")
        if self.workers is None and not startup.world_fits(self, ident, world):
            return
        again = src in self.joined and header.get("incarnation") is not None  # a new process of a joined worker
        if self.workers is not None and (world != self.workers or (src in self.joined and not again)):
            raise WireError("bad_init", "world size differs or worker joined twice")
        if again and self.gate is not None:
            return membership.rejoin(self, ident, src, spec, header.get("pid"), header.get("seq", 0))
        try:
            timeout_s = positive_seconds(spec.get("timeout_s", self.timeout_s), "timeout_s")
            positive_bytes(spec.get("max_bytes", self.ceiling), "max_bytes")
        except ValueError as exc:
            raise WireError("malformed", f"bad init: {exc}") from None
        if src == 0:
            self.initial = [t.clone() for t in tensors]
        if not self.joined:  # the join phase waits as long as the workers' own timeout_s
            self.timeout_s = timeout_s
        self.workers = world
        self.first_join = self.first_join or time.monotonic()
        self.joined[src] = (ident, spec)
        self.init_seq[src] = header.get("seq", 0)
        self.members.joined(src, ident, header.get("pid"))
        if len(self.joined) == world:
            startup.start(self, world)

    def joined_gate(self, src: int) -> Gate:
        """The gate, once every worker joined and `src` is one of them; WireError otherwise."""
        if self.gate is None or src not in self.joined:
            raise WireError("not_joined")
        return self.gate

    def on_push(self, src: int, header: dict, tensors: list[torch.Tensor]) -> None:
        gate = self.joined_gate(src)
        skip = header.get("skip", False)
        pieces = pushed_pieces(self.pieces, header.get("keys"), skip, tensors)
        grads = [] if skip else received_gradients(pieces, header.get("codes"), tensors, self.receiver)
        if not whole(header.get("clock")) or header.get("clock") != gate.pushed[src]:
            raise WireError(
                "bad_clock", f"worker {src} pushed clock {header.get('clock')!r}, expected {gate.pushed[src]}"
            )
        if header.get("part", False) is not False:  # an early part (shoal.ps.parts): held until the last message
            if header["part"] is not True or skip or self.receiver is not None:
                raise WireError("malformed", "a part is an uncompressed push without skip")
            return self.parts.add(src, gate.pushed[src], pieces, grads)
        staged = self.parts.check(src, gate.pushed[src], header.get("parts", 0), pieces)
        hps = self.pushed_hyperparameters(header.get("hp"))
        nonfinite = self.receiver is None and not all_gradients_finite(grads)
        if staged is not None:  # the parts (checked on arrival) and this message are one push
            self.parts.take(src)
            nonfinite |= staged.nonfinite
            pieces, grads = ([], []) if skip else (staged.pieces + pieces, staged.grads + grads)
        if nonfinite and not skip:
            # As a worker skips a compressed step that overflowed: applied as a skip, so the
            # clock moves on (a BSP clock is dropped for every worker) and nothing is poisoned.
            skip, pieces, grads = True, [], []
            self.nonfinite += 1
            log.warning(
                "server %d: worker %d's gradient for clock %d holds inf or NaN: skipped",
                self.index,
                src,
                gate.pushed[src],
            )
        # Checked: from here on the message is applied in full.
        clock: int = gate.pushed[src]
        if clock >= self.clocks_seen:  # the first push of the workers' (clock+1)-th step
            self.clocks_seen = clock + 1
            if self.role == PRIMARY:  # a fault names a process: its primary's clocks count
                faults.at_step("server", self.process, self.clocks_seen)
        self.hp = [{**old, **new} for old, new in zip(self.hp, hps, strict=True)]
        self.staleness[src] = (self.applied - self.read_applied.get(src, 0)) / gate.workers
        acc = self.accum.setdefault(clock, {}) if gate.has_bsp else {}
        if skip and gate.has_bsp:
            self.skipped_clocks.add(clock)
        self.skipped += skip
        for piece, grad in zip(pieces, grads, strict=True):
            if piece.mode.kind != "bsp":
                piece.apply(grad, self.hp[piece.group])
            elif piece.key in acc:
                acc[piece.key].add_(grad)
            else:  # the first push's own tensor becomes the sum: its frame is this server's, a decoded one new,
                # unless a primary forwards the same frames to its backup without a copy
                acc[piece.key] = grad if self.receiver is not None or self.link is None else grad.clone()
        gate.pushed[src] += 1
        if self.async_keys:
            self.applied += 1
        if gate.has_bsp:
            self.count_bsp_push(gate, clock)
        reads.answer_ready(self)

    def pushed_hyperparameters(self, hp: object) -> list[dict]:
        """Every param group's hyperparameters a push carries; WireError unless well formed."""
        try:
            if not isinstance(hp, list) or len(hp) != len(self.hp):
                raise ValueError(f"{len(self.hp)} param groups expected")
            return [optim.check_hyperparameters(self.optim_name, h, f) for h, f in zip(hp, self.flags, strict=True)]
        except (TypeError, ValueError) as exc:
            raise WireError("bad_hyperparameters", str(exc)) from None

    def count_bsp_push(self, gate: Gate, clock: int) -> None:
        """Count a push to a BSP clock; the last one applies the clock's average."""
        self.accum_count[clock] += 1
        if self.accum_count[clock] < gate.workers:
            return
        totals = self.accum.pop(clock)
        for total in totals.values():
            total.div_(gate.workers)
        if clock not in self.skipped_clocks and not all_gradients_finite(list(totals.values())):
            self.nonfinite += 1  # finite gradients whose sum overflowed (e.g. in float16)
            self.skipped_clocks.add(clock)
            log.warning("server %d: the average gradient of clock %d holds inf or NaN: skipped", self.index, clock)
        if clock in self.skipped_clocks:  # a worker's gradient overflowed: nobody's is applied, as under DP
            self.skipped_clocks.discard(clock)
            totals = {}
        for key, total in totals.items():
            piece = self.pieces[key]
            piece.apply(total, self.hp[piece.group])
        del self.accum_count[clock]
        gate.bsp_done += 1
        if not self.async_keys:
            self.applied += gate.workers

    def answer_ready(self) -> None:
        """What the consistency rule now allows (`shoal.ps.reads`); membership and a promotion call it too."""
        reads.answer_ready(self)

    # ---------------------------------------------------------------- health
    def check_timeouts(self) -> None:
        now = time.monotonic()
        if self.gate is None:
            if self.joined and self.workers and now - self.first_join > self.timeout_s:
                missing = sorted(set(range(self.workers)) - set(self.joined))
                self.fail(f"worker(s) {missing} did not join within {self.timeout_s:g}s (did they start?)")
            return
        if self.pending and now - min(r.since for r in self.pending) > self.timeout_s:
            clock = min(r.clock for r in self.pending)
            late = self.gate.waiting_on(clock)
            refused = [f"worker {w}'s last refused message: {self.last_drop[w]}" for w in late if w in self.last_drop]
            gone = [w for w in late if w in self.members.departed]
            why = "; ".join(refused) if refused else "a worker process probably died"
            if gone:
                why = f"worker(s) {gone} died or hung and no replacement rejoined"
            self.fail(
                f"parameter server {self.index} waited {self.timeout_s:g}s for gradients from worker(s) {late} "
                f"(they pushed {[self.gate.pushed[w] for w in late]} of the clocks needed for clock {clock}); "
                f"{why}, so the job is stopped"
            )

    def fail(self, message: str) -> None:
        if self.role != PRIMARY:  # a backup's state is in doubt: it leaves, and its primary goes on alone
            log.error("server process %d drops its backup of shard %d: %s", self.process, self.index, message)
            return self.fenced("its own state is in doubt")
        self.error = message
        for ident, _ in self.joined.values():  # at once, whatever a backup holds
            self.sock.send_multipart([ident, *self.codec.encode({"op": ERROR, "message": message})])
        print(f"shoal: {message}", file=sys.stderr, flush=True)
        if self.events:
            self.events.publish("event", {"message": message, "error": True})
        self.pending = []
        self.done = True
