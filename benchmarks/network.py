"""Time saved by compression on real links: data parallelism and PS-BSP across test hosts.

Test hosts (network namespaces on a bridge, `tests/helpers/hosts.py`), each
running `--workers-per-host` workers (and, for PS-BSP, one parameter server
per host), their links shaped with `tc` to each rate asked. For each model,
strategy and rate, every compressor runs side by side with "none": steps/s,
and the training time to reach the target accuracy (what "none" reaches at
the end, less `--slack`). Models: the large MLP (5.3M parameters, synthetic
data) and the character GPT (0.8M parameters, the standard library's text).
Each run also profiles one step: local compute, encode+decode, bytes on the
wire and their time at the link's rate, and the rest (waiting). Needs root.

This kernel has no qdisc that delays packets (netem, fq and etf are not
built in; only tbf, htb and fifo are), so links have a rate but no delay.

    PYTHONPATH=. python benchmarks/network.py [--models mlp,gpt] [--strategies dp,ps]
        [--rates 10gbit,1gbit,100mbit] [--specs none,fp16,...] [--hosts 2,4] [--steps 80]

Writes benchmarks/results/NAME.json and one line per model, strategy and rate.
"""

from __future__ import annotations

import argparse
import json
import re
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


def build(model: str):
    """(data split, batch size, model, optimizer, loss) of one benchmark model."""
    if model == "mlp":
        from shoal.data.synthetic import Synthetic
        from shoal.models.mlp import MLP

        data = Synthetic(batch_size=64, samples=16384, features=512, classes=10, noise=8.0)
        split = data.load(seed=0)
        torch.manual_seed(0)
        net = MLP(hidden=[2048, 2048]).build(split.input_shape, split.num_classes)
        return split, data.batch_size, net, torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9), _ce
    from shoal.data.chars import StdlibChars
    from shoal.models.gpt import GPT

    data = StdlibChars(batch_size=16, context=64, characters=200_000)
    split = data.load(seed=0)
    torch.manual_seed(0)
    net = GPT(layers=4, dim=128, heads=4).build(split.input_shape, split.num_classes)
    return split, data.batch_size, net, torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=0.01), _lm


def _ce(out, y):
    return torch.nn.functional.cross_entropy(out, y)


def _lm(logits, y):
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def worker(strategy_name: str, model_name: str, spec: str, steps: int, eval_every: int, out: str) -> None:
    """One spec on this rank: train, evaluating every `eval_every` steps (not timed), then profile."""
    import torch.distributed as dist

    import shoal

    rt = shoal.init()
    split, batch, model, opt, loss_fn = build(model_name)
    if strategy_name == "dp":
        strategy = shoal.DataParallel(compression=spec)
    else:
        strategy = shoal.ParameterServer(consistency="bsp", compression=spec)
    model, opt = strategy.prepare(model, opt)
    batches = strategy.loader(split.train, batch, shuffle=True, seed=0).forever()
    curve, trained, wire, waits = [], 0.0, [], []
    for step in range(1, steps + 1):
        dist.barrier()
        start = time.perf_counter()
        strategy.train_step(model, opt, loss_fn, next(batches))
        dist.barrier()
        trained += time.perf_counter() - start
        m = strategy.step_metrics()
        wire.append(m.get("bytes_sent", 0.0) + m.get("ps_bytes_pushed", 0.0) + m.get("ps_bytes_pulled", 0.0))
        waits.append(m.get("ps_wait_s", 0.0))
        if step % eval_every == 0 or step == steps:
            acc = strategy.evaluate(model, split.test, loss_fn)["eval_accuracy"]
            curve.append({"step": step, "seconds": trained, "accuracy": acc})
    fresh = build(model_name)[2]  # the same network without the strategy's hooks, for local costs
    profile = local_costs(fresh, spec, loss_fn, next(batches), data_parallel=strategy_name == "dp")
    profile["bytes_per_step"] = sum(wire[2:]) / max(1, len(wire[2:]))  # after PowerSGD's dense warm-up steps
    profile["ps_wait_s"] = sum(waits[2:]) / max(1, len(waits[2:]))  # PS: blocked on pushes and pulls
    strategy.close()
    if rt.is_main:
        Path(out).write_text(json.dumps({"spec": spec, "steps_per_s": steps / trained, "curve": curve, **profile}))
    shoal.shutdown()


