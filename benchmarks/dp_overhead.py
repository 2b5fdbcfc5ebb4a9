"""shoal's DataParallel loop against a raw DistributedDataParallel loop.

Same model, data, batch and 2 ranks, in the same processes, rotating short
timed blocks between the two (and a third: raw DDP fed by the usual
DistributedSampler + DataLoader) so that machine noise hits all alike. Reports steps/s and the
shoal / raw-DDP ratio for a small (digits) and a medium (>= 5M parameter) MLP.

    python benchmarks/dp_overhead.py [--reps 15]
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness

MODELS = {  # name: (layer widths, per-rank batch, steps per timed block)
    "digits_mlp": ([64, 256, 128, 10], 32, 100),
    "medium_mlp": ([1024, 2048, 2048, 10], 64, 10),
}


def build(widths):
    torch.manual_seed(0)
    layers = []
    for a, b in itertools.pairwise(widths):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def data(widths, n):
    g = torch.Generator().manual_seed(0)
    return torch.utils.data.TensorDataset(
        torch.randn(n, widths[0], generator=g), torch.randint(0, widths[-1], (n,), generator=g)
    )


def run_shoal(widths, ds, batch):
    import shoal

    model = build(widths)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    strategy = shoal.DataParallel()
    model, opt = strategy.prepare(model, opt)
    batches = strategy.loader(ds, batch_size=batch, shuffle=True, seed=0).forever()

    def step():
        x, y = next(batches)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()

    return step


def run_raw_ddp(widths, ds, batch):
    """The plain PyTorch way, but fed the same in-memory batches as shoal."""
    model = DistributedDataParallel(build(widths))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x_all, y_all = ds.tensors
    rank, world = dist.get_rank(), dist.get_world_size()
    state = {"i": 0, "perm": torch.randperm(len(x_all))}

    def step():
        i = state["i"] % (len(x_all) // (batch * world))
        idx = state["perm"][(i * world + rank) * batch : (i * world + rank + 1) * batch]
        state["i"] += 1
        loss = nn.functional.cross_entropy(model(x_all[idx]), y_all[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()

    return step


def run_raw_ddp_dataloader(widths, ds, batch):
    """The plain PyTorch way end to end: DistributedSampler + DataLoader."""
    model = DistributedDataParallel(build(widths))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    sampler = DistributedSampler(ds, shuffle=True, seed=0, drop_last=True)
    loader = DataLoader(ds, batch_size=batch, sampler=sampler, drop_last=True)
    state = {"it": iter(loader), "epoch": 0}

    def step():
        try:
            x, y = next(state["it"])
        except StopIteration:
            state["epoch"] += 1
            sampler.set_epoch(state["epoch"])
            state["it"] = iter(loader)
            x, y = next(state["it"])
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    return step


VARIANTS = {"shoal": run_shoal, "raw_ddp": run_raw_ddp, "raw_ddp_dataloader": run_raw_ddp_dataloader}


def worker(reps: int, out: str) -> None:
    """Each variant is built once; then short timed blocks rotate between them,
    `reps` rounds, so that machine noise falls on all variants alike. The
    ratio is the median of per-round ratios (paired, robust to drift)."""
    import shoal

    rt = shoal.init()
    results = {}
    for name, (widths, batch, steps) in MODELS.items():
        ds = data(widths, batch * 2 * 64)
        params = sum(p.numel() for p in build(widths).parameters())
        steppers = {v: make(widths, ds, batch) for v, make in VARIANTS.items()}
        for step in steppers.values():
            _harness.timed_steps(step, max(3, steps // 5), dist.barrier)  # warm-up
        times = {v: [] for v in VARIANTS}
        for rep in range(reps):
            names = list(VARIANTS)
            for variant in names[rep % 3 :] + names[: rep % 3]:
                times[variant].append(steps / _harness.timed_steps(steppers[variant], steps, dist.barrier))
        median = {v: statistics.median(t) for v, t in times.items()}
        paired = {
            other: statistics.median(a / b for a, b in zip(times["shoal"], times[other], strict=True))
            for other in ("raw_ddp", "raw_ddp_dataloader")
        }
        results[name] = {
            "parameters": params,
            "batch_per_rank": batch,
            "steps_per_block": steps,
            "steps_per_s": times,
            "median_steps_per_s": median,
            "ratio_shoal_vs_raw_ddp": paired["raw_ddp"],
            "ratio_shoal_vs_raw_ddp_dataloader": paired["raw_ddp_dataloader"],
        }
    if rt.is_main:
        Path(out).write_text(json.dumps(results))
    shoal.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=15, help="rounds of timed blocks per variant")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(_harness.RESULTS / "dp_overhead.raw.tmp"))
    args = parser.parse_args()
    if args.worker:
        return worker(args.reps, args.out)
    _harness.RESULTS.mkdir(exist_ok=True)
    _harness.launch(__file__, 2, ["--reps", str(args.reps), "--out", args.out], threads=1)
    results = json.loads(Path(args.out).read_text())
    Path(args.out).unlink()
    summary = "dp_overhead (2 ranks, steps/s shoal / raw DDP): " + ", ".join(
        f"{name} {r['ratio_shoal_vs_raw_ddp']:.3f} ({r['parameters'] / 1e6:.2f}M params; "
        f"vs DataLoader-fed DDP {r['ratio_shoal_vs_raw_ddp_dataloader']:.2f})"
        for name, r in results.items()
    )
    _harness.write("dp_overhead", {"reps": args.reps, "threads_per_rank": 1, "models": results}, summary)


if __name__ == "__main__":
    main()
