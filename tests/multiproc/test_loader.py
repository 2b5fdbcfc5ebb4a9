"""The loader and a user's own DataLoader on real ranks: a TensorParallel loader made
before `prepare()` gives both tensor-parallel ranks the same batches; DataParallel fed
by the user's `DataLoader` + `DistributedSampler` + `set_epoch` equals one process
with the combined batch; DataLoader workers give the batches of the in-process path."""

from __future__ import annotations

import gc
import os

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from shoal.data.loader import ShardedLoader
from shoal.procfs import children_of
from tests.helpers.ranks import run_workers

N, BATCH, EPOCHS = 96, 8, 2  # per-rank batch; N is a multiple of the global batch (2 x 8)


def data() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, 8, generator=g)
    return TensorDataset(x, (x.sum(1) > 0).long())


def model_and_optimizer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2))
    return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def train_own_loop(model, opt, loader, sampler) -> None:
    """The DDP tutorials' loop."""
    for epoch in range(EPOCHS):
        sampler.set_epoch(epoch)
        for x, y in loader:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()


def both_scenarios(rank, world):
    import shoal

    tp = shoal.TensorParallel(dp=1)
    loader = tp.loader(data(), batch_size=BATCH, seed=3)  # before prepare: the mesh is not built yet
    model, opt = model_and_optimizer()
    tp.prepare(model, opt)
    tp_batches = [y.tolist() for _, y in loader][:4]

    model, opt = model_and_optimizer()
    dp = shoal.DataParallel()
    model, opt = dp.prepare(model, opt)
    sampler = DistributedSampler(data(), shuffle=True, seed=5)
    train_own_loop(model, opt, DataLoader(data(), batch_size=BATCH, sampler=sampler), sampler)
    params = {k: v.tolist() for k, v in dp.unwrap(model).state_dict().items()}
    return {"tp_batches": tp_batches, "dp_params": params}


def test_tensor_parallel_loader_and_a_users_own_dataloader():
    results = run_workers(both_scenarios, world=2, timeout_s=120)
    single = ShardedLoader(data(), batch_size=BATCH, seed=3)  # dp = 1: each rank takes the whole batch
    want = [y.tolist() for _, y in single][:4]
    assert results[0]["tp_batches"] == results[1]["tp_batches"] == want

    model, opt = model_and_optimizer()
    sampler = DistributedSampler(data(), num_replicas=1, rank=0, shuffle=True, seed=5)
    train_own_loop(model, opt, DataLoader(data(), batch_size=2 * BATCH, sampler=sampler), sampler)
    for name, ref in model.state_dict().items():
        got = torch.tensor(results[0]["dp_params"][name])
        assert torch.allclose(got, ref, atol=1e-5), name


def test_dataloader_workers_give_the_same_batches():
    before = children_of(os.getpid())
    ds = data()
    inline = ShardedLoader(ds, batch_size=BATCH, shard=(1, 2), seed=4)
    workers = ShardedLoader(ds, batch_size=BATCH, shard=(1, 2), seed=4, num_workers=2, persistent_workers=True)
    for _epoch in range(2):
        for a, b in zip(inline, workers, strict=True):
            assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))
    it = iter(workers)
    next(it)
    state = workers.state_dict()
    resumed = ShardedLoader(ds, batch_size=BATCH, shard=(1, 2), seed=4, num_workers=2)
    resumed.load_state_dict(state)
    rest = [y for _, y in resumed]
    assert len(rest) == len(inline) - 1 and torch.equal(rest[0], [y for _, y in inline][1])
    del it, workers, resumed  # persistent workers live as long as their loader: end them here, not in later tests
    gc.collect()
    assert children_of(os.getpid()) == before, "the loader's worker processes outlived it"
