"""In-process tests of how a parameter server tracks its workers (`shoal.ps.membership`): a closed
connection is a departure, a departed worker leaves the SSP bound, a new incarnation rejoins at the
clock the server holds for it, and an old or replayed one is refused."""

from __future__ import annotations

import time

import torch
import zmq

from shoal.comm.wire import Codec
from shoal.ps.consistency import Gate, Mode

KEY = b"k" * 32
SPEC = {"optim": "SGD", "timeout_s": 5.0, "groups": [{"lr": 1.0}], "keys": [["w", "float32", [2], "ssp", 0, 0]]}


SESSION = {"to": 0, "session": ""}
"""What every request to the server names besides its own fields (the session is set per server below)."""


def _init(src: int, incarnation: str, seq: int = 1) -> dict:
    header = {"op": "init", "src": src, "seq": seq, "world": 2, "spec": SPEC, "incarnation": incarnation, "pid": 1}
    return {**header, **SESSION}


def _push(src: int, seq: int, clock: int) -> dict:
    return {"op": "push", "src": src, "seq": seq, "clock": clock, "keys": ["w"], "hp": [{"lr": 1.0}], **SESSION}


def test_a_departed_worker_is_left_out_of_the_ssp_bound_only():
    gate = Gate(3, [Mode("ssp", 1)])
    gate.pushed = [5, 2, 4]
    assert not gate.ready(5)
    gate.absent.add(1)
    assert gate.ready(5) and not gate.ready(6) and gate.slowest == 2 and gate.slowest_present == 4
    bsp = Gate(2, [Mode("bsp")])
    bsp.pushed, bsp.bsp_done = [3, 2], 2
    bsp.absent.add(1)
    assert not bsp.ready(3)  # BSP still needs the departed worker's push


def test_a_closed_connection_is_declared_departed_within_two_probes():
    from shoal.ps.server import Server

    codec = Codec(KEY)
    server = Server(0, codec)
    SESSION["session"] = server.session
    ctx = zmq.Context()
    dealers = []
    try:
        for src in (0, 1):
            d = ctx.socket(zmq.DEALER)
            d.setsockopt(zmq.ROUTING_ID, f"i{src}".encode())
            codec.transport.connect(d)
            d.connect(server.endpoint)
            d.send_multipart(codec.encode(_init(src, f"i{src}"), [torch.zeros(2)] if src == 0 else []))
            dealers.append(d)
        for _ in range(2):
            frames = server.sock.recv_multipart(copy=False)
            server.handle(frames[0].bytes, frames[1:])
        assert server.gate is not None and not server.dropped
        server.members.probe(server.gate.pushed)
        assert not server.members.departed
        dealers[1].close(linger=0)  # as a killed worker's kernel closes its connection
        closed = time.monotonic()
        while not server.members.departed and time.monotonic() - closed < 5:
            time.sleep(0.05)
            server.members.probe(server.gate.pushed)
        assert server.members.departed == {1} and server.gate.absent == {1}
        assert time.monotonic() - closed < 2.0
        assert [(d["worker"], d["clock"]) for d in server.members.departures] == [(1, 0)]
    finally:
        for d in dealers:
            d.close(linger=0)
        ctx.term()
        server.close(linger_ms=0)


def test_a_new_incarnation_rejoins_at_its_clock_and_old_or_replayed_ones_are_refused():
    from shoal.ps.server import Server

    codec = Codec(KEY)
    server = Server(0, codec)
    SESSION["session"] = server.session
    sent: list[tuple[bytes, dict]] = []
    server.send = lambda ident, header, tensors=(): sent.append((ident, header))  # type: ignore[method-assign]
    try:
        for src in (0, 1):
            server.handle(f"a{src}".encode(), codec.encode(_init(src, f"a{src}"), [torch.zeros(2)] if src == 0 else []))
        for src in (0, 1):
            server.handle(f"a{src}".encode(), codec.encode(_push(src, 2, 0), [torch.ones(2)]))
        assert server.gate is not None and server.gate.pushed == [1, 1] and not server.dropped
        server.handle(b"b1", codec.encode(_init(1, "b1")))  # worker 1 restarted: a new process
        assert sent[-1] == (b"b1", {"op": "params", "clock": 1, "applied": 2, "rejoined": True, "re": 1})
        assert [(r["worker"], r["clock"]) for r in server.members.rejoins] == [(1, 1)]
        server.handle(b"a1", codec.encode(_push(1, 3, 1), [torch.ones(2)]))  # the old process, late
        assert server.dropped == {"stale_sender": 1} and server.gate.pushed == [1, 1]
        server.handle(b"b1", codec.encode(_push(1, 2, 1), [torch.ones(2)]))  # the new one goes on at clock 1
        assert server.gate.pushed == [1, 2] and server.applied == 3
        server.handle(b"b1", codec.encode(_push(1, 3, 1), [torch.ones(2)]))  # clock 1 again: refused
        for replay in (_init(1, "b1", seq=9), _init(1, "a1", seq=9)):  # an incarnation seen before
            server.handle(b"c1", codec.encode(replay))
        assert server.dropped == {"stale_sender": 1, "bad_clock": 1, "replayed": 2} and server.gate.pushed == [1, 2]
        torch.testing.assert_close(server.pieces["w"].param, -3 * torch.ones(2), rtol=0, atol=0)  # 3 pushes once each
    finally:
        server.close(linger_ms=0)