def local_costs(model, spec: str, loss_fn, batch, data_parallel: bool, reps: int = 3) -> dict:
    """Seconds of one step's local work: forward+backward alone, and encode+decode of every gradient.

    PowerSGD under data parallel is timed as its DDP hook runs (`shoal.compress.powersgd_hook`, both
    ranks together: its two all-reduces carry a few hundred KB), not as the parameter server's codec."""
    from shoal.compress import parse

    x, y = batch
    start = time.perf_counter()
    for _ in range(reps):
        model.zero_grad()
        loss_fn(model(x), y).backward()
    compute = (time.perf_counter() - start) / reps
    codec = parse(spec)
    grads = [(n, p.grad.detach().clone()) for n, p in model.named_parameters() if p.grad is not None]
    if data_parallel and codec.family == "powersgd":
        return {"compute_s": compute, "codec_s": _powersgd_hook_seconds(grads, codec.rank, reps)}
    start = time.perf_counter()
    for _ in range(reps):
        for name, g in grads:
            codec.decode(codec.encode(name, g), g.shape, g.dtype)
    model.zero_grad()
    return {"compute_s": compute, "codec_s": (time.perf_counter() - start) / reps}


class _Bucket:
    """What the DDP hook reads of a `GradBucket`: one bucket holding every gradient."""

    def __init__(self, grads):
        self.flat = torch.cat([g.reshape(-1) for _, g in grads])
        self.params = [torch.empty(0) for _ in grads]
        pieces = self.flat.split([g.numel() for _, g in grads])
        self.views = [v.view_as(g) for v, (_, g) in zip(pieces, grads, strict=True)]

    def buffer(self):
        return self.flat

    def is_last(self):
        return True

    def parameters(self):
        return self.params

    def gradients(self):
        return self.views


def _powersgd_hook_seconds(grads, rank: int, reps: int) -> float:
    from shoal.compress.powersgd_hook import START_ITER, PowerSGDHook

    bucket = _Bucket(grads)
    names = {id(p): name for p, (name, _) in zip(bucket.params, grads, strict=True)}
    hook = PowerSGDHook(rank, names, lambda nbytes, numel: None, lambda: None)
    hook.iter = START_ITER
    hook.hook(None, bucket).wait()  # the first compressed step draws Q; later ones start from the last
    start = time.perf_counter()
    for _ in range(reps):
        hook.hook(None, bucket).wait()
    return (time.perf_counter() - start) / reps


def run_spec(hosts, args, strategy: str, model: str, spec: str, out: Path) -> dict:
    from shoal import env
    from tests.helpers.cli import SHOAL, finish
    from tests.helpers.procs import Processes

    job = {env.JOB_KEY: secrets.token_hex(16), env.THREADS: "1", "OMP_NUM_THREADS": "1"}
    servers = ["--servers", str(len(hosts))] if strategy == "ps" else []
    with Processes() as procs:
        started = []
        for host in hosts.hosts:
            argv = [*SHOAL, "run", "-n", str(args.workers_per_host), "--nnodes", str(len(hosts)), *servers]
            argv += ["--node-rank", str(host.index), "--rdzv-endpoint", f"{hosts[0].address}:{PORT}", __file__]
            argv += ["--worker", strategy, model, spec, str(args.steps), str(args.eval_every), str(out)]
            started.append(procs.start(host.argv(argv), timeout=1800, env=job))
        done = [finish(p) for p in started]
    if any(d.returncode for d in done):
        said = "".join(d.stderr[-2000:] for d in done)
        sys.exit(f"{said}\nbenchmark worker failed for {model} {strategy} {spec}")
    return json.loads(out.read_text())


def time_to(curve: list[dict], target: float) -> float | None:
    """Training seconds until the first evaluation at or above `target` (None: not reached)."""
    return next((p["seconds"] for p in curve if p["accuracy"] >= target), None)


def rate_bits(rate: str) -> float | None:
    """A tc rate ("100mbit", "1gbit") in bits per second; None for an unshaped link."""
    found = re.fullmatch(r"(\d+(?:\.\d+)?)([kmg]?)bit", rate)
    if not found:
        return None
    return float(found[1]) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[found[2]]


