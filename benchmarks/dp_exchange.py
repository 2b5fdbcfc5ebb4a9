"""Time of the DP hook's int8/qsgd exchange: the two-phase exchange against
the all-gather of whole payloads it replaced (still the top-k path).

N real gloo processes on loopback, one thread each, exchange the 5.3M-parameter
MLP's gradients (as `codec_speed.py`) in DDP's two buckets after its rebuild,
calling the hooks directly on stand-in buckets, both ways interleaved; a
step's time is the slowest rank's, from a barrier before to one after. Prints
the median ratio all-gather / two-phase (above 1: the new exchange is faster)
and writes benchmarks/results/dp_exchange.json. Loopback has no link cost, so
this is the codec and collective work; on a busy machine compare ratios, not
times.

    PYTHONPATH=. python benchmarks/dp_exchange.py [--worlds 2,4] [--reps 21] [--spec int8]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from codec_speed import MLP, gradients

from tests.helpers.procs import free_port

RESULTS = Path(__file__).resolve().parent / "results"
BUCKETS = [["4.bias", "4.weight", "2.bias", "2.weight"], ["0.bias", "0.weight"]]
"""DDP's buckets of the MLP after the rebuild: gradient-ready order, the first capped at 1 MiB."""


class Bucket:
    """What a comm hook uses of `dist.GradBucket`: one flat buffer, the gradients as views of it."""

    def __init__(self, params: list[torch.nn.Parameter], grads: list[torch.Tensor]):
        self.buf = torch.cat([g.reshape(-1) for g in grads])
        self.params = params
        self.grads = list(self.buf.split([g.numel() for g in grads]))
        self.grads = [v.view(g.shape) for v, g in zip(self.grads, grads, strict=True)]

    def gradients(self) -> list[torch.Tensor]:
        return self.grads

    def parameters(self) -> list[torch.nn.Parameter]:
        return self.params

    def buffer(self) -> torch.Tensor:
        return self.buf


def worker(rank: int, world: int, spec: str, reps: int, port: int, out: str) -> None:
    from shoal.compress import parse
    from shoal.compress.ddp_hooks import CompressionHook

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    params = {k: torch.nn.Parameter(torch.zeros(s)) for k, s in MLP.items()}
    grads = gradients(MLP, rank)
    hooks = {}
    for mode in ("all_gather", "two_phase"):
        hook = CompressionHook.__new__(CompressionHook)  # no DDP: the hooks are called directly
        hook.compressor = parse(spec)
        hook.compressor.reseed(1_000 + rank)
        hook.names, hook.group, hook.world = {id(p): k for k, p in params.items()}, None, world
        hook.params, hook.powersgd, hook._plans = list(params.values()), None, {}
        hook.reset()
        hooks[mode] = hook._payload_hook if mode == "all_gather" else hook._two_phase_hook
    times: dict[str, list[float]] = {mode: [] for mode in hooks}
    for rep in range(reps + 1):  # the first is a warm-up
        for mode in sorted(hooks, reverse=bool(rep % 2)):
            buckets = [Bucket([params[k] for k in keys], [grads[k] for k in keys]) for keys in BUCKETS]
            dist.barrier()
            start = time.perf_counter()
            for fut in [hooks[mode](None, b) for b in buckets]:
                fut.wait()
            dist.barrier()
            if rep:
                times[mode].append(time.perf_counter() - start)
    if rank == 0:
        Path(out).write_text(json.dumps(times))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worlds", default="2,4")
    parser.add_argument("--reps", type=int, default=21)
    parser.add_argument("--spec", default="int8")
    args = parser.parse_args()
    results = {}
    RESULTS.mkdir(exist_ok=True)
    for world in (int(w) for w in args.worlds.split(",")):
        out = RESULTS / f".dp_exchange_{world}.tmp"
        mp.spawn(worker, args=(world, args.spec, args.reps, free_port(), str(out)), nprocs=world)
        times = json.loads(out.read_text())
        out.unlink()
        ratios = sorted(a / b for a, b in zip(times["all_gather"], times["two_phase"], strict=True))
        results[world] = {"spec": args.spec, "reps": args.reps, "ratio_median": statistics.median(ratios)}
        results[world]["ratio_range"] = [ratios[0], ratios[-1]]
        print(
            f"{args.spec}, {world} ranks: all-gather / two-phase time {results[world]['ratio_median']:.2f}x"
            f" (median of {args.reps}; {ratios[0]:.2f}-{ratios[-1]:.2f})"
        )
    (RESULTS / "dp_exchange.json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
