"""Run under `shoal run -n 2`: train three scenarios with DataParallel and save
the final parameters (rank 0) for comparison with a single process."""

import sys

import torch
from torch import nn

import shoal
from shoal.data.loader import ShardedLoader
from shoal.data.synthetic import Synthetic

SCENARIOS = {  # name: (per-rank batch, grad_accum, clip_norm)
    "plain": (8, 1, None),
    "accum": (8, 4, None),
    "clip": (8, 1, 0.05),
}
STEPS = 20


def model_and_optimizer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4))
    return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def data():
    return Synthetic(samples=512 + 64, features=16, classes=4, test_fraction=64 / 576).load(seed=0).train


def single_process(batch: int, clip: float | None) -> dict:
    """The reference: plain PyTorch, one process, the combined batch."""
    model, opt = model_and_optimizer()
    loader = ShardedLoader(data(), batch_size=batch, shuffle=True, seed=7)
    it = loader.forever()
    for _ in range(STEPS):
        x, y = next(it)
        nn.functional.cross_entropy(model(x), y).backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad()
    return model.state_dict()


def main(out: str) -> None:
    rt = shoal.init()
    results = {}
    for name, (batch, accum, clip) in SCENARIOS.items():
        model, opt = model_and_optimizer()
        strategy = shoal.DataParallel(grad_accum=accum, clip_norm=clip)
        model, opt = strategy.prepare(model, opt)
        loader = strategy.loader(data(), batch_size=batch, shuffle=True, seed=7)
        it = loader.forever()
        for _ in range(STEPS * accum):
            x, y = next(it)
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
        results[name] = {k: v.detach().clone() for k, v in strategy.unwrap(model).state_dict().items()}
    if rt.is_main:
        torch.save(results, out)
    shoal.shutdown()  # with the DDP models alive, as a user's script does


def clip_by_hand(rank, world, accum, clip):
    """A user's loop that clips the averaged gradient itself: synchronize(), clip, step()."""
    from shoal.strategies.data_parallel import DataParallel

    model, opt = model_and_optimizer()
    strategy = DataParallel(grad_accum=accum)
    model, opt = strategy.prepare(model, opt)
    it = strategy.loader(data(), batch_size=8, shuffle=True, seed=7).forever()
    synced = []
    for _ in range(STEPS * accum):
        x, y = next(it)
        nn.functional.cross_entropy(model(x), y).backward()
        synced.append(strategy.synchronize())
        if synced[-1]:  # the averaged gradient of the whole step: clip it as one process would
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad()
    params = {k: v.tolist() for k, v in strategy.unwrap(model).state_dict().items()}
    return {"params": params, "synced": synced[: 2 * accum]}


if __name__ == "__main__":
    main(sys.argv[1])
