"""Weak scaling of DataParallel: 1 worker against 2, one thread each.

Each worker keeps its batch, so perfect scaling doubles samples/s;
efficiency = samples/s(2 workers) / (2 x samples/s(1 worker)). Run for a
compute-bound model (a wide MLP with a large batch) and for the small digits
MLP, where a step is so short that the all-reduce's fixed latency dominates.

    python benchmarks/scaling.py [--reps 3]
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness

CASES = {  # name: (layer widths, per-worker batch, timed steps)
    "wide_mlp": ([512, 4096, 4096, 10], 1024, 6),
    "digits_mlp": ([64, 256, 128, 10], 32, 400),
}


def worker(case: str, reps: int, out: str) -> None:
    import shoal

    rt = shoal.init()
    widths, batch, steps = CASES[case]
    torch.manual_seed(0)
    layers = []
    for a, b in itertools.pairwise(widths):
        layers += [nn.Linear(a, b), nn.ReLU()]
    model = nn.Sequential(*layers[:-1])
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    strategy = shoal.DataParallel()
    model, opt = strategy.prepare(model, opt)
    g = torch.Generator().manual_seed(0)
    n = batch * rt.world_size * 4
    ds = torch.utils.data.TensorDataset(
        torch.randn(n, widths[0], generator=g), torch.randint(0, widths[-1], (n,), generator=g)
    )
    batches = strategy.loader(ds, batch_size=batch).forever()

    def step():
        x, y = next(batches)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()

    barrier = dist.barrier if rt.distributed else None
    _harness.timed_steps(step, 2, barrier)
    rates = [steps * batch * rt.world_size / _harness.timed_steps(step, steps, barrier) for _ in range(reps)]
    if rt.is_main:
        Path(out).write_text(
            json.dumps(
                {
                    "samples_per_s": rates,
                    "threads": torch.get_num_threads(),
                    "parameters": sum(p.numel() for p in model.parameters()),
                }
            )
        )
    shoal.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--case", default="wide_mlp")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    if args.worker:
        return worker(args.case, args.reps, args.out)
    _harness.RESULTS.mkdir(exist_ok=True)
    tmp = _harness.RESULTS / "scaling.raw.tmp"
    results = {}
    for case in CASES:
        runs = {}
        for workers in (1, 2, 1, 2):  # alternate, so drift in machine load hits both
            _harness.launch(__file__, workers, ["--case", case, "--reps", str(args.reps), "--out", str(tmp)], threads=1)
            runs.setdefault(workers, []).extend(json.loads(tmp.read_text())["samples_per_s"])
        tmp.unlink()
        one, two = statistics.median(runs[1]), statistics.median(runs[2])
        results[case] = {
            "samples_per_s": {"1": runs[1], "2": runs[2]},
            "median_1": one,
            "median_2": two,
            "efficiency": two / (2 * one),
        }
    summary = "scaling (1 -> 2 workers, 1 thread each, efficiency): " + ", ".join(
        f"{c} {r['efficiency']:.2f} ({r['median_1']:.0f} -> {r['median_2']:.0f} samples/s)" for c, r in results.items()
    )
    _harness.write(
        "scaling",
        {"cases": {c: {"widths": CASES[c][0], "batch_per_worker": CASES[c][1], **r} for c, r in results.items()}},
        summary,
    )


if __name__ == "__main__":
    main()
