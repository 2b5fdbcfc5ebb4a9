"""In-process tests of shard replication (`shoal.ps.replication`): a backup fed by its primary holds
the same state bit for bit, replies wait for its acknowledgement, a forged or replayed link message
changes nothing, and of two claims on one generation exactly one wins."""

from __future__ import annotations

import secrets
import time
from datetime import timedelta

import torch
import zmq
from torch.distributed import TCPStore  # pyright: ignore[reportPrivateImportUsage]

from shoal.comm.replay import one_time_id
from shoal.comm.wire import Codec
from shoal.ps import replication
from shoal.ps import store as ps_store
from shoal.ps.protocol import ADD_BACKUP, OBSERVER, REPLICA, REPLICATE
from shoal.ps.records import Records
from shoal.ps.replication import BACKUP, PRIMARY, BackupLink, Claim, PrimaryLink
from shoal.ps.server import Server

KEY = b"k" * 32
SPEC = {
    "optim": "Adam",
    "timeout_s": 5.0,
    "groups": [{"lr": 0.1, "betas": [0.9, 0.99], "eps": 1e-8, "weight_decay": 0.0}],
    "keys": [["w", "float32", [4], "asp", 0, 0]],
}


def _request(server: Server, src: int, seq: int, op: str, **more) -> dict:
    return {"op": op, "src": src, "seq": seq, "to": server.index, "session": server.session, **more}


SSP = {**SPEC, "keys": [["w", "float32", [4], "ssp", 4, 0]]}
"""SSP with staleness 4: a pull is ready at once in these tests, but its answer still waits for the backup."""


def _pair() -> tuple[Codec, Server, Server]:
    codec = Codec(KEY)
    primary = Server(0, codec, role=PRIMARY, process=0)
    backup = Server(0, codec, role=BACKUP, process=1)
    backup.link = BackupLink(backup.ctx, codec, "127.0.0.1", "", 0)
    primary.link = PrimaryLink(primary.ctx, codec, backup.link.address, primary.out_now)
    return codec, primary, backup


def _until(check, *servers: Server, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        for s in servers:
            replication.follow(s)
        time.sleep(0.005)


def _close(*servers: Server) -> None:
    for s in servers:
        s.close(linger_ms=0)


def test_the_backup_holds_what_the_primary_holds_and_replies_wait_for_its_ack():
    codec, primary, backup = _pair()
    try:
        for src in (0, 1):
            header = _request(primary, src, 1, "init", world=2, spec=SPEC, incarnation=f"i{src}")
            primary.handle(f"i{src}".encode(), codec.encode(header, [torch.arange(4.0)] if src == 0 else []))
        assert primary.link is not None and isinstance(primary.link, PrimaryLink)
        assert primary.link.held  # the joins' answers wait for the backup
        for step in range(3):
            for src in (0, 1):
                push = _request(primary, src, 2 + step, "push", clock=step, keys=["w"], hp=SPEC["groups"])
                primary.handle(f"i{src}".encode(), codec.encode(push, [torch.full((4,), float(src + step + 1))]))
        link = primary.link
        _until(lambda: link.acked == link.sent and not link.held, primary, backup)
        _until(lambda: backup.gate is not None and backup.gate.pushed == [3, 3], backup)
        assert primary.gate is not None and primary.gate.pushed == [3, 3] and primary.applied == backup.applied == 6
        assert torch.equal(primary.pieces["w"].param, backup.pieces["w"].param)
        for name, value in primary.pieces["w"].opt.state[primary.pieces["w"].param].items():
            assert torch.equal(value, backup.pieces["w"].opt.state[backup.pieces["w"].param][name]), name
        assert not backup.dropped and backup.seq == primary.seq
    finally:
        _close(primary, backup)


def test_a_forged_replayed_or_second_primarys_link_message_changes_nothing():
    codec, primary, backup = _pair()
    assert isinstance(backup.link, BackupLink)
    ctx = zmq.Context()
    socks: dict[bytes, zmq.Socket] = {}  # one connection per routing id (a ROUTER refuses a second)
    try:
        header = _request(primary, 0, 1, "init", world=1, spec=SPEC, incarnation="i0")
        inner = codec.encode(header, [torch.arange(4.0)])

        def forward(seq: int, session: str, ident: bytes) -> None:
            if ident not in socks:
                socks[ident] = sock = ctx.socket(zmq.DEALER)
                sock.setsockopt(zmq.ROUTING_ID, ident)
                codec.transport.connect(sock)
                sock.connect(backup.link.address.endpoint)  # type: ignore[union-attr]
            sock = socks[ident]
            outer = {"op": REPLICATE, "src": REPLICA, "seq": seq, "inputs": [["input", "6930", -1, len(inner)]]}
            outer.update({"to": 0, "session": session})
            sock.send_multipart([*codec.encode(outer), *inner])

        forward(1, secrets.token_hex(8), b"p1")  # another session: recorded elsewhere
        forward(2, backup.link.address.session, b"p1")  # a gap in the sequence: one was lost or is replayed
        time.sleep(0.3)
        replication.follow(backup)
        assert backup.link.seq == 0 and backup.gate is None and not backup.joined
        forward(1, backup.link.address.session, b"p1")  # the genuine first input
        _until(lambda: backup.gate is not None, backup)
        forward(2, backup.link.address.session, b"p2")  # a second "primary" on the same link
        forward(1, backup.link.address.session, b"p1")  # the first input again: a replay
        time.sleep(0.3)
        replication.follow(backup)
        assert backup.link.seq == 1 and backup.link.primary == b"p1"
    finally:
        for sock in socks.values():
            sock.close(linger=0)
        ctx.term()
        _close(primary, backup)


def test_of_two_claims_on_one_generation_exactly_one_wins():
    raw = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=5), use_libuv=True)
    store = ps_store.SignedStore(raw, KEY, "session", "here")
    first = ps_store.first_record(0, 2, 2)
    store.set(ps_store.shard_key(0), first.value)
    records = Records(store)
    backup, primary = Claim(records, 0, first), Claim(records, 0, first)
    assert backup.take(1, "its primary is gone")  # the backup claims first
    assert not primary.take(0, "its backup is gone")  # the primary's claim on the same generation loses
    now = ps_store.ShardRecord.parse(store.get(ps_store.shard_key(0)))
    assert now == ps_store.ShardRecord(2, 1, None) and backup.record == now and primary.record == first
    raw.set(ps_store.shard_key(0), "forged 1 -")  # not signed with the job's key: no claim can win on it
    assert not Claim(records, 0, now).take(1, "again")


