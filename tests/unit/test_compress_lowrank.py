"""Unit tests of PowerSGD's decode product: computed a block of rows at a time, it
still adds the same correctly rounded products in the same order, bit for bit."""

from __future__ import annotations

import pytest
import torch

from shoal.compress import parse
from shoal.compress.lowrank import PRODUCT_CHUNK, low_rank_product


@pytest.mark.parametrize(
    "n, m, rank, dtype",
    [
        (50, 40, 3, torch.float32),
        (2048, 2048, 4, torch.float32),
        (7, PRODUCT_CHUNK + 1, 2, torch.float64),  # one row per block
        (PRODUCT_CHUNK + 3, 3, 4, torch.float32),  # a short last block
        (300, 1, 1, torch.float32),
    ],
)
def test_low_rank_product_is_the_plain_sum_bit_for_bit(n, m, rank, dtype):
    gen = torch.Generator().manual_seed(n)
    p, q = torch.randn(n, rank, generator=gen, dtype=dtype), torch.randn(m, rank, generator=gen, dtype=dtype)
    want = p[:, 0:1] * q[:, 0]
    for r in range(1, rank):
        want.add_(p[:, r : r + 1] * q[:, r])
    assert torch.equal(low_rank_product(p, q), want)


def test_powersgd_residual_is_exactly_what_decode_misses():
    """The residual reuses the approximation's memory; its values are still acc - decoded."""
    codec = parse("powersgd:rank=2")
    gen = torch.Generator().manual_seed(1)
    residual = torch.zeros(64 * 48)
    for _ in range(3):
        grad = torch.randn(64, 48, generator=gen)
        before = grad.clone()
        acc = grad.reshape(-1) + residual
        decoded = codec.decode(codec.encode("w", grad), grad.shape, grad.dtype).reshape(-1)
        residual = codec.residuals["w"]
        assert torch.equal(residual, acc - decoded) and residual.abs().max() > 0
        assert torch.equal(grad, before)


def test_remember_masks_momentum_where_sent_before_reusing_sent():
    """`_remember` turns `sent` into the residual in place; the momentum mask must see `sent`."""
    from shoal.compress.base import ErrorFeedback

    ef = ErrorFeedback("test")
    ef.momentum = 0.9
    ef.velocities["w"] = torch.ones(4)
    ef._remember("w", torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([0.0, 2.0, 0.0, 1.0]))
    assert torch.equal(ef.residuals["w"], torch.tensor([1.0, 0.0, 3.0, 3.0]))
    assert torch.equal(ef.velocities["w"], torch.tensor([1.0, 0.0, 1.0, 0.0]))
