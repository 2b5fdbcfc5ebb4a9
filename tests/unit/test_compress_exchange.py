"""Unit tests of the DP hook's two-phase exchange for int8/qsgd, without
processes: the chunk plan splits a bucket into whole blocks, each element in
exactly one chunk; the re-rounding does not depend on how a tensor is split;
and the exchange, with the collectives simulated, gives every rank the same
bits as the one-process reference, whatever the bucket's order."""

from __future__ import annotations

import itertools

import pytest
import torch

from shoal.compress import parse
from shoal.compress.ddp_hooks import ChunkPlan, wire_bytes
from shoal.compress.quantize import BLOCK, SEGMENT
from tests.helpers.exchange import two_phase_reference

SHAPES = {"a": (10,), "b": (300, 257), "c": (3,), "d": (SEGMENT + 700,), "e": (4, BLOCK)}


@pytest.mark.parametrize("world", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("numels", [[10], [BLOCK * 5], [3, BLOCK + 1, 2 * SEGMENT + 5, 0, 17]])
def test_plan_covers_every_element_once_in_whole_blocks(numels, world):
    plan = ChunkPlan(numels, 8, torch.float32, world)
    assert len(plan.chunks) == world
    seen = [torch.zeros(n, dtype=torch.int64) for n in numels]
    order = []
    for pieces in plan.chunks:
        for i, start, end in pieces:
            assert start % BLOCK == 0 and start < end <= numels[i]
            seen[i][start:end] += 1
            order.append((i, start))
    assert all(bool((s == 1).all()) for s in seen)
    assert order == sorted(order)  # chunks run through the bucket in order
    blocks = [sum(-(-(e - s) // BLOCK) for _, s, e in pieces) for pieces in plan.chunks]
    assert max(blocks) == -(-sum(-(-n // BLOCK) for n in numels) // world)
    used = max(sum(-(-(e - s) // BLOCK) * 4 + e - s for _, s, e in pieces) for pieces in plan.chunks)
    assert plan.size == used + -used % 8  # scales and 8-bit codes, padded to 8 bytes


@pytest.mark.parametrize("spec", ["int8", "qsgd:levels=4"])
def test_requantize_is_the_same_however_the_tensor_is_split(spec):
    x = torch.randn(3 * SEGMENT + 1000, generator=torch.Generator().manual_seed(1))
    coder = parse(spec)
    whole = coder.requantize("w", 5, x, 0)
    cuts = [0, BLOCK * 3, SEGMENT - BLOCK, SEGMENT + BLOCK * 40, 3 * SEGMENT, x.numel()]
    other = parse(spec)
    other.reseed(1_234)  # rank-independent: the encoder's seed plays no part
    parts = [other.requantize("w", 5, x[a:b], a) for a, b in itertools.pairwise(cuts)]
    assert torch.equal(whole.tensors[0], torch.cat([p.tensors[0] for p in parts]))
    assert torch.equal(whole.tensors[1], torch.cat([p.tensors[1] for p in parts]))
    assert not torch.equal(whole.tensors[0], coder.requantize("w", 6, x, 0).tensors[0])  # a new step, new noise
    assert not other.counts  # the caller passes the count; requantize keeps none
    err = coder.decode(whole, x.shape, x.dtype) - x
    assert float(err.abs().max()) <= float(x.abs().max()) / coder.levels * (1 + 1e-6)


def simulate(spec: str, grads: list[dict[str, torch.Tensor]], order: list[str], step: int) -> list[dict]:
    """The hook's three steps on every rank, the collectives done by slicing."""
    world = len(grads)
    coders = []
    for r in range(world):
        coder = parse(spec)
        coder.reseed(1_000 + r)
        coder.counts = dict.fromkeys(order, step)
        coders.append(coder)
    dtype = grads[0][order[0]].dtype
    plan = ChunkPlan(
        [grads[0][k].numel() for k in order],
        coders[0].bits,
        parse(spec).encode("x", torch.zeros(1, dtype=dtype)).tensors[1].dtype,
        world,
    )
    sends = [plan.send([coders[r].encode(k, grads[r][k]) for k in order]) for r in range(world)]
    assert all(s.numel() == world * plan.size for s in sends)
    size = plan.size
    reduced = [
        plan.reduce(
            j, torch.cat([s[j * size : (j + 1) * size] for s in sends]), coders[j], order, [step] * len(order), dtype
        )
        for j in range(world)
    ]
    out = []
    for r in range(world):
        held = {k: torch.full_like(grads[r][k], float("nan")) for k in order}
        plan.decode([t.clone() for t in reduced], coders[r], [held[k] for k in order])
        out.append(held)
    return out


@pytest.mark.parametrize("spec", ["int8", "qsgd:levels=4"])
@pytest.mark.parametrize("world", [2, 3, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_simulated_exchange_equals_the_reference_on_every_rank(spec, world, dtype):
    gen = torch.Generator().manual_seed(world)
    grads = [
        {k: (torch.randn(s, generator=gen) * 10.0 ** -(i % 3)).to(dtype) for i, (k, s) in enumerate(SHAPES.items())}
        for _ in range(world)
    ]
    want = two_phase_reference(spec, grads, step=3)
    for order in (list(SHAPES), list(reversed(SHAPES))):  # DDP's first layout and a rebuilt one
        for held in simulate(spec, grads, order, step=3):
            for k in SHAPES:
                assert torch.equal(held[k], want[k]), f"{k} differs from the reference"
    levels = parse(spec).levels
    for k in SHAPES:  # two roundings, each off by less than a step (block max / levels)
        top = max(float(g[k].abs().max()) for g in grads)
        assert float((want[k] - sum(g[k] for g in grads) / world).abs().max()) < 2 * top / levels


def test_all_to_all_bytes_are_those_that_leave_the_rank():
    assert wire_bytes("all_to_all", 400, 4) == 300
    assert wire_bytes("all_to_all", 400, 4) + wire_bytes("all_gather", 100, 4) == wire_bytes("all_reduce", 400, 4)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_gradient_on_one_rank_reaches_every_rank(bad):
    """The hook's check then flags the step on every rank, which all skip it."""
    gen = torch.Generator().manual_seed(0)
    grads = [{k: torch.randn(s, generator=gen) for k, s in SHAPES.items()} for _ in range(3)]
    grads[2]["d"][SEGMENT + 3] = bad
    for held in simulate("int8", grads, list(SHAPES), step=0):
        assert not bool(held["d"].isfinite().all())
        assert all(bool(held[k].isfinite().all()) for k in SHAPES if k != "d")
