import pytest
import torch
from torch.utils.data import TensorDataset

from shoal.data.loader import ShardedLoader, eval_shard
from shoal.errors import ShoalError


def dataset(n=100):
    return TensorDataset(torch.arange(n).float().unsqueeze(1), torch.arange(n))


def test_ranks_together_take_the_single_process_batch():
    ds = dataset()
    single = ShardedLoader(ds, batch_size=8, world=1, seed=3)
    ranks = [ShardedLoader(ds, batch_size=4, rank=r, world=2, seed=3) for r in range(2)]
    for _epoch in range(3):
        for whole, *parts in zip(single, *ranks, strict=True):
            assert torch.equal(whole[1], torch.cat([p[1] for p in parts]))
    assert single.state_dict() == {"epoch": 2, "index": len(single)}


def test_epochs_reshuffle_and_drop_the_partial_batch():
    loader = ShardedLoader(dataset(10), batch_size=4, seed=0)
    first = torch.cat([y for _, y in loader])
    second = torch.cat([y for _, y in loader])
    assert len(loader) == 2 and len(first) == 8
    assert not torch.equal(first, second)


def test_resume_mid_epoch_continues_the_same_sequence():
    ds = dataset()
    full = ShardedLoader(ds, batch_size=8, seed=1)
    expected = [y for _, y in full][:12] + [y for _, y in full][:5]

    loader = ShardedLoader(ds, batch_size=8, seed=1)
    it = iter(loader)
    got = [next(it)[1] for _ in range(7)]
    state = loader.state_dict()
    resumed = ShardedLoader(ds, batch_size=8, seed=1)
    resumed.load_state_dict(state)
    got += [y for _, y in resumed]
    got += [y for _, y in resumed][:5]
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=False)) and len(got) == len(expected)


def test_too_small_data_set_is_a_clear_error():
    with pytest.raises(ShoalError, match="fewer than one global batch"):
        ShardedLoader(dataset(10), batch_size=8, world=2)


def test_eval_shard_covers_every_sample_once():
    n, world = 11, 3
    got = torch.cat([eval_shard(n, r, world) for r in range(world)])
    assert sorted(got.tolist()) == list(range(n))
