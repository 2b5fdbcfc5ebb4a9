"""Parameter server benchmarks, each comparison side by side in one run.

1. Throughput: PS-BSP with 1 and 2 servers against DataParallel (DDP, gloo),
   2 workers, steps/s, on the digits MLP and on a communication-heavy MLP
   (>= 5M parameters); with 2 servers also PS-BSP pushing during backward
   (`overlap=True`; on CPUs the default pushes at `step()`), SSP s=1 and
   ASP, each unreplicated, and PS-BSP and ASP
   with every shard replicated on both servers (`--replication 2`,
   `shoal.ps.replication`; `--only replication` runs just those four).
2. Stragglers: 4 workers, wall time until rank 0's model reaches a target
   test accuracy under BSP, SSP (s = 1, 3) and ASP, and the final accuracy.
   - transient: every worker is 4x slower on a random 10% of its steps;
   - persistent: one worker (rank 3) is always 3x slower.
   A step's compute is simulated by sleep faults of the fault schedule
   (`shoal.faults`, SHOAL_FAULTS): BASE seconds for everyone at every step
   plus the scenario's extra delays. On a 2-core machine 4 workers and a
   server would otherwise fight over the CPU and the measurement would be of
   the scheduler, not of the consistency.

3. Pull (`--only pull`): what installing the pulled parameters inside
   `optimizer.step()` costs against installing them at the next forward
   pass (shoal before issue 11), steps/s, 2 workers, 1 server, per mode.

4. Transport (`--only transport`): PS-BSP on one machine over ipc:// in the
   job's private directory (the default, `shoal.comm.ipc`) against TCP with
   CURVE (SHOAL_PS_IPC=0), 2 workers, 1 server and 2 replicated servers,
   with DDP for the ratio the throughput part reports.

    PYTHONPATH=. python benchmarks/ps.py [--reps 3] [--steps N] [--models digits_mlp,wide_mlp_5m]
        [--only throughput|replication|stragglers|pull|transport]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness

from shoal import env

MODELS = {"digits_mlp": [64, 256, 128, 10], "wide_mlp_5m": [64, 2048, 2048, 512, 10]}
BASE_S = 0.02  # the simulated compute of one step
THROUGHPUT = {  # name: strategy (dp or a consistency mode), servers, replication, worker arguments
    "data_parallel": ("dp", 0, None, []),
    "ps_bsp_1_server": ("bsp", 1, None, []),
    "ps_bsp_2_servers": ("bsp", 2, 1, []),
    "ps_bsp_2_servers_overlap": ("bsp", 2, 1, ["--overlap"]),
    "ps_ssp1_2_servers": ("ssp", 2, 1, ["--staleness", "1"]),
    "ps_asp_2_servers": ("asp", 2, 1, []),
    "ps_bsp_2_servers_replicated": ("bsp", 2, 2, []),
    "ps_asp_2_servers_replicated": ("asp", 2, 2, []),
}
TRANSPORT = {  # name: servers, replication (None: the launcher's default), environment
    "ps_bsp_1_server_ipc": (1, None, {}),
    "ps_bsp_1_server_tcp_curve": (1, None, {env.PS_IPC: "0"}),
    "ps_bsp_2_servers_replicated_ipc": (2, 2, {}),
    "ps_bsp_2_servers_replicated_tcp_curve": (2, 2, {env.PS_IPC: "0"}),
}
REPLICATION = ("ps_bsp_2_servers", "ps_bsp_2_servers_replicated", "ps_asp_2_servers", "ps_asp_2_servers_replicated")


def build(widths: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Flatten()]
    for a, b in itertools.pairwise(widths):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def worker(args) -> None:
    import shoal
    from shoal.data.digits import Digits

    rt = shoal.init()
    torch.manual_seed(0)
    split = Digits().load(seed=0)
    model = build(MODELS[args.model])
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    if args.strategy == "dp":
        strategy = shoal.DataParallel()
    else:
        strategy = shoal.ParameterServer(
            consistency=args.strategy,
            staleness=args.staleness,
            servers=args.servers,
            chunk_bytes=1 << 20,
            overlap=True if args.overlap else None,
        )
    if args.install_at_forward:
        strategy.install_at_forward = True  # pyright: ignore[reportAttributeAccessIssue] -- ps only
    model, opt = strategy.prepare(model, opt)
    batches = strategy.loader(split.train, args.batch, seed=0).forever()
    measure = throughput if args.task == "throughput" else stragglers
    out = measure(args, strategy, model, opt, batches, split)
    if rt.rank == 0:
        Path(args.out).write_text(json.dumps(out))
    strategy.close()
    shoal.shutdown()


def throughput(args, strategy, model, opt, batches, split) -> dict:
    """Steps/s over `args.steps` steps after 3 warm-up steps, bracketed by barriers."""
    import torch.distributed as dist

    loss_fn = nn.CrossEntropyLoss()

    def step():
        strategy.train_step(model, opt, loss_fn, next(batches))

    for _ in range(3):
        step()
    if hasattr(strategy, "sync"):
        strategy.sync()
    dist.barrier()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    if hasattr(strategy, "sync"):
        strategy.sync()
    dist.barrier()
    out = {"steps_per_s": args.steps / (time.perf_counter() - start)}
    out["parameters"] = sum(p.numel() for p in model.parameters())
    return {**out, **strategy.step_metrics()}


def stragglers(args, strategy, model, opt, batches, split) -> dict:
    """Wall time from the common start (every worker has joined the servers) until
    rank 0's model, with the parameters it pulls, reaches the target accuracy."""
    import torch.distributed as dist

    loss_fn = nn.CrossEntropyLoss()
    x_test, y_test = split.test.tensors
    dist.barrier()
    start = time.perf_counter()
    curve = []
    for step in range(1, args.steps + 1):
        strategy.train_step(model, opt, loss_fn, next(batches))
        if dist.get_rank() == 0 and step % 5 == 0:
            strategy.sync()
            with torch.no_grad():
                acc = float((model(x_test).argmax(-1) == y_test).float().mean())
            curve.append([round(time.perf_counter() - start, 4), step, round(acc, 4)])
    strategy.sync()
    out = {"wall_s": time.perf_counter() - start, "curve": curve}
    out.update({k: v for k, v in strategy.step_metrics().items() if k in ("ps_staleness", "ps_wait_frac")})
    dist.barrier()  # every worker done: rank 0 now evaluates the final parameters
    strategy.refresh()
    with torch.no_grad():
        out["final_accuracy"] = float((model(x_test).argmax(-1) == y_test).float().mean())
    return out