def _comparable(server: Server) -> dict:
    """Every attribute a served input can change, in a form `==` compares (tensors as lists)."""
    skip = {"ctx", "sock", "session", "endpoint", "link", "claim", "codec", "once", "events", "quiet_events"}
    skip |= {"first_join", "joining", "process", "role", "handling", "members", "pulls", "receiver", "initial", "kept"}
    out: dict = {}
    for name, value in vars(server).items():
        if name in skip:
            continue
        if name == "pieces":
            value = {
                k: (p.param.tolist(), p.steps, {n: t.tolist() for n, t in p.opt.state[p.param].items()})
                for k, p in value.items()
            }
        elif name == "accum":
            value = {c: {k: t.tolist() for k, t in sums.items()} for c, sums in value.items()}
        elif name == "pending":
            value = [r._replace(since=0) for r in value]
        elif name == "gate":
            value = vars(value)
        elif name == "parts":
            value = {w: (s.clock, s.parts, s.keys, [t.tolist() for t in s.grads]) for w, s in value.staged.items()}
        out[name] = value
    out["members"] = {
        k: v for k, v in vars(server.members).items() if k not in ("sock", "codec", "on_depart", "last_probe")
    }
    return out


def _join(new: Server, primary: Server, store: ps_store.SignedStore, holders: frozenset[int]) -> None:
    """`new` asks `primary` to take it as backup, until it holds the state."""
    from shoal.ps.replacement import Joining

    new.link = BackupLink(new.ctx, new.codec, "127.0.0.1", "", 0)
    new.joining = Joining(new, Records(store), ps_store.ServerAddress(primary.endpoint, 0, primary.session), holders)
    deadline = time.monotonic() + 10
    while new.joining is not None:
        assert time.monotonic() < deadline, "the replacement got no state"
        replication.follow(new)
        if primary.sock.poll(10):
            frames = primary.sock.recv_multipart(copy=False)
            primary.handle(frames[0].bytes, frames[1:])


