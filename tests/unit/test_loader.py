"""The sharded loader against one process, with explicit rank and world: what the
ranks take together, passes that do not eat each other's data, set_epoch, resume."""

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from shoal.data.loader import ShardedLoader, eval_shard
from shoal.data.sampler import DataSampler, fixed
from shoal.errors import ShoalError


def dataset(n=100):
    return TensorDataset(torch.arange(n).float().unsqueeze(1), torch.arange(n))


def labels(loader, limit=None):
    """The label batches of one pass."""
    return [y for _, y in loader][:limit]


def same(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_ranks_together_take_the_single_process_batch():
    ds = dataset()
    single = ShardedLoader(ds, batch_size=8, seed=3)
    ranks = [ShardedLoader(ds, batch_size=4, shard=(r, 2), seed=3) for r in range(2)]
    for _epoch in range(3):
        for whole, *parts in zip(single, *ranks, strict=True):
            assert torch.equal(whole[1], torch.cat([p[1] for p in parts]))
    assert single.state_dict() == {"epoch": 3, "index": 0}  # three passes completed


@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("drop_last", [True, False])
@pytest.mark.parametrize("n", [100, 106])  # 100 = 8 x 12 + 4 (a short last batch), 106: + 10
def test_every_step_the_ranks_hold_the_single_process_batch(shuffle, drop_last, n):
    ds, world = dataset(n), 3
    single = ShardedLoader(ds, batch_size=12, shuffle=shuffle, seed=5, drop_last=drop_last)
    ranks = [ShardedLoader(ds, 4, (r, world), shuffle, seed=5, drop_last=drop_last) for r in range(world)]
    assert {len(r) for r in ranks} == {len(single)} and len(single) == (8 if drop_last else 9)
    for _epoch in range(2):
        steps = list(zip(single, *ranks, strict=True))
        for whole, *parts in steps:
            assert torch.equal(whole[1], torch.cat([p[1] for p in parts]))
        if not drop_last:  # the short last batch, split as evenly as possible
            assert [len(p[1]) for p in steps[-1][1:]] == ([2, 1, 1] if n == 100 else [4, 3, 3])
        seen = torch.cat([whole[1] for whole, *_ in steps])
        assert len(seen) == (96 if drop_last else n) and len(set(seen.tolist())) == len(seen)


def test_a_rank_without_a_sample_in_the_last_batch_repeats_one():
    ds, world = dataset(13), 4  # the last global batch (of 12) has one sample for 4 ranks
    ranks = [ShardedLoader(ds, 3, (r, world), shuffle=False, drop_last=False) for r in range(world)]
    last = [labels(r)[-1].tolist() for r in ranks]
    assert {len(r) for r in ranks} == {2}
    assert last == [[12], [12], [12], [12]]  # every rank steps; the sample counts four times


def test_epochs_reshuffle_and_drop_the_partial_batch():
    loader = ShardedLoader(dataset(10), batch_size=4, seed=0)
    first = torch.cat(labels(loader))
    second = torch.cat(labels(loader))
    assert len(loader) == 2 and len(first) == 8
    assert not torch.equal(first, second)


def test_a_look_at_one_batch_takes_nothing_from_the_training_pass():
    """The DDP tutorial series reads the batch size with next(iter(loader))."""
    ds = dataset()
    expected = ShardedLoader(ds, batch_size=8, seed=1)
    want = [labels(expected) for _ in range(3)]
    loader = ShardedLoader(ds, batch_size=8, seed=1)
    peek = next(iter(loader))[1]
    got = [labels(loader)]
    next(iter(loader))  # between passes
    it = iter(loader)
    next(it)  # a pass left half done does not end the epoch
    got += [labels(loader), labels(loader)]
    assert torch.equal(peek, want[0][0])
    assert all(same(a, b) for a, b in zip(got, want, strict=True))


def test_set_epoch_picks_the_epoch_whatever_came_before():
    ds = dataset()
    loader = ShardedLoader(ds, batch_size=8, seed=2)
    by_epoch = {}
    for epoch in range(3):
        loader.sampler.set_epoch(epoch)
        by_epoch[epoch] = labels(loader)
    other = ShardedLoader(ds, batch_size=8, seed=2)
    other.sampler.set_epoch(2)
    assert same(labels(other), by_epoch[2])
    other.sampler.set_epoch(0)
    assert same(labels(other), by_epoch[0])
    fresh = ShardedLoader(ds, batch_size=8, seed=2)  # without set_epoch: passes play epochs 0, 1, 2
    assert all(same(labels(fresh), by_epoch[e]) for e in range(3))


def test_resume_mid_epoch_continues_the_same_sequence():
    ds = dataset()
    full = ShardedLoader(ds, batch_size=8, seed=1)
    expected = labels(full) + labels(full, 5)

    loader = ShardedLoader(ds, batch_size=8, seed=1)
    it = iter(loader)
    got = [next(it)[1] for _ in range(7)]
    state = loader.state_dict()
    assert state == {"epoch": 0, "index": 7}
    resumed = ShardedLoader(ds, batch_size=8, seed=1)
    resumed.load_state_dict(state)
    next(iter(resumed))  # a look does not move the resumed position
    got += labels(resumed)
    got += labels(resumed, 5)
    assert same(got, expected)


def test_resume_with_set_epoch_in_the_loop_continues_the_epoch():
    """The tutorials' loop, `for epoch in range(start, E): set_epoch(epoch); for b in loader`."""
    ds = dataset()
    full = ShardedLoader(ds, batch_size=8, seed=4)
    expected = [labels(full) for _ in range(3)]
    loader = ShardedLoader(ds, batch_size=8, seed=4)
    labels(loader)
    it = iter(loader)
    got = [next(it)[1] for _ in range(5)]
    state = loader.state_dict()
    resumed = ShardedLoader(ds, batch_size=8, seed=4)
    resumed.load_state_dict(state)
    for epoch in range(state["epoch"], 3):
        resumed.sampler.set_epoch(epoch)
        got += labels(resumed)
    assert same(got, expected[1] + expected[2])


def test_a_checkpoint_at_the_end_of_an_epoch_resumes_at_the_next():
    ds = dataset(40)
    full = ShardedLoader(ds, batch_size=8, seed=0).forever()
    expected = [next(full)[1] for _ in range(8)]
    loader = ShardedLoader(ds, batch_size=8, seed=0)
    batches = loader.forever()
    got = [next(batches)[1] for _ in range(5)]  # the epoch's last batch, not yet rolled over
    assert loader.state_dict() == {"epoch": 0, "index": 5}
    resumed = ShardedLoader(ds, batch_size=8, seed=0)
    resumed.load_state_dict(loader.state_dict())
    batches = resumed.forever()
    got += [next(batches)[1] for _ in range(3)]
    assert same(got, expected)


def test_state_dict_follows_the_pass_that_advanced_last():
    loader = ShardedLoader(dataset(), batch_size=8, seed=0)
    a, b = iter(loader), iter(loader)
    for _ in range(4):
        next(a)
    next(b)
    assert loader.state_dict() == {"epoch": 0, "index": 1}
    next(a)
    assert loader.state_dict() == {"epoch": 0, "index": 5}


def test_collate_fn_is_applied_and_gives_the_batches_of_the_fast_path():
    ds = dataset()
    fast = ShardedLoader(ds, batch_size=4, shard=(1, 2), seed=3)
    seen = []

    def collate(samples):
        seen.append(len(samples))
        return {"x": torch.stack([s[0] for s in samples]), "y": torch.stack([s[1] for s in samples])}

    own = ShardedLoader(ds, batch_size=4, shard=(1, 2), seed=3, collate_fn=collate)
    got = [b["y"] for b in own]
    assert same(got, labels(fast)) and seen == [4] * len(fast)


def test_a_plain_list_data_set_goes_through_the_dataloader():
    items = [(torch.tensor([float(i)]), i) for i in range(20)]
    loader = ShardedLoader(items, batch_size=5, seed=0)  # pyright: ignore[reportArgumentType]
    x, y = next(iter(loader))
    assert x.shape == (5, 1) and torch.equal(x[:, 0].long(), y)


def test_the_loader_refuses_a_sampler_of_its_own():
    with pytest.raises(ShoalError, match=r"strategy\.sampler"):
        ShardedLoader(dataset(), batch_size=4, sampler=range(10))


def test_too_small_data_set_is_a_clear_error():
    with pytest.raises(ShoalError, match="fewer than one global batch"):
        ShardedLoader(dataset(10), batch_size=8, shard=(0, 2))
    assert len(ShardedLoader(dataset(10), batch_size=8, shard=(0, 2), drop_last=False)) == 1


@pytest.mark.parametrize("drop_last", [True, False])
@pytest.mark.parametrize("shuffle", [True, False])
def test_data_sampler_is_distributed_sampler_by_the_given_rank(shuffle, drop_last):
    ds, world = dataset(23), 3
    for rank in range(world):
        ours = DataSampler(ds, fixed(rank, world), shuffle=shuffle, seed=9, drop_last=drop_last)
        torchs = DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=shuffle, seed=9, drop_last=drop_last)
        for epoch in (0, 1, 5):
            ours.set_epoch(epoch)
            torchs.set_epoch(epoch)
            assert list(ours) == list(torchs) and len(ours) == len(torchs)


def test_data_sampler_reads_the_rank_when_a_pass_starts():
    shard = [(0, 1)]
    sampler = DataSampler(dataset(8), lambda: shard[0], shuffle=False)
    shard[0] = (1, 2)  # e.g. the mesh built by prepare() after the sampler was made
    loader = DataLoader(dataset(8), batch_size=2, sampler=sampler)
    assert [y.tolist() for _, y in loader] == [[1, 3], [5, 7]]


def test_eval_shard_covers_every_sample_once():
    n, world = 11, 3
    got = torch.cat([eval_shard(n, r, world) for r in range(world)])
    assert sorted(got.tolist()) == list(range(n))


def test_digits_read_from_the_shipped_csv_equal_scikit_learns_loader():
    from sklearn.datasets import load_digits

    from shoal.data.digits import digits_arrays

    images, labels = digits_arrays()
    want_images, want_labels = load_digits(return_X_y=True)
    assert np.array_equal(images, want_images) and np.array_equal(labels, want_labels)
    assert images.dtype == want_images.dtype and labels.dtype == want_labels.dtype