def launch(
    nproc: int,
    servers: int,
    wargs: list[str],
    faults: list[dict] | None = None,
    timeout: float = 600,
    replication: int | None = None,
    extra_env: dict[str, str] | None = None,
) -> dict:
    """One run of this script's worker on `nproc` workers and `servers` servers (each shard
    on `replication` of them), under the fault schedule `faults`, with `extra_env`; rank 0's figures."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out.json")
        schedule = {env.FAULTS: json.dumps({"seed": 0, "faults": faults})} if faults else {}
        schedule.update(extra_env or {})
        wargs = ["--out", out, "--servers", str(servers), *wargs]
        _harness.launch(
            __file__, nproc, wargs, servers=servers, timeout=timeout, env=schedule, quiet=True, replication=replication
        )
        return json.loads(Path(out).read_text())


def sleeps(rank: int | str, seconds: float, prob: float = 1.0) -> dict:
    """A straggler: worker `rank` ("*": every worker) sleeps `seconds` at each step, with probability `prob`."""
    return {"role": "worker", "rank": rank, "step": "*", "action": "sleep", "seconds": seconds, "prob": prob}


def time_to(curve: list, target: float) -> float | None:
    return next((t for t, _, acc in curve if acc >= target), None)


def pull_cost(args) -> None:
    """Steps/s with the pull installed in `step()` against at the next forward, interleaved, per mode;
    prints the medians and writes benchmarks/results/ps_pull.json."""
    cases = {}
    steps = str(args.steps or 200)
    for model in ("digits_mlp", "wide_mlp_5m"):
        for mode, s in (("bsp", 0), ("ssp", 1), ("asp", 0)):
            base = ["--task", "throughput", "--model", model, "--strategy", mode, "--staleness", str(s)]
            base += ["--steps", steps if model == "digits_mlp" else str(max(10, int(steps) // 5))]
            runs: dict[str, list[float]] = {"in_step": [], "at_forward": []}
            for _ in range(args.reps):
                for name, extra in (("in_step", []), ("at_forward", ["--install-at-forward"])):
                    runs[name].append(launch(2, 1, [*base, *extra])["steps_per_s"])
            row = {k: {"steps_per_s": statistics.median(v), "runs": v} for k, v in runs.items()}
            row["ratio"] = row["in_step"]["steps_per_s"] / row["at_forward"]["steps_per_s"]
            cases[f"{model}/{mode}"] = row
            print(
                f"{model} {mode}: in step() {row['in_step']['steps_per_s']:.1f} steps/s {runs['in_step']}, "
                f"at forward {row['at_forward']['steps_per_s']:.1f} {runs['at_forward']}, "
                f"ratio {row['ratio']:.2f}",
                flush=True,
            )
    config = {"reps": args.reps, "steps": steps, "command": " ".join(["python", "benchmarks/ps.py", *sys.argv[1:]])}
    summary = "ps pull in step() vs at forward: " + "; ".join(f"{k} {v['ratio']:.2f}" for k, v in cases.items())
    _harness.write("ps_pull", {"config": config, "cases": cases}, summary)


def transports(args, cases) -> None:
    """PS-BSP steps/s over ipc:// against TCP with CURVE (`TRANSPORT`), and DDP, interleaved `args.reps`
    times; prints the medians and writes benchmarks/results/ps_transport.json."""
    variants = {"data_parallel": ("dp", 0, None, {}), **{k: ("bsp", *v) for k, v in TRANSPORT.items()}}
    tp, vs_tcp = {}, {}
    for model, steps in [c for c in cases if c[0] in args.models.split(",")]:
        runs: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(args.reps):  # interleaved, so drift in the machine's load hits every variant
            for name, (strategy, servers, replication, extra) in variants.items():
                wargs = ["--task", "throughput", "--model", model, "--strategy", strategy, "--steps", str(steps)]
                r = launch(2, servers, wargs, replication=replication, extra_env=extra)
                runs[name].append(r["steps_per_s"])
                print(f"{model} {name}: {r['steps_per_s']:.1f} steps/s", flush=True)
        ddp = statistics.median(runs["data_parallel"])
        tp[model] = {
            name: {"steps_per_s": statistics.median(rs), "runs": rs, "vs_ddp": statistics.median(rs) / ddp}
            for name, rs in runs.items()
        }
        # The median of each round's ratio: the two transports of one round ran back to back, under one load.
        vs_tcp[model] = {
            name.removesuffix("_ipc"): statistics.median(
                a / b for a, b in zip(runs[name], runs[name.removesuffix("_ipc") + "_tcp_curve"], strict=True)
            )
            for name in TRANSPORT
            if name.endswith("_ipc")
        }
    summary = "ps ipc vs TCP+CURVE steps/s (one machine): " + "; ".join(
        f"{m} " + ", ".join(f"{k} {x:.2f}" for k, x in r.items()) for m, r in vs_tcp.items()
    )
    config = {"reps": args.reps, "timed_steps": dict(cases), "loadavg_after": list(os.getloadavg())}
    config["command"] = " ".join(["python", "benchmarks/ps.py", *sys.argv[1:]])
    _harness.write("ps_transport", {"config": config, "throughput": tp, "ipc_vs_tcp_curve": vs_tcp}, summary)


def throughputs(args, cases) -> dict:
    """Steps/s of every THROUGHPUT variant on each model, interleaved `args.reps` times; with
    `--only throughput` also written to benchmarks/results/ps_throughput.json."""
    results: dict = {"throughput": {}}
    variants = {k: v for k, v in THROUGHPUT.items() if args.only != "replication" or k in REPLICATION}
    for model, steps in [c for c in cases if c[0] in args.models.split(",")]:
        runs: dict = {name: [] for name in variants}
        for _ in range(args.reps):  # interleaved, so drift in the machine's load hits every variant
            for name, (strategy, servers, replication, extra) in variants.items():
                r = launch(
                    2,
                    servers,
                    ["--task", "throughput", "--model", model, "--strategy", strategy, "--steps", str(steps), *extra],
                    replication=replication,
                )
                runs[name].append(r)
                print(f"{model} {name}: {r['steps_per_s']:.1f} steps/s", flush=True)
        results["throughput"][model] = {
            name: {
                "steps_per_s": statistics.median(r["steps_per_s"] for r in rs),
                "runs": [r["steps_per_s"] for r in rs],
                "parameters": rs[0]["parameters"],
                **{k: v for k, v in rs[-1].items() if k.startswith("ps_bytes")},
            }
            for name, rs in runs.items()
        }

    if args.only == "replication":
        tp = results["throughput"]
        # The median of each round's ratio: the variants of one round ran back to back, under one load.
        vs = {
            m: {
                mode: statistics.median(
                    a / b
                    for a, b in zip(
                        r[f"ps_{mode}_2_servers_replicated"]["runs"], r[f"ps_{mode}_2_servers"]["runs"], strict=True
                    )
                )
                for mode in ("bsp", "asp")
            }
            for m, r in tp.items()
        }
        summary = "ps replicated vs unreplicated steps/s (2 servers): " + "; ".join(
            f"{m} " + ", ".join(f"{k} {x:.2f}" for k, x in r.items()) for m, r in vs.items()
        )
        config = {"reps": args.reps, "timed_steps": dict(cases), "loadavg_1min_after": os.getloadavg()[0]}
        config["command"] = " ".join(["python", "benchmarks/ps.py", *sys.argv[1:]])
        _harness.write("ps_replication", {"config": config, "throughput": tp, "replicated_vs_not": vs}, summary)
    if args.only == "throughput":
        tp = results["throughput"]
        vs = {m: {k: v["steps_per_s"] / r["data_parallel"]["steps_per_s"] for k, v in r.items()} for m, r in tp.items()}
        summary = "ps throughput vs DDP: " + "; ".join(
            f"{m} " + ", ".join(f"{k} {x:.2f}" for k, x in r.items() if k != "data_parallel") for m, r in vs.items()
        )
        config = {"reps": args.reps, "timed_steps": dict(cases), "loadavg_1min_after": os.getloadavg()[0]}
        config["command"] = " ".join(["python", "benchmarks/ps.py", *sys.argv[1:]])
        _harness.write("ps_throughput", {"config": config, "throughput": tp, "vs_ddp": vs}, summary)
    return results["throughput"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default="")
    parser.add_argument("--task", default="throughput")
    parser.add_argument("--model", default="digits_mlp")
    parser.add_argument("--strategy", default="bsp")
    parser.add_argument("--staleness", type=int, default=0)
    parser.add_argument("--servers", type=int, default=1)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument(
        "--steps", type=int, default=0, help="timed steps (throughput) or steps per worker (stragglers)"
    )
    parser.add_argument("--install-at-forward", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--overlap", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--target", type=float, default=0.93)
    parser.add_argument("--reps", type=int, default=3, help="throughput runs per variant (the median is reported)")
    parser.add_argument(
        "--only",
        choices=["throughput", "replication", "stragglers", "pull", "transport"],
        default=None,
        help="run one part (throughput writes ps_throughput.json, stragglers nothing)",
    )
    parser.add_argument("--models", default="digits_mlp,wide_mlp_5m", help="throughput: which models")
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    if args.only == "pull":
        return pull_cost(args)

    results: dict = {"throughput": {}, "stragglers": {}}
    cases = (("digits_mlp", args.steps or 100), ("wide_mlp_5m", max(10, (args.steps or 100) // 5)))
    if args.only == "transport":
        return transports(args, cases)
    if args.only != "stragglers":
        results["throughput"] = throughputs(args, cases)
    if args.only in ("throughput", "replication"):
        return
    per_worker = args.steps or 150
    scenarios = {
        "transient": [sleeps("*", BASE_S), sleeps("*", 3 * BASE_S, prob=0.1)],  # 4x on a random 10% of steps
        "persistent": [sleeps("*", BASE_S), sleeps(3, 2 * BASE_S)],  # rank 3 always 3x
    }
    modes = (("bsp", 0), ("ssp_1", 1), ("ssp_3", 3), ("asp", 0))
    for scenario, faults in scenarios.items():
        row = {}
        for name, s in modes:
            r = launch(
                4,
                1,
                [
                    "--task",
                    "stragglers",
                    "--strategy",
                    name.split("_")[0],
                    "--staleness",
                    str(s),
                    "--batch",
                    "16",
                    "--lr",
                    "0.02",
                    "--steps",
                    str(per_worker),
                    "--model",
                    "digits_mlp",
                ],
                faults,
            )
            r["time_to_target_s"] = time_to(r["curve"], args.target)
            row[name] = r
            reached, final = r["time_to_target_s"], r["final_accuracy"]
            print(f"{scenario} {name}: target {args.target} at {reached}s, final accuracy {final:.4f}", flush=True)
        bsp = row["bsp"]["time_to_target_s"]
        for name in row:
            t = row[name]["time_to_target_s"]
            row[name]["vs_bsp"] = t / bsp if t is not None and bsp else None
        results["stragglers"][scenario] = {"faults": faults, "modes": row}

    if args.only:
        return
    tp = results["throughput"]
    st = results["stragglers"]

    def ratio(s, m):
        v = st[s]["modes"][m]["vs_bsp"]
        return f"{v:.2f}" if v is not None else "n/a"

    def ratios(s):
        return f"SSP1 {ratio(s, 'ssp_1')} SSP3 {ratio(s, 'ssp_3')} ASP {ratio(s, 'asp')}"

    def rates(r):
        return "/".join(f"{r[v]['steps_per_s']:.1f}" for v in THROUGHPUT)

    summary = (
        "ps: steps/s DP/BSP1/BSP2/BSP2-overlap/SSP1/ASP "
        + "; ".join(f"{m} {rates(r)}" for m, r in tp.items())
        + f" | time to {args.target} vs BSP: transient {ratios('transient')}; persistent {ratios('persistent')}"
    )
    config = {
        "base_step_s": BASE_S,
        "target": args.target,
        "steps_per_worker": per_worker,
        "models": MODELS,
        "reps": args.reps,
        "timed_steps": dict(cases),
        "command": " ".join(["python", "benchmarks/ps.py", *sys.argv[1:]]),
    }
    _harness.write("ps", {"config": config, **results}, summary)


if __name__ == "__main__":
    main()