def test_a_replacement_takes_the_primarys_whole_state_and_then_follows_it():
    """A primary left alone takes a replacement as backup: the record moves to the next generation with
    it, the replacement installs every attribute a served input changed (mid-clock: one BSP sum and a
    read waiting), and the inputs after that keep both equal."""
    raw = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=5), use_libuv=True)
    store = ps_store.SignedStore(raw, KEY, "session", "here")
    alone = ps_store.ShardRecord(2, 0, None)
    store.set(ps_store.shard_key(0), alone.value)
    codec = Codec(KEY)
    holders = frozenset({0, 1})
    primary = Server(0, codec, role=PRIMARY, process=0)
    primary.claim = Claim(Records(store), 0, alone, holders)
    spec = {**SPEC, "keys": [["w", "float32", [4], "bsp", 0, 0], ["v", "float32", [2], "ssp", 1, 0]]}
    new = Server(0, codec, role=BACKUP, process=1)
    try:
        for src in (0, 1):
            header = _request(primary, src, 1, "init", world=2, spec=spec, incarnation=f"i{src}")
            values = [torch.arange(4.0), torch.ones(2)] if src == 0 else []
            primary.handle(f"i{src}".encode(), codec.encode(header, values))

        def push(src: int, seq: int, clock: int) -> None:
            header = _request(primary, src, seq, "push", clock=clock, keys=["w", "v"], hp=SPEC["groups"])
            grads = [torch.full((4,), float(src + clock + 1)), torch.full((2,), 0.5 * (src - clock))]
            primary.handle(f"i{src}".encode(), codec.encode(header, grads))

        for clock in range(3):
            push(0, 2 + clock, clock)
            push(1, 2 + clock, clock)
        push(0, 5, 3)  # worker 0 is a clock ahead: clock 3's sum holds its gradient alone
        pull = _request(primary, 0, 6, "pull", clock=4)
        primary.handle(b"i0", codec.encode(pull))  # and its pull for clock 4 waits
        assert primary.pending and primary.accum
        for process, link in ((7, "tcp://127.0.0.1:1 s 1"), (1, "ipc:///tmp/x s 1"), (0, "tcp://127.0.0.1:1 s 1")):
            bad = _request(primary, OBSERVER, one_time_id(), ADD_BACKUP, process=process, link=link, replica=link)
            primary.handle(b"stranger", codec.encode(bad))  # not one of its holders, not TCP, itself
        assert primary.dropped["malformed"] == 3 and primary.link is None and primary.claim.record == alone
        _join(new, primary, store, holders)
        assert not new.done and new.claim is not None
        assert ps_store.ShardRecord.parse(store.get(ps_store.shard_key(0))) == (3, 0, 1) == new.claim.record
        assert _comparable(new) == _comparable(primary)
        push(1, 6, 3)  # the inputs after it: the clock completes, the read is answered
        push(0, 7, 4)
        link = primary.link
        assert isinstance(link, PrimaryLink)
        _until(lambda: link.acked == link.sent and not link.held, primary, new)
        _until(lambda: new.gate is not None and new.gate.pushed == [5, 4], new)
        assert _comparable(new) == _comparable(primary) and primary.gate is not None and primary.gate.bsp_done == 4
    finally:
        _close(primary, new)


def test_a_replica_whose_other_half_stops_after_every_goodbye_claims_nothing():
    """Machines' launchers stop their servers one after the other once the job is over: a backup that
    loses its primary after every worker said goodbye retires without a claim (and without exiting,
    which would make its launcher start a replacement)."""
    raw = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=5), use_libuv=True)
    store = ps_store.SignedStore(raw, KEY, "session", "here")
    first = ps_store.first_record(0, 2, 2)
    store.set(ps_store.shard_key(0), first.value)
    codec, primary, backup = _pair()
    backup.claim = Claim(Records(store), 0, first)
    try:
        primary.handle(
            b"i0",
            codec.encode(_request(primary, 0, 1, "init", world=1, spec=SPEC, incarnation="i0"), [torch.arange(4.0)]),
        )
        bye = codec.encode(_request(primary, 0, 2, "bye"))
        primary.handle(b"i0", bye)
        backup.handle(b"i0", codec.encode(_request(backup, 0, 2, "bye")))
        _until(lambda: backup.gate is not None and backup.members.finished == {0}, primary, backup)
        primary.close(linger_ms=0)  # stopped by its launcher
        _until(lambda: backup.link is None, backup, timeout=10)
        assert backup.role == replication.FENCED and not backup.done
        assert ps_store.ShardRecord.parse(store.get(ps_store.shard_key(0))) == first  # no claim
    finally:
        backup.close(linger_ms=0)


