"""Unit tests of top-k's sampled candidate selection: it chooses exactly what
torch.topk over all elements chooses (ties aside), on ordinary and adversarial
inputs, and the encoder matches the dense reference bit for bit."""

from __future__ import annotations

import pytest
import torch

from shoal.compress import parse, sparse
from shoal.compress.sparse import SAMPLE, count_kept, sample_stride, top_indices

N = 2 * SAMPLE * 3 + 7  # past the sampled path's minimum, and not a multiple of GROUPS


def assert_same_choice(values: torch.Tensor, ours: torch.Tensor, k: int) -> None:
    """`ours` holds k distinct positions whose magnitudes are torch.topk's (NaN first)."""
    assert ours.numel() == k and ours.unique().numel() == k
    want = torch.topk(values.abs(), k).values.double()
    got = values[ours].abs().double().sort(descending=True).values
    nan = want.isnan()
    assert torch.equal(got.isnan(), nan)  # NaNs count as the largest, as in torch.topk
    assert torch.equal(got[~nan].sort(descending=True).values, want[~nan])


def spy(monkeypatch) -> list[int]:
    """How many candidates each `candidates` call of `top_indices` found."""
    found: list[int] = []
    real = sparse.candidates

    def counted(values, threshold):
        index, magnitude = real(values, threshold)
        found.append(index.numel())
        return index, magnitude

    monkeypatch.setattr(sparse, "candidates", counted)
    return found


# ---------------------------------------------------------------- top-k selection
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("ratio", [0.001, 0.01, 0.05])
def test_sampled_top_k_is_exact_top_k(monkeypatch, dtype, ratio):
    found = spy(monkeypatch)
    gen = torch.Generator().manual_seed(1)
    values = (torch.randn(N, generator=gen) * torch.rand(N, generator=gen) ** 4).to(dtype)
    k = count_kept(ratio, N)
    ours = top_indices(values, k)
    assert_same_choice(values, ours, k)
    if dtype in (torch.float32, torch.float64):  # no ties: the very same positions
        assert torch.equal(ours.sort().values, torch.topk(values.abs(), k).indices.sort().values)
    assert len(found) == 1 and k <= found[0] < 2 * k + 64  # one pass, few candidates


def test_sampled_top_k_on_a_matrix_whose_columns_differ(monkeypatch):
    """Row-major (2048, 256) gradients whose column scales differ 1000x: the odd stride
    samples every column, so the first threshold holds."""
    found = spy(monkeypatch)
    gen = torch.Generator().manual_seed(2)
    values = (torch.randn(2048, 256, generator=gen) * torch.logspace(-3, 0, 256)).reshape(-1)
    k = count_kept(0.01, values.numel())
    assert_same_choice(values, top_indices(values, k), k)
    assert len(found) == 1


@pytest.mark.parametrize(
    "case",
    [
        "all_equal",
        "mostly_zeros",
        "all_zeros",
        "sample_large",
        "sample_sparse",
        "sample_zero",
        "tail_largest",
        "nonfinite",
    ],
)
def test_sampled_top_k_on_adversarial_inputs(monkeypatch, case):
    found = spy(monkeypatch)
    if case == "sample_sparse":  # a sample of 1 in 49: lowering the threshold twice is not enough
        monkeypatch.setattr(sparse, "SAMPLE", 2**13)
    gen = torch.Generator().manual_seed(3)
    values = torch.randn(N, generator=gen)
    k = count_kept(0.01, N)
    sampled = torch.zeros(N, dtype=torch.bool)
    sampled[:: sample_stride(N)] = True
    if case == "all_equal":
        values = torch.full((N,), -0.5)
    elif case == "mostly_zeros":  # fewer nonzeros than k: the threshold is 0
        values = values * (torch.rand(N, generator=gen) < 0.004)
    elif case == "all_zeros":
        values = torch.zeros(N)
    elif case in ("sample_large", "sample_sparse"):  # the sample overestimates: too few candidates
        values = torch.where(sampled, 10 + values.abs(), values * 1e-3)
    elif case == "sample_zero":  # the sample sees only zeros: everything is a candidate
        values = torch.where(sampled, 0.0, values)
    elif case == "tail_largest":  # the elements past the (GROUPS, n / GROUPS) grid
        values[-7:] = torch.tensor([50.0, -60.0, 70.0, -80.0, 90.0, 1e-9, 0.0])
    else:
        values[[5, 7000, N - 1]] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    ours = top_indices(values, k)
    assert_same_choice(values, ours, k)
    if case == "sample_large":
        assert len(found) == 2 and found[0] < k <= found[1]  # lowered once
    if case == "sample_sparse":
        assert len(found) == 2 and found[1] < k  # lowered twice, then torch.topk over all
    if case in ("tail_largest", "nonfinite"):
        want = {N - 7, N - 6, N - 5, N - 4, N - 3} if case == "tail_largest" else {5, 7000, N - 1}
        assert want <= set(ours.tolist())


