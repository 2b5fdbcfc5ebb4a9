"""Encode and decode time of the compressors on one CPU thread.

On the 5.3M-parameter MLP's gradients (512 -> 2048 -> 2048 -> 10, weights and
biases: one encode per tensor, as the parameter server's pushes do) and on
one 25 MiB flat bucket (as a DDP bucket): the median over `--reps` of the
milliseconds to encode and to decode everything once, wall clock and this
thread's CPU time (on a busy shared machine the CPU time, and the least wall
time, are the steadier estimates), next to the time the
bytes saved against fp32 take at 10 Gbit/s, and the page faults per step
(a new tensor of millions of elements may cost more in faults than in work,
depending on the allocator's state). `--baseline` adds an earlier run's
results (say, of the previous commit's code) to compare. Writes
benchmarks/results/codec_speed.json.

    PYTHONPATH=. python benchmarks/codec_speed.py [--reps 7] [--specs int8,topk:0.01] [--baseline OLD.json]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness

from shoal.compress import parse

SPECS = ["fp16", "int8", "topk:0.01", "powersgd:rank=4"]
MLP = {
    "0.weight": (2048, 512),
    "0.bias": (2048,),
    "2.weight": (2048, 2048),
    "2.bias": (2048,),
    "4.weight": (10, 2048),
    "4.bias": (10,),
}
BUCKET = {"bucket": (25 * 2**20 // 4,)}
GBIT_S = 10.0


def gradients(shapes: dict[str, tuple[int, ...]], step: int) -> dict[str, torch.Tensor]:
    """Gradient-like values: normal, a scale per tensor, a different draw each step."""
    gen = torch.Generator().manual_seed(step)
    return {k: torch.randn(s, generator=gen) * 10.0 ** -(1 + i % 3) for i, (k, s) in enumerate(shapes.items())}


def measure(spec: str, shapes: dict[str, tuple[int, ...]], reps: int) -> dict:
    """Median ms to encode / decode every tensor of `shapes` once (after one warm-up step)."""
    codec = parse(spec)
    encode, decode, faults = [], [], []
    cpu: dict[str, list[float]] = {"encode": [], "decode": []}
    nbytes = 0
    for step in range(reps + 1):
        grads = gradients(shapes, step)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        start, cpu_start = time.perf_counter(), time.thread_time()
        payloads = {k: codec.encode(k, g) for k, g in grads.items()}
        encoded, cpu_encoded = time.perf_counter(), time.thread_time()
        for k, g in grads.items():
            codec.decode(payloads[k], g.shape, g.dtype)
        decoded, cpu_decoded = time.perf_counter(), time.thread_time()
        if step:
            encode.append(1e3 * (encoded - start))
            decode.append(1e3 * (decoded - encoded))
            cpu["encode"].append(1e3 * (cpu_encoded - cpu_start))
            cpu["decode"].append(1e3 * (cpu_decoded - cpu_encoded))
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        nbytes = sum(p.nbytes() for p in payloads.values())
    dense = sum(g.numel() * 4 for g in grads.values())
    return {
        "encode_ms": round(statistics.median(encode), 2),
        "decode_ms": round(statistics.median(decode), 2),
        "encode_cpu_ms": round(statistics.median(cpu["encode"]), 2),
        "decode_cpu_ms": round(statistics.median(cpu["decode"]), 2),
        "encode_ms_min": round(min(encode), 2),
        "decode_ms_min": round(min(decode), 2),
        "encode_ms_all": [round(t, 2) for t in encode],
        "decode_ms_all": [round(t, 2) for t in decode],
        "page_faults_per_step": statistics.median(faults),
        "payload_bytes": nbytes,
        "fp32_bytes": dense,
        "saved_ms_at_10gbit": round(1e3 * (dense - nbytes) * 8 / (GBIT_S * 1e9), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--specs", default=",".join(SPECS))
    parser.add_argument("--name", default="codec_speed", help="results file name (without .json)")
    parser.add_argument("--baseline", help="an earlier results file, kept beside these to compare")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results: dict[str, dict] = {}
    for workload, shapes in (("mlp_5.3M", MLP), ("bucket_25MiB", BUCKET)):
        results[workload] = {spec: measure(spec, shapes, args.reps) for spec in args.specs.split(",")}
    summary = f"1 thread, encode/decode CPU ms (median of {args.reps}): " + "; ".join(
        f"{workload}: " + ", ".join(f"{s} {r['encode_cpu_ms']}/{r['decode_cpu_ms']}" for s, r in runs.items())
        for workload, runs in results.items()
    )
    out = {"threads": 1, "reps": args.reps, "results": results}
    if args.baseline:
        old = json.loads(Path(args.baseline).read_text())
        out["baseline"] = {"when": old["when"], "results": old["results"]}
        summary += "; before: " + "; ".join(
            f"{workload}: " + ", ".join(f"{s} {r['encode_cpu_ms']}/{r['decode_cpu_ms']}" for s, r in runs.items())
            for workload, runs in old["results"].items()
        )
    _harness.write(args.name, out, summary)


if __name__ == "__main__":
    main()