def test_a_pull_goes_over_with_the_next_input_and_a_lost_one_is_answered_by_the_new_primary():
    """An uncompressed pull changes nothing a reply shows: the primary forwards it with the next input
    (one link message for both, in order) or after DEFER_S, and its answer (SSP) waits only for the push
    before it. A primary lost while a pull it answered had not gone over: the promoted backup applies
    the worker's next push exactly once, and answers a pull resent because its answer was lost."""
    codec, primary, backup = _pair()

    def send(server: Server, src: int, seq: int, op: str, clock: int, **more) -> None:
        header = _request(server, src, seq, op, clock=clock, **more)
        grads = [torch.full((4,), float(src + clock + 1))] if op == "push" else []
        if op == "push":
            header.update(keys=["w"], hp=SPEC["groups"])
        server.handle(f"i{src}".encode(), codec.encode(header, grads))

    try:
        for src in (0, 1):
            header = _request(primary, src, 1, "init", world=2, spec=SSP, incarnation=f"i{src}")
            primary.handle(f"i{src}".encode(), codec.encode(header, [torch.arange(4.0)] if src == 0 else []))
        link = primary.link
        assert isinstance(link, PrimaryLink) and isinstance(backup.link, BackupLink)
        _until(lambda: link.acked == link.sent and not link.held, primary, backup)
        send(primary, 0, 2, "push", 0)
        send(primary, 0, 3, "pull", 1)
        assert len(link.deferred) == 1 and link.needed == link.sent - 1 and link.held
        _until(lambda: not link.held, primary, backup)  # answered once the push is held by both
        assert len(link.deferred) == 1 and backup.link.seq == link.sent - 1
        send(primary, 1, 2, "push", 0)  # the pull goes over with it
        assert not link.deferred and link.since[-1][0] == link.sent
        _until(lambda: backup.gate is not None and backup.seq == primary.seq == {0: 3, 1: 2}, primary, backup)
        send(primary, 1, 3, "pull", 1)
        time.sleep(2 * replication.DEFER_S)
        replication.follow(primary)  # nothing came after it: it goes over alone
        assert not link.deferred
        _until(lambda: backup.seq == primary.seq == {0: 3, 1: 3}, primary, backup)
        send(primary, 0, 4, "push", 1)
        send(primary, 0, 5, "pull", 2)
        send(primary, 1, 4, "push", 1)
        send(primary, 1, 5, "pull", 2)
        _until(lambda: link.acked == link.sent - 1 and not link.held, primary, backup)
        assert len(link.deferred) == 1  # worker 1's pull was answered; the primary is lost before it went over
        assert torch.equal(primary.pieces["w"].param, backup.pieces["w"].param)
        backup.link.stop()
        for forwarded in backup.link.receive():
            replication.replay(backup, *forwarded)
        backup.link.close()
        backup.link, backup.role = None, PRIMARY
        assert backup.seq == {0: 5, 1: 4} and backup.gate is not None and backup.gate.pushed == [2, 2]
        answers: list[dict] = []
        backup.out = lambda frames, fresh, at_once=False: answers.append(codec.decode(frames[1:])[0])  # type: ignore[method-assign]
        send(backup, 1, 5, "pull", 2, resend=True)  # its answer was lost with the primary: fresh here
        send(backup, 0, 5, "pull", 2, resend=True)  # forwarded before: answered again
        assert [(a["op"], a["re"]) for a in answers] == [("params", 5), ("params", 5)] and not backup.dropped
        send(backup, 1, 6, "push", 2)
        send(backup, 1, 6, "push", 2, resend=True)  # the same push again: applied once
        assert backup.gate.pushed == [2, 3] and backup.dropped["replayed"] == 1 and backup.applied == 5
    finally:
        _close(primary, backup)


def test_an_asp_answer_goes_out_at_once_and_names_what_the_backup_holds():
    """Under ASP a pull's answer does not wait for the backup: it names (`safe`) the newest of the
    worker's messages the backup holds, which is what the worker may forget (`Client._answered`); a
    push the backup does not hold yet stays the worker's to resend. SSP answers still wait."""
    codec, primary, backup = _pair()
    answers: list[dict] = []
    primary.link.send = lambda frames, copy: answers.append(codec.decode(frames[1:])[0])  # type: ignore[union-attr]

    def send(src: int, seq: int, op: str, clock: int) -> None:
        header = _request(primary, src, seq, op, clock=clock)
        if op == "push":
            header.update(keys=["w"], hp=SPEC["groups"])
        primary.handle(f"i{src}".encode(), codec.encode(header, [torch.ones(4)] if op == "push" else []))

    try:
        for src in (0, 1):
            header = _request(primary, src, 1, "init", world=2, spec=SPEC, incarnation=f"i{src}")
            primary.handle(f"i{src}".encode(), codec.encode(header, [torch.arange(4.0)] if src == 0 else []))
        link = primary.link
        assert isinstance(link, PrimaryLink)
        _until(lambda: link.acked == link.sent and not link.held, primary, backup)
        answers.clear()
        send(0, 2, "push", 0)
        send(0, 3, "pull", 1)  # no acknowledgement read in between: answered anyway
        assert [(a["op"], a["re"], a["safe"]) for a in answers] == [("params", 3, 1)] and link.acked < link.sent
        _until(lambda: link.acked == link.sent - 1, primary, backup)  # the push (the pull is deferred)
        send(0, 4, "push", 1)
        send(0, 5, "pull", 2)
        assert [(a["re"], a["safe"]) for a in answers[1:]] == [(5, 2)]  # the first push is held by both now
        _until(lambda: backup.seq == primary.seq == {0: 5, 1: 1}, primary, backup)
        assert torch.equal(primary.pieces["w"].param, backup.pieces["w"].param)
    finally:
        _close(primary, backup)
