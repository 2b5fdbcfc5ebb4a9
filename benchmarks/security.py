"""What connection and message security cost the parameter server, side by side in one run.

1. PS-BSP steps/s on the 5.4M-parameter MLP, 2 workers, 2 servers,
   interleaved runs (benchmarks/ps.py's worker and timing), three ways:
   CURVE without the per-message MAC (`curve`: SHOAL_CURVE=1, the default;
   `shoal.comm.wire` explains why no MAC), CURVE with the MAC as shoal had it
   before (`curve_mac`, a measurement only: `_harness.signing_everywhere`),
   and the MAC without CURVE (`no_curve`: SHOAL_CURVE=0).
2. The per-message HMAC-SHA256 (`shoal.comm.wire.Codec` without CURVE): its
   throughput, and the milliseconds it takes per step on a worker (MAC of
   its push, check of its pull) and on each of the 2 servers (checks of 2
   workers' pushes to it, one MAC of its answer), measured in this process
   on that model's sizes; and the same work under CURVE (tags, no MAC).

    PYTHONPATH=. python benchmarks/security.py [--reps 3] [--steps 40]

Writes benchmarks/results/security.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness
from ps import MODELS, build

from shoal import env

PS = str(Path(__file__).resolve().parent / "ps.py")
MODEL = "wide_mlp_5m"


VARIANTS = ("curve", "curve_mac", "no_curve")


def steps_per_s(variant: str, steps: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out.json")
        wargs = ["--out", out, "--servers", "2", "--task", "throughput", "--model", MODEL, "--strategy", "bsp"]
        wargs += ["--steps", str(steps)]
        extra = {env.CURVE: "0" if variant == "no_curve" else "1"}
        if variant == "curve_mac":
            extra.update(_harness.signing_everywhere(tmp))
        _harness.launch_keeping(out, PS, 2, wargs, servers=2, timeout=900, env=extra, quiet=True)
        return json.loads(Path(out).read_text())["steps_per_s"]


def hmac_cost(curve: bool, reps: int = 5) -> dict:
    """Seconds of sealing work per step (`curve`: tags; else the HMAC), from the model's real tensors
    split over 2 servers as PS-BSP splits them."""
    from shoal.comm.security import Transport
    from shoal.comm.wire import Codec

    torch.manual_seed(0)
    tensors = [p.detach().clone() for p in build(MODELS[MODEL]).parameters()]
    halves = [tensors[0::2], tensors[1::2]]  # about half the bytes to each server
    codec = Codec(b"k" * 32, transport=Transport(b"k" * 32, curve=curve))
    nbytes = sum(t.numel() * t.element_size() for t in tensors)

    def best(fn) -> float:
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    encoded = [codec.encode({"op": "push"}, h) for h in halves]
    encode_s = best(lambda: [codec.encode({"op": "push"}, h) for h in halves])  # a worker's push to both servers
    decode_s = best(lambda: [codec.decode(f) for f in encoded])  # a worker's check of both servers' answers
    server_encode_s = best(lambda: codec.encode_many([{"a": 1}, {"a": 2}], halves[0]))  # one pass, 2 answers
    server_decode_s = best(lambda: [codec.decode(encoded[0]) for _ in range(2)])  # 2 workers' pushes
    return {
        "parameters": sum(t.numel() for t in tensors),
        "bytes_per_direction": nbytes,
        "mac_gb_per_s": nbytes / encode_s / 1e9,
        "worker_ms_per_step": 1000 * (encode_s + decode_s),
        "server_ms_per_step": 1000 * (server_encode_s + server_decode_s),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    runs: dict[str, list[float]] = {name: [] for name in VARIANTS}
    load = [os.getloadavg()[0]]
    for rep in range(args.reps):  # interleaved, so drift in the machine's load hits every variant,
        for name in VARIANTS[::-1] if rep % 2 else VARIANTS:  # every other round in reverse
            runs[name].append(steps_per_s(name, args.steps))
            print(f"{name}: {runs[name][-1]:.2f} steps/s", flush=True)
        load.append(os.getloadavg()[0])
    rate = {k: statistics.median(v) for k, v in runs.items()}
    mac, tags = hmac_cost(curve=False), hmac_cost(curve=True)
    step_ms = 1000 / rate["curve_mac"]
    mac["worker_share_of_step"] = mac["worker_ms_per_step"] / step_ms
    print(json.dumps({"hmac": mac, "curve_tags": tags}, indent=1), flush=True)
    summary = (
        f"security: PS-BSP {MODEL}, 2 workers, 2 servers, steps/s: CURVE without MAC {rate['curve']:.2f}, "
        f"CURVE with MAC {rate['curve_mac']:.2f} (x{rate['curve'] / rate['curve_mac']:.2f} without), "
        f"MAC without CURVE {rate['no_curve']:.2f}; HMAC {mac['mac_gb_per_s']:.2f} GB/s, "
        f"{mac['worker_ms_per_step']:.0f} ms of a {step_ms:.0f} ms step on a worker (tags: "
        f"{tags['worker_ms_per_step']:.1f} ms), {mac['server_ms_per_step']:.0f} ms per step on each server "
        f"(tags: {tags['server_ms_per_step']:.1f} ms); load average {load[0]:.1f} to {load[-1]:.1f}"
    )
    command = " ".join(["python", "benchmarks/security.py", *sys.argv[1:]])
    config = {"reps": args.reps, "steps": args.steps, "command": command, "loadavg_1min_per_round": load}
    rates = {k: {"median": rate[k], "runs": v} for k, v in runs.items()}
    ratios = {
        "curve_over_curve_mac": rate["curve"] / rate["curve_mac"],
        "curve_over_no_curve": rate["curve"] / rate["no_curve"],
        "curve_mac_over_no_curve": rate["curve_mac"] / rate["no_curve"],
    }
    result = {"config": config, "steps_per_s": rates, **ratios, "hmac": mac, "curve_tags": tags}
    _harness.write("security", result, summary)


if __name__ == "__main__":
    main()
