"""Time saved by compression on real links: data parallelism across test hosts.

Two test hosts (network namespaces on a bridge, `tests/helpers/hosts.py`),
one worker each, their links shaped with `tc` to each rate asked (token
bucket; this kernel has no netem, so no delay is added), and for each rate
every compressor side by side with "none": steps/s, and the training time to
reach the target accuracy (what "none" reaches at the end, less `--slack`),
on the large MLP (5.3M parameters, synthetic data). Needs root.

    PYTHONPATH=. python benchmarks/network.py [--rates none,1gbit,100mbit] [--steps 80]

Writes benchmarks/results/network.json and one line per rate.
"""

from __future__ import annotations

import argparse
import json
import secrets
import signal
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness

SPECS = ["none", "fp16", "int8", "topk:0.01", "powersgd:rank=4"]
PORT = 29400


def worker(spec: str, steps: int, eval_every: int, out: str) -> None:
    """One spec on this host's rank: train, evaluating every `eval_every` steps (not timed)."""
    import torch.distributed as dist

    import shoal
    from shoal.data.synthetic import Synthetic
    from shoal.models.mlp import MLP

    rt = shoal.init()
    data = Synthetic(batch_size=64, samples=16384, features=512, classes=10, noise=8.0)
    split = data.load(seed=0)
    torch.manual_seed(0)
    model = MLP(hidden=[2048, 2048]).build(split.input_shape, split.num_classes)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    strategy = shoal.DataParallel(compression=spec)
    model, opt = strategy.prepare(model, opt)
    batches = strategy.loader(split.train, data.batch_size, shuffle=True, seed=0).forever()
    loss_fn = torch.nn.functional.cross_entropy
    curve, trained = [], 0.0
    for step in range(1, steps + 1):
        dist.barrier()
        start = time.perf_counter()
        strategy.train_step(model, opt, loss_fn, next(batches))
        dist.barrier()
        trained += time.perf_counter() - start
        if step % eval_every == 0 or step == steps:
            acc = strategy.evaluate(model, split.test, loss_fn)["eval_accuracy"]
            curve.append({"step": step, "seconds": trained, "accuracy": acc})
    if rt.is_main:
        Path(out).write_text(json.dumps({"spec": spec, "steps_per_s": steps / trained, "curve": curve}))
    shoal.shutdown()


def run_spec(hosts, spec: str, steps: int, eval_every: int, out: Path) -> dict:
    from shoal import env
    from tests.helpers.cli import SHOAL, finish
    from tests.helpers.procs import Processes

    job = {env.JOB_KEY: secrets.token_hex(16), env.THREADS: "1", "OMP_NUM_THREADS": "1"}
    with Processes() as procs:
        started = []
        for host in hosts.hosts:
            argv = [*SHOAL, "run", "-n", "1", "--nnodes", "2", "--node-rank", str(host.index)]
            argv += ["--rdzv-endpoint", f"{hosts[0].address}:{PORT}", __file__, "--worker", spec, str(steps)]
            argv += [str(eval_every), str(out)]
            started.append(procs.start(host.argv(argv), timeout=1800, env=job))
        done = [finish(p) for p in started]
    if any(d.returncode for d in done):
        sys.exit(f"{done[0].stderr[-3000:]}{done[1].stderr[-3000:]}\nbenchmark worker failed for {spec}")
    return json.loads(out.read_text())


def time_to(curve: list[dict], target: float) -> float | None:
    """Training seconds until the first evaluation at or above `target` (None: not reached)."""
    return next((p["seconds"] for p in curve if p["accuracy"] >= target), None)


def compare(rows: list[dict], slack: float) -> dict:
    none = next(r for r in rows if r["spec"] == "none")
    target = none["curve"][-1]["accuracy"] - slack
    base = time_to(none["curve"], target)
    for row in rows:
        row["final_accuracy"] = row["curve"][-1]["accuracy"]
        row["seconds_to_target"] = time_to(row["curve"], target)
        row["speedup_vs_none"] = row["steps_per_s"] / none["steps_per_s"]
        t = row["seconds_to_target"]
        row["time_to_target_vs_none"] = base / t if (t and base) else None
    return {"target_accuracy": target, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--rates", default="none,1gbit,100mbit", help="tc rates per host link; 'none' leaves it unshaped"
    )
    parser.add_argument("--specs", default=",".join(SPECS))
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--slack", type=float, default=0.01, help="target = none's final accuracy - slack")
    parser.add_argument("--name", default="network")
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        spec, steps, every, out = args.worker
        return worker(spec, int(steps), int(every), out)

    from tests.helpers.hosts import TestHosts, can_make_hosts

    # Stopped by a signal, leave through the `with` blocks: they remove the hosts and their processes.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    signal.signal(signal.SIGINT, signal.default_int_handler)

    if can_make_hosts():
        sys.exit(f"benchmarks/network.py: {can_make_hosts()}")
    results: dict = {}
    lines = []
    tmp = _harness.RESULTS / f"{args.name}.part.json"
    for rate in args.rates.split(","):
        with TestHosts(2) as hosts:
            links = [hosts.shape(i, rate=rate).applied for i in range(2)] if rate != "none" else ["unshaped veth"] * 2
            rows = [run_spec(hosts, spec, args.steps, args.eval_every, tmp) for spec in args.specs.split(",")]
        results[rate] = {"link": links[0], **compare(rows, args.slack)}
        line = ", ".join(
            f"{r['spec']} {r['speedup_vs_none']:.2f}x steps/s, "
            + (f"{r['time_to_target_vs_none']:.2f}x sooner" if r["time_to_target_vs_none"] else "target not reached")
            for r in results[rate]["rows"]
        )
        lines.append(f"{rate}: {line}")
        print(lines[-1], flush=True)
    tmp.unlink(missing_ok=True)
    result = {"steps": args.steps, "eval_every": args.eval_every, "slack": args.slack, "results": results}
    _harness.write(args.name, result, " | ".join(lines))


if __name__ == "__main__":
    main()
