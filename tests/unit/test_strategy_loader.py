"""`strategy.loader` and `strategy.sampler` split by the data-parallel rank, read when
iteration starts: a loader made before `prepare()` still gives tensor-parallel ranks
of one replica the same batches (the layout is faked here; tests/multiproc/test_loader.py
runs it for real)."""

import pytest
import torch
from torch.utils.data import DistributedSampler, TensorDataset

import shoal
from shoal import runtime
from shoal.data.loader import ShardedLoader
from shoal.errors import ShoalError
from shoal.mesh import ParallelDims


def dataset(n=64):
    return TensorDataset(torch.arange(n).float().unsqueeze(1), torch.arange(n))


@pytest.fixture
def rank3_of_4(monkeypatch):
    rt = runtime.Runtime(3, 4, 3, 4, "gloo", torch.device("cpu"))
    monkeypatch.setattr(runtime, "_current", rt)
    return rt


def test_a_mesh_strategys_loader_before_prepare_splits_by_the_data_parallel_rank(rank3_of_4):
    strategy = shoal.TensorParallel(dp=2)
    loader = strategy.loader(dataset(), batch_size=4, seed=1)
    sampler = strategy.sampler(dataset(), seed=1)
    with pytest.raises(ShoalError, match="call prepare before iterating the loader"):
        iter(loader)
    with pytest.raises(ShoalError, match="call prepare before iterating"):
        list(sampler)
    with pytest.raises(ShoalError, match="reading data_rank / data_world"):
        _ = strategy.data_rank  # not the world rank: that would split a replica's data
    strategy.dims = ParallelDims(dp=2, tp=2)  # what prepare() builds: rank 3 is data-parallel rank 1 of 2
    want = ShardedLoader(dataset(), batch_size=4, shard=(1, 2), seed=1)
    assert all(torch.equal(a[1], b[1]) for a, b in zip(loader, want, strict=True))
    assert list(sampler) == list(DistributedSampler(dataset(), num_replicas=2, rank=1, seed=1))


def test_data_parallel_splits_by_the_world_rank(rank3_of_4):
    strategy = shoal.DataParallel()
    loader = strategy.loader(dataset(), batch_size=4, seed=1, drop_last=False)
    want = ShardedLoader(dataset(), batch_size=4, shard=(3, 4), seed=1)
    assert all(torch.equal(a[1], b[1]) for a, b in zip(loader, want, strict=True))
    assert len(strategy.sampler(dataset())) == 16
