"""Unit tests of int8's 16-bit dither: the rounding stays unbiased at fine
resolution, exact on integer levels, inside +-s, deterministic per seed, key
and count, and free of overflow near the float limit."""

from __future__ import annotations

import math

import pytest
import torch

from shoal.compress import parse
from shoal.compress.quantize import BLOCK, CHUNK, dither


def test_dither_is_16_bit_midpoints_inside_0_1():
    u = dither(torch.Generator().manual_seed(5), 2**20 + 3, torch.float32).double()
    assert u.numel() == 2**20 + 3
    j = u * 2**16 - 0.5
    assert torch.equal(j, j.round()) and int(j.min()) >= 0 and int(j.max()) <= 2**16 - 1
    counts = torch.bincount(j.long(), minlength=2**16).double()
    assert abs(float(u.mean()) - 0.5) < 5 * math.sqrt(1 / 12 / u.numel())
    assert float(counts.std()) < 1.3 * math.sqrt(counts.mean())  # about Poisson: every value equally likely


@pytest.mark.parametrize("spec", ["int8", "qsgd:levels=4"])
def test_integer_levels_are_encoded_exactly(spec):
    """x / m * s an integer: never rounded away from it, whatever the noise."""
    codec = parse(spec)
    s = codec.levels
    x = torch.arange(-s, s + 1, dtype=torch.float32).repeat(3 * BLOCK)[: 2 * CHUNK + 5]
    x[:: BLOCK // 2] = s  # every block's max is s, so each level is x itself
    for _ in range(5):
        out = codec.decode(codec.encode("w", x), x.shape, x.dtype)
        assert torch.equal(out, x)


def test_block_maxima_whose_level_rounds_above_s_stay_s():
    """127 * m / m is 127 plus one ulp for some m; with the largest dither value that
    would floor to 128 (-128 as int8) about once in 2^16 elements, were it not clamped."""
    m = torch.rand(10_000, generator=torch.Generator().manual_seed(7)) * 10
    m = m[torch.addcdiv(torch.zeros(1), m, m, value=127.0) > 127][:16]
    assert m.numel() == 16
    x = m.repeat_interleave(2**16) * torch.tensor([1.0, -1.0]).repeat(2**19)  # 2^16 elements per m
    codec = parse("int8")
    code = codec.encode("w", x).tensors[0]
    assert torch.equal(code, (127 * x.sign()).to(torch.int8))


@pytest.mark.parametrize("fraction", [2**-12, 1 - 2**-12, 0.5])
def test_rounding_is_unbiased_at_fine_resolution(fraction):
    """A level 2^-12 above an integer rounds up 1 time in 4096, as unbiased rounding must
    (an 8-bit dither would never round it up); within 5 sigma, for both signs."""
    n = 2**20
    levels = torch.full((n,), 40 + fraction, dtype=torch.float64)
    levels[::BLOCK] = 127.0  # block max 127: x = level
    levels[1::2] *= -1
    codec = parse("int8")
    out = codec.decode(codec.encode("w", levels), levels.shape, levels.dtype)
    inner = torch.ones(n, dtype=torch.bool)
    inner[::BLOCK] = False
    for sign in (1, -1):
        picked = inner & (levels.sign() == sign)
        frac = (out[picked] * sign - 40).mean().item()
        sigma = math.sqrt(fraction * (1 - fraction) / int(picked.sum()))
        assert abs(frac - fraction) < 5 * sigma + 2**-16


def test_int8_is_deterministic_per_seed_key_and_count():
    x = torch.randn(3 * CHUNK + 11, generator=torch.Generator().manual_seed(6))
    a, b = parse("int8"), parse("int8")
    first = [a.encode("w", x).tensors[0] for _ in range(2)]
    assert torch.equal(first[0], b.encode("w", x).tensors[0])  # same seed, key and count
    assert not torch.equal(first[0], first[1])  # the next count draws new noise
    assert not torch.equal(first[0], b.encode("v", x).tensors[0])  # another key
    c = parse("int8")
    c.reseed(1)
    assert not torch.equal(first[0], c.encode("w", x).tensors[0])  # another rank's seed


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_near_the_float_limit_neither_overflows_nor_flags(dtype):
    """s * x overflows float32 past max / 127 (here up to max / 2): those blocks divide first."""
    big = torch.finfo(torch.float32).max / 2
    x = torch.linspace(-big, big, 1000, dtype=torch.float64).to(dtype)
    codec = parse("int8")
    payload = codec.encode("w", x)
    assert not payload.nonfinite
    out = codec.decode(payload, x.shape, torch.float32)
    assert bool(torch.isfinite(out).all())
    assert float((out.double() - x.double()).abs().max()) <= big / 127 * 1.001
