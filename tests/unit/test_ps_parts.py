"""A clock's push in several messages (`shoal.ps.parts`), through a real `Server.handle` in this
process: parts are checked on arrival, nothing counts before the last message, and the result
equals the push sent whole."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from shoal.comm.wire import Codec
from shoal.ps.protocol import INIT, PUSH
from shoal.ps.server import Server

KEYS = ["a", "b", "c"]
SPEC = {
    "optim": "SGD",
    "timeout_s": 30.0,
    "compression": "none",
    "groups": [{"lr": 0.5, "momentum": 0.9}],
    "keys": [[k, "float32", [4], "bsp", 0, 0] for k in KEYS],
    "code_shapes": [[4] for _ in KEYS],
}
HP = [{"lr": 0.5, "momentum": 0.9}]


class Job:
    """A server with two joined workers, and what they send it."""

    def __init__(self) -> None:
        self.codec = Codec(b"k" * 32)
        self.server = Server(0, self.codec)
        self.seq = [0, 0]
        values = [torch.arange(4, dtype=torch.float32) + i for i in range(len(KEYS))]
        for w in (0, 1):
            self.send(w, {"op": INIT, "world": 2, "spec": SPEC}, values if w == 0 else [])

    def send(self, w: int, header: dict, tensors: list[torch.Tensor]) -> None:
        self.seq[w] += 1
        addressed = {"to": self.server.index, "session": self.server.session}  # `shoal.comm.replay`
        message = {**header, "src": w, "seq": self.seq[w], **addressed}
        # cloned: a socket hands the server frames of its own, which it may sum into
        self.server.handle(b"w%d" % w, self.codec.encode(message, [t.clone() for t in tensors]))

    def part(self, w: int, clock: int, keys: list[str], grads: dict, **extra) -> None:
        self.send(w, {"op": PUSH, "clock": clock, "keys": keys, "part": True, **extra}, [grads[k] for k in keys])

    def last(self, w: int, clock: int, keys: list[str], grads: dict, parts: int = 0) -> None:
        header = {"op": PUSH, "clock": clock, "keys": keys, "hp": HP, **({"parts": parts} if parts else {})}
        self.send(w, header, [grads[k] for k in keys])

    def values(self) -> dict[str, torch.Tensor]:
        return {k: p.param.clone() for k, p in self.server.pieces.items()}

    def close(self) -> None:
        self.server.close(linger_ms=0)  # with its ZAP handler, or the context waits for it


@pytest.fixture
def jobs():
    made: list[Job] = []

    def make() -> Job:
        made.append(Job())
        return made[-1]

    yield make
    for job in made:
        job.close()


def grads(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(4, generator=gen) for k in KEYS}


def test_parts_apply_with_the_last_message_and_equal_the_push_sent_whole(jobs):
    whole, split = jobs(), jobs()
    for clock in range(3):
        g0, g1 = grads(2 * clock), grads(2 * clock + 1)
        whole.last(0, clock, KEYS, g0)
        whole.last(1, clock, KEYS, g1)
        before = split.values()
        split.part(0, clock, ["c"], g0)
        split.part(0, clock, ["a"], g0)
        split.last(1, clock, KEYS, g1)
        assert split.server.gate is not None and split.server.gate.pushed == [clock, clock + 1]
        assert all(torch.equal(before[k], v) for k, v in split.values().items())  # nothing applied yet
        split.last(0, clock, ["b"], g0, parts=2)
        assert split.server.gate.pushed == [clock + 1, clock + 1]
        assert not split.server.dropped
        for k, v in whole.values().items():
            assert torch.equal(split.values()[k], v), k
    assert {p.steps for p in split.server.pieces.values()} == {3}


def test_bad_parts_are_dropped_and_change_nothing(jobs):
    job = jobs()
    g = grads(0)
    job.part(0, 0, ["a"], g)
    job.part(0, 0, ["a", "b"], g)  # repeats a piece of this clock
    job.part(0, 1, ["b"], g)  # another clock
    job.part(0, 0, ["b"], g, skip=True)
    job.last(0, 0, ["a", "b", "c"], g, parts=1)  # repeats the part's piece
    job.last(0, 0, ["b", "c"], g, parts=2)  # one part arrived, not two
    assert job.server.dropped == {"malformed": 3, "bad_clock": 1, "missing_parts": 1}
    assert job.server.gate is not None and job.server.gate.pushed == [0, 0]
    job.last(0, 0, ["b", "c"], g, parts=1)  # the right last message still completes the push
    assert job.server.gate.pushed == [1, 0]


def test_a_non_finite_part_skips_the_whole_clock(jobs):
    job = jobs()
    before = job.values()
    bad = grads(0)
    bad["a"][1] = float("nan")
    job.part(0, 0, ["a"], bad)
    job.last(0, 0, ["b", "c"], bad, parts=1)
    job.last(1, 0, KEYS, grads(1))
    assert job.server.nonfinite == 1 and job.server.skipped == 1
    assert job.server.gate is not None and job.server.gate.bsp_done == 1
    assert all(torch.equal(before[k], v) for k, v in job.values().items())


def test_a_sigterm_during_a_push_waits_until_every_server_has_its_message():
    """torch's agent restarts a worker with SIGTERM at any point of a step: one that landed between the
    push to one server and to the next would leave the first a clock ahead (`Client.push`). Held until
    the block ends, then delivered as it would have been (here to the test's own handler)."""
    import os
    import signal

    import zmq

    from shoal.ps.client import _sigterm_after

    seen: list[str] = []
    before = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append("handled"))
    ctx = zmq.Context()
    try:
        with _sigterm_after(ctx):
            os.kill(os.getpid(), signal.SIGTERM)
            seen.append("pushed to every server")
        assert seen == ["pushed to every server", "handled"] and ctx.closed
    finally:
        signal.signal(signal.SIGTERM, before)
        if not ctx.closed:
            ctx.term()


def test_pushing_during_backward_is_the_default_on_gpus_only():
    from shoal.strategies.parameter_server.overlap import overlaps

    cpu = [torch.zeros(2)]
    gpu = [SimpleNamespace(device=torch.device("cuda", 0))]  # only its device is read; no GPU here
    assert not overlaps(None, "none", cpu)  # measured slower on CPUs
    assert overlaps(None, "none", cpu + gpu) and not overlaps(False, "none", gpu)
    assert overlaps(True, "none", cpu) and not overlaps(False, "none", cpu)
    assert not overlaps(True, "int8", cpu) and not overlaps(None, "int8", gpu)