def compare(rows: list[dict], slack: float, rate: str, crossing: float = 1.0) -> dict:
    """Each spec against "none"; `crossing`: the share of a worker's bytes per step that its host's
    link carries (`link_share`)."""
    none = next(r for r in rows if r["spec"] == "none")
    target = none["curve"][-1]["accuracy"] - slack
    base = time_to(none["curve"], target)
    bits = rate_bits(rate)
    for row in rows:
        row["final_accuracy"] = row["curve"][-1]["accuracy"]
        row["seconds_to_target"] = time_to(row["curve"], target)
        row["speedup_vs_none"] = row["steps_per_s"] / none["steps_per_s"]
        t = row["seconds_to_target"]
        row["time_to_target_vs_none"] = base / t if (t and base) else None
        step = 1.0 / row["steps_per_s"]
        wire = row["bytes_per_step"] * crossing * 8 / bits if bits else None
        row["profile"] = {
            "step_s": step,
            "compute_s": row["compute_s"],
            "codec_s": row["codec_s"],
            "wire_s_at_rate": wire,
            "rest_s": step - row["compute_s"] - row["codec_s"] - (wire or 0.0),
            "ps_wait_s": row.get("ps_wait_s", 0.0),
        }
    return {"target_accuracy": target, "rows": rows}


def link_share(strategy: str, hosts: int, workers_per_host: int) -> float:
    """Bytes a host's link carries per step, as a multiple of one worker's bytes per step.

    DP: what the worker sends is what leaves its host (one worker per host). PS-BSP with one
    server per host: a worker's pushes to and pulls from its own host's server stay on the host;
    its host's link carries the rest, (hosts-1)/hosts of them, and the replies of its host's server
    to the other hosts' workers, by symmetry as many: per worker on the host, (hosts-1)/hosts."""
    return workers_per_host * (hosts - 1) / hosts if strategy == "ps" else 1.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mlp,gpt", help="mlp (5.3M parameters) and/or gpt (0.8M)")
    parser.add_argument("--strategies", default="dp,ps", help="dp (DataParallel) and/or ps (ParameterServer, bsp)")
    parser.add_argument(
        "--rates", default="10gbit,1gbit,100mbit", help="tc rates per host link; 'none' leaves it unshaped"
    )
    parser.add_argument("--specs", default=",".join(SPECS))
    parser.add_argument("--hosts", default="2", help="test hosts, e.g. 2,4 (PS-BSP: one server on each)")
    parser.add_argument("--workers-per-host", type=int, default=1)
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--slack", type=float, default=0.01, help="target = none's final accuracy - slack")
    parser.add_argument("--name", default="network")
    parser.add_argument("--worker", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        strategy, model, spec, steps, every, out = args.worker
        return worker(strategy, model, spec, int(steps), int(every), out)

    from tests.helpers.hosts import TestHosts, can_make_hosts

    # Stopped by a signal, leave through the `with` blocks: they remove the hosts and their processes.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    signal.signal(signal.SIGINT, signal.default_int_handler)

    if can_make_hosts():
        sys.exit(f"benchmarks/network.py: {can_make_hosts()}")
    results: dict = {}
    lines = []
    tmp = _harness.RESULTS / f"{args.name}.part.json"
    partial = _harness.RESULTS / f"{args.name}.cells.json"
    grid = [
        (model, strategy, int(count), rate)
        for model in args.models.split(",")
        for strategy in args.strategies.split(",")
        for count in args.hosts.split(",")
        for rate in args.rates.split(",")
    ]
    for model, strategy, count, rate in grid:
        with TestHosts(count) as hosts:
            shaped = rate != "none"
            links = [hosts.shape(i, rate=rate).applied if shaped else "unshaped" for i in range(len(hosts))]
            rows = [run_spec(hosts, args, strategy, model, s, tmp) for s in args.specs.split(",")]
        key = f"{model}/{strategy}/{count * args.workers_per_host}w/{rate}"
        share = link_share(strategy, count, args.workers_per_host)
        results[key] = {"link": links[0], "hosts": count, "link_share": share, **compare(rows, args.slack, rate, share)}
        line = ", ".join(
            f"{r['spec']} {r['speedup_vs_none']:.2f}x steps/s, "
            + (f"{r['time_to_target_vs_none']:.2f}x sooner" if r["time_to_target_vs_none"] else "not reached")
            for r in results[key]["rows"]
        )
        lines.append(f"{key}: {line}")
        print(lines[-1], flush=True)
        partial.write_text(json.dumps(results))  # what a cut-short run had measured
    tmp.unlink(missing_ok=True)
    partial.unlink(missing_ok=True)
    result = {
        "hosts": args.hosts,
        "workers_per_host": args.workers_per_host,
        "steps": args.steps,
        "eval_every": args.eval_every,
        "slack": args.slack,
        "results": results,
    }
    _harness.write(args.name, result, " | ".join(lines))


if __name__ == "__main__":
    main()
