"""Compressed pulls in one process (`shoal.ps.pull_codec`): a server's encoder and a
worker's decoder, without sockets. The multi-process checks are in
tests/multiproc/test_ps_jobs.py (BSP equals one process that compresses both ways)."""

from __future__ import annotations

import pytest
import torch

from shoal.errors import ConfigError, ShoalError
from shoal.ps import optim
from shoal.ps.consistency import Mode
from shoal.ps.pieces import PieceState
from shoal.ps.pull_codec import PullDecoder, PullEncoder
from shoal.strategies.parameter_server.layout import Slice

SHAPES = {"w": (32, 24), "b": (32,)}


def pieces(seed: int = 0, dtype: torch.dtype = torch.float32) -> list[PieceState]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for key, shape in SHAPES.items():
        param = torch.randn(shape, generator=gen).to(dtype).reshape(-1)
        piece = PieceState(key, param, optim.build("SGD", param, {"lr": 0.1}), Mode("bsp"), 0)
        piece.code_shape = shape
        out.append(piece)
    return out


class Worker:
    """A worker's parameters, starting from the values the join sends whole."""

    def __init__(self, held: list[PieceState], spec: str):
        self.params = [p.param.detach().clone().reshape(SHAPES[p.key]) for p in held]
        self.slices = [Slice(p.key, t, 0, t.numel()) for p, t in zip(held, self.params, strict=True)]
        self.decoder = PullDecoder(spec)

    def take(self, reply) -> None:
        header = {} if reply.codes is None else {"codes": reply.codes}
        self.decoder.install(0, header, list(reply.tensors), self.slices, list(SHAPES.values()))

    def flat(self) -> list[torch.Tensor]:
        return [p.reshape(-1) for p in self.params]


def train_step(held: list[PieceState], gen: torch.Generator) -> None:
    """What an optimizer step does to the server's values: an in-place change."""
    for p in held:
        p.param.add_(torch.randn(p.param.shape, generator=gen), alpha=0.01)


@pytest.mark.parametrize("spec", ["topk:0.1", "int8", "powersgd:rank=2", "fp16"])
def test_bsp_workers_share_one_encode_and_hold_what_the_server_records(spec):
    """Workers pulling the same version get one payload, decode it to the same bits,
    and the server's record of their copy is exactly what they hold: nothing drifts."""
    held, gen = pieces(), torch.Generator().manual_seed(1)
    enc = PullEncoder(spec, held, workers=2)
    workers = [Worker(held, spec), Worker(held, spec)]
    for _ in range(8):
        train_step(held, gen)
        replies = [enc.reply(w) for w in range(2)]
        assert replies[0] is replies[1]  # one encode for both
        for w, reply in zip(workers, replies, strict=True):
            w.take(reply)
        record = enc.held[0]
        assert record is enc.held[1] and record is not None
        for a, b, r in zip(workers[0].flat(), workers[1].flat(), record.values, strict=True):
            assert torch.equal(a, b) and torch.equal(a, r)
    assert enc.encodes == 8 and enc.memory()[0] == 1  # one copy of the pieces, not one per worker
    lag = max(float((p.param - r).abs().max()) for p, r in zip(held, enc.held[0].values, strict=True))
    assert 0 < lag < 0.1  # lossy, but following (without compression the lag would be 0)


@pytest.mark.parametrize("spec", ["topk:0.1", "int8", "powersgd:rank=2"])
def test_error_feedback_delivers_what_was_held_back(spec):
    """Once the values stop changing, further pulls send what earlier ones left out:
    the worker's copy converges to the server's values."""
    held, gen = pieces(), torch.Generator().manual_seed(2)
    enc = PullEncoder(spec, held, workers=1)
    worker = Worker(held, spec)
    for _ in range(5):
        train_step(held, gen)
        worker.take(enc.reply(0))
    gap = max(float((p.param - c).abs().max()) for p, c in zip(held, worker.flat(), strict=True))
    for _ in range(60):
        worker.take(enc.reply(0))
    after = max(float((p.param - c).abs().max()) for p, c in zip(held, worker.flat(), strict=True))
    assert gap > 1e-4 and after < 1e-5 * gap, (gap, after)


