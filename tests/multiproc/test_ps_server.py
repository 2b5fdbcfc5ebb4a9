"""A live server process against hostile input and against a dead worker.

The test process plays the workers itself (shoal.ps.client.Client), so only
the server is a separate process."""

from __future__ import annotations

import os
import pickle
import random
import time

import pytest
import torch
import zmq

from shoal import env
from shoal.comm.wire import Codec
from shoal.errors import ShoalError
from shoal.ps.client import Client, request_stats
from tests.helpers.procs import Processes
from tests.helpers.ps import servers

LIMIT = 1 << 20


def _spec(timeout_s: float = 30.0) -> dict:
    return {
        "optim": "SGD",
        "timeout_s": timeout_s,
        "groups": [{"lr": 0.5, "momentum": 0.0}],
        "keys": [["w", "float32", [8], "bsp", 0, 0], ["b", "float32", [2], "asp", 0, 0]],
    }


@pytest.fixture
def server():
    with Processes() as procs:
        group = servers(procs, 1, {env.PS_MAX_BYTES: str(LIMIT)})
        try:
            yield group, group.endpoints()[0], group.job_key.encode()
        finally:
            group.stop()


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {_Evil.marker}",))


def test_hostile_messages_are_dropped_and_the_server_keeps_serving(server, tmp_path):
    group, endpoint, key = server
    codec = Codec(key, LIMIT)
    client = Client([endpoint], codec, rank=0, world=1, timeout_s=20)
    w0, b0 = torch.arange(8, dtype=torch.float32), torch.ones(2)
    client.init([_spec()], [[w0, b0]])
    ctx = zmq.Context()
    evil = ctx.socket(zmq.DEALER)
    evil.setsockopt(zmq.LINGER, 0)
    codec.transport.connect(evil)  # an insider with the job key: the message checks are what is tested
    evil.connect(endpoint.endpoint)
    rng = random.Random(0)

    def push(src=0, seq=10**6, keys=("w",), grads=None, with_codec=codec, clock=0):
        grads = [torch.ones(8)] if grads is None else list(grads)
        return with_codec.encode(
            {"op": "push", "src": src, "seq": seq, "clock": clock, "keys": list(keys), "hp": [{}], **endpoint.header},
            grads,
        )

    _Evil.marker = str(tmp_path / "pwned")
    good = push()
    sent = []
    sent += [[rng.randbytes(rng.randint(0, 200))] for _ in range(30)]  # random single frames
    sent += [
        [rng.randbytes(rng.randint(0, 64)) for _ in range(rng.randint(2, 5))] for _ in range(30)
    ]  # random multi-frame
    sent += [good[:2], [*good[:-1], bytes(good[-1])[:-4]], [good[0][:-1], *good[1:]]]  # truncated frames
    # another job's key, without CURVE (under CURVE it gets no connection: tests/multiproc/test_ps_security.py)
    sent += [push(with_codec=Codec(b"another job's key 123456", transport=codec.transport))] if codec.signed else []
    sent += [[b"\0" * 32, *good[1:]], good[1:], [b"", *good[1:]]]  # a zero MAC, no seal, an empty one
    evil_pickle = pickle.dumps(_Evil())
    sent += [[b"\0" * 32, evil_pickle], codec._sealed(evil_pickle, ())]  # pickle, even with a valid MAC or tags
    sent += [push(keys=("nope",)), push(grads=(torch.ones(9),)), push(grads=(torch.ones(8, dtype=torch.float64),))]
    sent += [push(keys=("w", "w"), grads=(torch.ones(8), torch.ones(8))), push(src=7), push(clock=3)]
    sent += [codec._sealed(b"\x93\x01\x02\x03", ())]  # a header that is not a map
    big = [b"x" * (LIMIT // 2 + 10)] * 2
    sent += [codec._sealed(b"h", big)]  # oversized in total
    for frames in sent:
        evil.send_multipart(frames)
    client.push(0, [(["w", "b"], [torch.full((8,), 2.0), torch.full((2,), 4.0)])], [{"lr": 0.5}])
    client.request_pull(1)
    evil.send_multipart(push(seq=1, clock=1))  # authentic, but sequence number 1 was used by the init: a replay
    ((_, (w1, b1)),) = client.wait_pull(1)
    deadline = time.monotonic() + 10  # the other connection's messages may still be on their way
    while True:
        stats, _ = request_stats(ctx, endpoint, codec)
        if sum(stats["dropped"].values()) >= len(sent) + 1 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    evil.close()
    ctx.term()

    assert not os.path.exists(_Evil.marker)
    # only the one legitimate push changed anything: w - 0.5 * 2, b - 0.5 * 4
    torch.testing.assert_close(w1, w0 - 1.0, rtol=0, atol=0)
    torch.testing.assert_close(b1, b0 - 2.0, rtol=0, atol=0)
    assert stats["pushed"] == [1] and stats["steps"] == {"w": 1, "b": 1}
    dropped = stats["dropped"]
    assert sum(dropped.values()) == len(sent) + 1, dropped
    for reason in (
        "malformed",
        *(["unauthenticated"] if codec.signed else []),
        "oversized",
        "unknown_key",
        "bad_shape",
        "bad_sender",
        "bad_clock",
        "replayed",
    ):
        assert dropped.get(reason), (reason, dropped)
    assert group.poll() == [None]
    client.close()


def test_bsp_server_names_the_missing_worker_and_stops_the_job(server):
    group, endpoint, key = server
    codec = Codec(key, LIMIT)
    alive = Client([endpoint], codec, rank=0, world=2, timeout_s=20)
    dead = Client([endpoint], codec, rank=1, world=2, timeout_s=20)
    spec = _spec(timeout_s=2.0)
    for c in (alive, dead):  # both join; the server answers once both have
        c._send(0, {"op": "init", "world": 2, "spec": spec}, [torch.zeros(8), torch.zeros(2)] if c.rank == 0 else [])
    alive._collect("params", 0)
    dead._collect("params", 0)
    dead.socks[0].close(linger=0)  # worker 1 "dies": it never pushes clock 0
    alive.push(0, [(["w", "b"], [torch.ones(8), torch.ones(2)])], [{}])
    alive.request_pull(1)
    start = time.monotonic()
    with pytest.raises(ShoalError, match=r"worker\(s\) \[1\]"):
        alive.wait_pull(1)
    assert time.monotonic() - start < 10
    group.procs[0].wait(10)
    assert group.poll() == [1]


def test_checkpoint_state_round_trips_and_bad_restores_change_nothing(server):
    group, endpoint, key = server
    codec = Codec(key, LIMIT)
    client = Client([endpoint], codec, rank=0, world=1, timeout_s=20)
    spec = {**_spec(), "groups": [{"lr": 0.5, "momentum": 0.9}]}
    w0, b0 = torch.arange(8, dtype=torch.float32), torch.ones(2)
    client.init([spec], [[w0, b0]])
    ((header, tensors),) = client.state(0)
    assert header["state"] == [["w", []], ["b", []]]  # no step yet: no momentum
    torch.testing.assert_close(tensors, [w0, b0], rtol=0, atol=0)

    w, mw, b, mb = torch.full((8,), 5.0), torch.ones(8), torch.full((2,), 3.0), torch.full((2,), 2.0)
    bad = [
        ([["w", ["momentum_buffer"]]], [w, mw]),  # a piece missing
        ([["b", ["momentum_buffer"]], ["w", ["momentum_buffer"]]], [b, mb, w, mw]),  # wrong order
        ([["w", ["momentum_buffer"]], ["b", ["momentum_buffer"]]], [w, torch.ones(7), b, mb]),  # wrong shape
        ([["w", ["momentum_buffer"]], ["b", ["momentum_buffer"]]], [w, mw.double(), b, mb]),  # wrong dtype
        ([["w", ["exp_avg"]], ["b", []]], [w, mw, b]),  # not SGD's state
        ([["w", ["momentum_buffer"]], ["b", []]], [w, mw, b, mb]),  # a tensor too many
        ([["w", ["momentum_buffer", "momentum_buffer"]], ["b", []]], [w, mw, mw, b]),  # named twice
        ("not a list", [w, b]),
    ]
    for layout, ts in bad:
        client._send(0, {"op": "restore", "state": layout}, ts)
    client.restore([[["w", ["momentum_buffer"]], ["b", ["momentum_buffer"]]]], [[w, mw, b, mb]])
    stats, (ws, bs) = client.stats(0)
    assert stats["dropped"] == {"malformed": len(bad)}, stats["dropped"]
    torch.testing.assert_close([ws, bs], [w, b], rtol=0, atol=0)

    # one step with gradient g continues from the restored momentum: m = 0.9 m + g, p -= 0.5 m
    client.push(0, [(["w", "b"], [torch.ones(8), torch.ones(2)])], [{"lr": 0.5}])
    ((header, tensors),) = client.state(1)
    assert header["state"] == [["w", ["momentum_buffer"]], ["b", ["momentum_buffer"]]]
    torch.testing.assert_close(
        tensors, [w - 0.5 * 1.9, torch.full((8,), 1.9), b - 0.5 * 2.8, torch.full((2,), 2.8)], rtol=0, atol=1e-6
    )
    client._send(0, {"op": "restore", "state": [["w", []], ["b", []]]}, [w, b])  # after a push: refused
    stats, (ws, _) = client.stats(0)
    assert stats["dropped"] == {"malformed": len(bad), "bad_restore": 1}, stats["dropped"]
    torch.testing.assert_close(ws, w - 0.5 * 1.9, rtol=0, atol=1e-6)
    assert group.poll() == [None]
    client.close()


def test_compressed_pushes_are_checked_decoded_and_skips_drop_the_clock(server):
    from shoal.compress import parse

    _, endpoint, key = server
    codec = Codec(key, LIMIT)
    client = Client([endpoint], codec, rank=0, world=1, timeout_s=20)
    spec = {**_spec(), "compression": "topk:0.25", "code_shapes": [[2, 4], [2]]}
    w0, b0 = torch.arange(8, dtype=torch.float32), torch.ones(2)
    client.init([spec], [[w0, b0]])
    sender = parse("topk:0.25")
    gw, gb = torch.tensor([[0.0, 4.0, 0.0, 0.0], [0.0, 0.0, -2.0, 0.0]]), torch.tensor([1.0, 0.0])
    pw, pb = sender.encode("w", gw), sender.encode("b", gb)
    (iw, vw), (ib, vb) = pw.tensors, pb.tensors

    def push(codes, tensors, keys=("w", "b"), clock=0, **extra):
        client._send(
            0, {"op": "push", "clock": clock, "keys": list(keys), "hp": [{}], "codes": codes, **extra}, tensors
        )

    bad = [
        ([pw.header, pb.header], [iw, vw, ib]),  # a tensor missing
        ([pw.header], [iw, vw, ib, vb]),  # a code missing
        (None, [gw.reshape(-1), gb]),  # uncompressed to a compressing server
        ([pw.header, pb.header], [torch.tensor([8, 1], dtype=torch.int32), vw, ib, vb]),  # index past the end
        ([pw.header, pb.header], [torch.tensor([-1, 1], dtype=torch.int32), vw, ib, vb]),  # negative index
        ([pw.header, pb.header], [iw, vw.float(), ib, vb]),  # values in the wrong dtype
        ([{"nonfinite": True}, pb.header], [iw, vw, ib, vb]),  # an overflow: must be a skip
        ([pw.header, pb.header], [iw, vw, ib, torch.full_like(vb, float("inf"))]),  # non-finite without the flag
    ]
    for codes, tensors in bad:
        push(codes, tensors)
    client._send(0, {"op": "push", "clock": 0, "keys": ["w"], "hp": [{}], "skip": True}, [])  # a skip carries nothing
    push([pw.header, pb.header], [iw, vw, ib, vb])
    client.request_pull(1)
    ((_, (w1, b1)),) = client.wait_pull(1)
    # top-25% of w: 4.0 and -2.0 (bf16-exact); of b: 1.0; SGD lr 0.5
    torch.testing.assert_close(w1, w0 - 0.5 * gw.reshape(-1), rtol=0, atol=0)
    torch.testing.assert_close(b1, b0 - 0.5 * gb, rtol=0, atol=0)

    client.push(1, [([], [])], [{}], skip=True)  # worker skipped clock 1 (its gradient overflowed)
    client.request_pull(2)
    ((_, (w2, b2)),) = client.wait_pull(2)
    torch.testing.assert_close([w2, b2], [w1, b1], rtol=0, atol=0)
    stats, _ = client.stats(0)
    assert stats["dropped"] == {"malformed": 4, "bad_payload": 5}, stats["dropped"]
    assert (
        stats["pushed"] == [2]
        and stats["bsp_done"] == 2
        and stats["skipped"] == 1
        and stats["steps"] == {"w": 1, "b": 1}
    )
    client.close()
