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

from shoal.comm.wire import Codec
from shoal.ps import replication
from shoal.ps import store as ps_store
from shoal.ps.protocol import REPLICA, REPLICATE
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
            outer = {"op": REPLICATE, "src": REPLICA, "seq": seq, "kind": "input", "ident": "6930", "worker": -1}
            outer.update({"frames": len(inner), "to": 0, "session": session})
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
    backup, primary = Claim(store, 0, first), Claim(store, 0, first)
    assert backup.take(1, "its primary is gone")  # the backup claims first
    assert not primary.take(0, "its backup is gone")  # the primary's claim on the same generation loses
    now = ps_store.ShardRecord.parse(store.get(ps_store.shard_key(0)))
    assert now == ps_store.ShardRecord(2, 1, None) and backup.record == now and primary.record == first
    raw.set(ps_store.shard_key(0), "forged 1 -")  # not signed with the job's key: no claim can win on it
    assert not Claim(store, 0, now).take(1, "again")