def test_asp_workers_keep_their_own_copies_and_a_slow_one_costs_no_chain():
    """Each worker reads at its own time; a worker sitting on an old copy while another
    pulls 20 times keeps memory bounded, and its next pull still lands on its own copy."""
    held, gen = pieces(), torch.Generator().manual_seed(3)
    enc = PullEncoder("topk:0.1", held, workers=2)
    fast, slow = Worker(held, "topk:0.1"), Worker(held, "topk:0.1")
    for _ in range(20):
        train_step(held, gen)
        fast.take(enc.reply(0))
    assert enc.memory()[0] <= 3, enc.memory()
    train_step(held, gen)
    slow.take(enc.reply(1))
    for w, record in ((fast, enc.held[0]), (slow, enc.held[1])):
        assert record is not None and all(torch.equal(a, b) for a, b in zip(w.flat(), record.values, strict=True))
    assert enc.held[0] is not enc.held[1] and enc.memory()[0] == 2
    copy_bytes = sum(p.param.numel() * 4 for p in held)
    assert enc.memory()[1] == 2 * copy_bytes


def test_exact_pulls_restore_and_overflow_send_whole_values():
    """A pull that asks for exact values, the first pull after a restore, and a piece whose
    compressed delta overflows fp16 are all sent whole, and the record follows."""
    held, gen = pieces(), torch.Generator().manual_seed(4)
    enc = PullEncoder("fp16", held, workers=2)
    a, b = Worker(held, "fp16"), Worker(held, "fp16")
    train_step(held, gen)
    reply = enc.reply(0, exact=True)
    assert reply.codes is None
    a.take(reply)
    assert all(torch.equal(p.param, c) for p, c in zip(held, a.flat(), strict=True))
    held[0].param.copy_(torch.full_like(held[0].param, 1e6))  # a restore: values replaced
    enc.forget()
    b.take(reply := enc.reply(1))
    assert reply.codes is None and all(torch.equal(p.param, c) for p, c in zip(held, b.flat(), strict=True))
    held[1].param.add_(1e5)  # beyond fp16's range: that piece goes whole, the other compressed
    reply = enc.reply(1)
    assert reply.codes is not None and reply.codes[1] is None and reply.codes[0] is not None
    b.take(reply)
    assert torch.equal(b.flat()[1], held[1].param) and enc.whole == 1


def test_a_worker_refuses_a_reply_that_does_not_match_its_layout():
    held = pieces()
    enc = PullEncoder("topk:0.1", held, workers=1)
    train_step(held, torch.Generator().manual_seed(5))
    reply = enc.reply(0)
    worker = Worker(held, "topk:0.1")
    with pytest.raises(ShoalError, match="expected 2"):
        worker.decoder.install(0, {"codes": reply.codes[:1]}, list(reply.tensors), worker.slices, list(SHAPES.values()))
    bad = list(reply.tensors)
    bad[0] = torch.full_like(bad[0], 10_000)  # top-k indices out of range
    with pytest.raises(ShoalError, match="bad compressed pull"):
        worker.decoder.install(0, {"codes": reply.codes}, bad, worker.slices, list(SHAPES.values()))
    with pytest.raises(ShoalError, match="did not ask"):
        Worker(held, "none").take(reply)


def test_pull_compression_follows_the_push_spec_unless_given():
    import shoal

    assert shoal.ParameterServer(compression="int8").options.pulled_with == "int8"
    assert shoal.ParameterServer(compression="int8", pull_compression="none").options.pulled_with == "none"
    assert shoal.ParameterServer(pull_compression="topk:0.01").options.pulled_with == "topk:0.01"
    with pytest.raises(ConfigError, match="'pull_compression' = 'topk:2'") as err:
        shoal.ParameterServer(pull_compression="topk:2")
    assert err.value.key == "pull_compression"


def test_low_rank_decode_is_a_fixed_order_sum_close_to_the_matmul():
    from shoal.compress.lowrank import low_rank_product

    gen = torch.Generator().manual_seed(6)
    p, q = torch.randn(300, 4, generator=gen), torch.randn(200, 4, generator=gen)
    torch.testing.assert_close(low_rank_product(p, q), p @ q.T)
    assert torch.equal(low_rank_product(p, q), low_rank_product(p.clone(), q.clone()))