@pytest.mark.parametrize("n, k", [(1, 1), (7, 3), (300, 300), (N, N), (N, N // 10), (2 * SAMPLE - 1, 5)])
def test_top_k_small_and_large_k(n, k):
    values = torch.randn(n, generator=torch.Generator().manual_seed(n))
    assert_same_choice(values, top_indices(values, k), k)


def reference_topk_encode(residual: torch.Tensor | None, grad: torch.Tensor, ratio: float):
    """The encoder as it was before the sampled selection: a dense `sent` and acc - sent."""
    acc = grad.reshape(-1).clone()
    if residual is not None:
        acc += residual
    k = count_kept(ratio, acc.numel())
    index = torch.topk(acc.abs(), k, sorted=False).indices
    values = acc[index].to(torch.bfloat16)
    sent = torch.zeros_like(acc)
    sent[index] = values.to(acc.dtype)
    return index, values, acc - sent


def test_top_k_encoder_matches_the_dense_reference_bit_for_bit():
    gen = torch.Generator().manual_seed(4)
    codec = parse("topk:0.01")
    residual = None
    for step in range(4):
        grad = torch.randn(512, 600, generator=gen) * (1 + step)
        before = grad.clone()
        payload = codec.encode("w", grad)
        index, values, residual = reference_topk_encode(residual, grad, 0.01)
        assert torch.equal(grad, before)  # the caller's gradient is never written
        order, want = payload.tensors[0].long().argsort(), index.argsort()
        assert torch.equal(payload.tensors[0].long()[order], index[want])
        assert torch.equal(payload.tensors[1][order], values[want])
        assert torch.equal(codec.residuals["w"], residual)


def test_top_k_encoder_flags_non_finite_and_keeps_no_nan():
    grad = torch.randn(N)
    grad[123] = float("nan")
    codec = parse("topk:0.01")
    payload = codec.encode("w", grad)
    assert payload.nonfinite and 123 in payload.tensors[0].tolist()
    assert not codec.residuals["w"].any()  # zeroed, as a NaN residual would poison later steps


@pytest.mark.parametrize("spec", ["topk:0.01", "topk:0.3", "int8", "powersgd:rank=2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_add_is_out_plus_decode(spec, dtype):
    """What the DP hook sums ranks' payloads with: top-k adds its values in place."""
    gen = torch.Generator().manual_seed(8)
    grad = torch.randn(300, 70, generator=gen).to(dtype)
    payload = parse(spec).encode("w", grad)
    out = torch.randn(300, 70, generator=gen).to(dtype)
    want = out + parse(spec).decode(payload, grad.shape, dtype)
    parse(spec).decode_add(payload, out)
    assert torch.equal(out, want)
    strided = torch.randn(70, 300, generator=gen).to(dtype).t()  # not contiguous: the dense way
    want = strided + parse(spec).decode(payload, grad.shape, dtype)
    parse(spec).decode_add(payload, strided)
    assert torch.equal(strided, want)