def test_a_worker_killed_mid_push_gets_the_values_before_its_push_from_the_server_ahead():
    """BSP: the server applied clock 0, so worker 1's push of it reached this server but maybe not
    another. Its new process asks for the values before that push (`previous`) and gets the reply
    snapshot kept from clock 0, not the current values; its push of clock 0 again is refused."""
    from shoal.ps.server import Server

    codec = Codec(KEY)
    server = Server(0, codec)
    SESSION["session"] = server.session
    spec = {**SPEC, "keys": [["w", "float32", [2], "bsp", 0, 0]]}
    sent: list[tuple[dict, list[torch.Tensor]]] = []
    server.send = lambda ident, header, tensors=(): sent.append((header, list(tensors)))  # type: ignore[method-assign]

    def handle(ident: bytes, header: dict, tensors: list[torch.Tensor] = ()) -> None:
        server.handle(ident, codec.encode({**header, **SESSION}, list(tensors)))

    def pull(src: int, seq: int, clock: int, **more: object) -> dict:
        return {"op": "pull", "src": src, "seq": seq, "clock": clock, **more}

    try:
        for src in (0, 1):
            handle(f"a{src}".encode(), {**_init(src, f"a{src}"), "spec": spec}, [torch.zeros(2)] if src == 0 else [])
        for src in (0, 1):
            handle(f"a{src}".encode(), pull(src, 2, 0))  # answered at once: a snapshot of clock 0's values
        for src in (0, 1):
            handle(f"a{src}".encode(), _push(src, 3, 0), [torch.ones(2)])
        assert server.gate is not None and server.gate.bsp_done == 1 and not server.dropped
        current = server.pieces["w"].param.clone()
        assert current.tolist() == [-1.0, -1.0]
        handle(b"b1", {**_init(1, "b1"), "spec": spec})  # a new process: this server holds its push of clock 0
        assert sent[-1][0]["clock"] == 1 and sent[-1][0]["rejoined"] is True
        handle(b"b1", pull(1, 2, 0, previous=True))
        header, (values,) = sent[-1]
        assert header["previous"] is True and header["clock"] == 0 and "inexact" not in header
        assert values.tolist() == [0.0, 0.0]  # clock 0's values, not the current ones
        handle(b"b1", pull(1, 3, 1, previous=True))  # not the clock before its last push
        handle(b"b1", pull(1, 4, 0, previous="yes"))
        handle(b"b1", _push(1, 5, 0), [torch.ones(2)])  # step 0 again: applied here already
        assert server.dropped == {"bad_clock": 2, "malformed": 1}
        torch.testing.assert_close(server.pieces["w"].param, current, rtol=0, atol=0)
        server.kept.clear()  # e.g. a backup promoted since: the answer says it is not exact
        handle(b"b1", pull(1, 6, 0, previous=True))
        header, (values,) = sent[-1]
        assert header["inexact"] is True and values.tolist() == [-1.0, -1.0]
    finally:
        server.close(linger_ms=0)


def test_the_servers_heartbeat_is_the_leases_not_the_transports_default():
    """`Transport.listen` sets generous heartbeats for every socket; a server's must stay the lease."""
    from shoal.ps import membership
    from shoal.ps.server import Server

    server = Server(0, Codec(KEY))
    try:
        assert server.sock.getsockopt(zmq.HEARTBEAT_TIMEOUT) == membership.HEARTBEAT_TIMEOUT_MS
        assert server.sock.getsockopt(zmq.HEARTBEAT_IVL) == membership.HEARTBEAT_IVL_MS
    finally:
        server.close(linger_ms=0)


def test_a_world_over_the_servers_file_limit_stops_the_job_in_one_sentence():
    """Each worker holds a connection to each server, and a server process's open files are capped
    (`SHOAL_PS_MAX_CONNECTIONS`): a world that cannot fit is refused at the first init, naming the fix."""
    import resource

    from shoal.ps.server import Server

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    server = Server(0, Codec(KEY))
    client = zmq.Context.instance().socket(zmq.DEALER)
    try:
        server.codec.transport.connect(client)
        client.connect(server.endpoint)
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
        header = {**_init(0, "a"), "world": 300, "session": server.session}
        client.send_multipart(server.codec.encode(header, [torch.zeros(2)]))
        assert server.sock.poll(5000)
        frames = server.sock.recv_multipart(copy=False)
        server.handle(frames[0].bytes, frames[1:])
        assert client.poll(5000)
        reply, _ = server.codec.decode(client.recv_multipart())
        assert reply["op"] == "error" and server.done
        assert reply["message"] == (
            "300 workers need about 364 connections to parameter server 0, over its limit of 256 open files; "
            "raise SHOAL_PS_MAX_CONNECTIONS (and `ulimit -n` if lower)"
        )
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        client.close(linger=0)
        server.close(linger_ms=0)
