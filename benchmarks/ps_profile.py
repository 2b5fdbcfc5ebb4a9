"""Where a PS-BSP step's time goes, next to DDP (issue 11 section 4), on the 5.4M-parameter MLP.

Two parts, both printed and written to benchmarks/results/ps_profile.json:

1. Real jobs (2 workers; DDP, PS-BSP with 1 and 2 servers), interleaved
   `--reps` times. Rank 0 times each phase of its own steps (forward,
   backward, `optimizer.step()`, and inside it: encoding and sealing the
   push, waiting for the pull, checking the pull's seal, installing), and
   reads from /proc the CPU seconds that every process of the job (workers
   and servers, children of the launcher) used during the timed steps: on
   a 2-core machine the CPU work per step, not the waiting, sets the pace.
2. One server's work, in this process with the real `Server` code on the
   same layout: checking a push (seal, header, shapes, finiteness),
   accumulating it, applying the clock's average (the optimizer), and
   answering the pulls (snapshot, seal), with and without the MAC.

3. The same job with the per-message HMAC back on under CURVE
   (`ps_bsp_2_servers_mac`, a measurement only: a sitecustomize makes every
   process of that job sign as it did before CURVE replaced the MAC,
   `shoal.comm.wire`), and over TCP with CURVE and no MAC
   (`ps_bsp_2_servers_tcp_curve`, SHOAL_PS_IPC=0), side by side with the
   default on one machine (ipc:// in a private directory, `shoal.comm.ipc`).

    PYTHONPATH=. python benchmarks/ps_profile.py [--reps 3] [--steps 30] [--only VARIANT,...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness
from ps import MODELS, build

from shoal import env

TICK = os.sysconf("SC_CLK_TCK")


def job_cpu_s() -> float:
    """CPU seconds used so far by every child of this worker's launcher (workers and servers)."""
    parent = os.getppid()
    total = 0.0
    for task in os.listdir(f"/proc/{parent}/task"):
        with open(f"/proc/{parent}/task/{task}/children") as f:
            for pid in f.read().split():
                try:
                    with open(f"/proc/{pid}/stat") as s:
                        fields = s.read().rsplit(")", 1)[1].split()
                    total += (int(fields[11]) + int(fields[12])) / TICK  # utime + stime
                except OSError:
                    continue
    return total


class Phases:
    """Seconds per named phase, summed over the timed steps: wall time (`s`) and this thread's CPU
    time (`cpu`, which other processes on a busy machine do not inflate)."""

    def __init__(self) -> None:
        self.s: dict[str, float] = defaultdict(float)
        self.cpu: dict[str, float] = defaultdict(float)
        self.on = False

    def wrap(self, owner: type, name: str, phase: str) -> None:
        inner = getattr(owner, name)
        phases = self

        def timed(*args, **kwargs):
            start, cpu = time.perf_counter(), time.thread_time()
            try:
                return inner(*args, **kwargs)
            finally:
                if phases.on:
                    phases.s[phase] += time.perf_counter() - start
                    phases.cpu[phase] += time.thread_time() - cpu

        setattr(owner, name, timed)


def instrument() -> Phases:
    """Time the worker's parts of a step that happen inside `optimizer.step()` or backward."""
    from shoal.comm.wire import Codec
    from shoal.ps.client import Client
    from shoal.strategies.parameter_server import strategy as ps_strategy

    phases = Phases()
    phases.wrap(Codec, "decode", "pull: check seal, decode")
    phases.wrap(Client, "push", "push at step(): encode, seal, queue")
    phases.wrap(Client, "push_part", "push during backward: encode, seal, queue")
    phases.wrap(Client, "wait_pull", "pull: wait (incl. check)")
    phases.wrap(ps_strategy.ParameterServer, "_install", "pull: install")
    return phases


def worker(args) -> None:
    import torch.distributed as dist

    import shoal
    from shoal.comm.wire import Codec
    from shoal.data.digits import Digits

    phases = instrument()
    rt = shoal.init()
    torch.manual_seed(0)
    split = Digits().load(seed=0)
    model = build(MODELS["wide_mlp_5m"])
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    if args.strategy == "dp":
        strategy = shoal.DataParallel()
    else:
        extra = {"overlap": True} if args.overlap else {}
        strategy = shoal.ParameterServer(servers=args.servers, chunk_bytes=1 << 20, **extra)
    model, prepared = strategy.prepare(model, opt)
    assert prepared is not None
    opt = prepared
    batches = strategy.loader(split.train, 32, seed=0).forever()
    loss_fn = nn.CrossEntropyLoss()

    def step() -> None:
        x, y = next(batches)
        t = [(time.perf_counter(), time.thread_time())]
        loss = loss_fn(model(x), y)
        t.append((time.perf_counter(), time.thread_time()))
        loss.backward()
        t.append((time.perf_counter(), time.thread_time()))
        opt.step()
        t.append((time.perf_counter(), time.thread_time()))
        opt.zero_grad()
        if phases.on:
            for i, name in enumerate(("forward", "backward", "optimizer.step()")):
                phases.s[name] += t[i + 1][0] - t[i][0]
                phases.cpu[name] += t[i + 1][1] - t[i][1]

    for _ in range(3):
        step()
    dist.barrier()
    cpu0, start = job_cpu_s(), time.perf_counter()
    phases.on = True
    for _ in range(args.steps):
        step()
    phases.on = False
    dist.barrier()
    wall, cpu = time.perf_counter() - start, job_cpu_s() - cpu0
    if rt.rank == 0:
        per_step = {k: 1000 * v / args.steps for k, v in phases.s.items()}
        per_step.update({f"{k} [CPU]": 1000 * v / args.steps for k, v in phases.cpu.items()})
        out = {
            "steps_per_s": args.steps / wall,
            "ms_per_step": per_step,
            "job_cpu_ms_per_step": 1000 * cpu / args.steps,
            "signed": Codec(b"k" * 32).signed,  # whether this job's messages carried the HMAC
            "ipc": bool(os.environ.get(env.PS_IPC_DIR)),  # whether its sockets were ipc:// (else TCP + CURVE)
        }
        Path(args.out).write_text(json.dumps(out))
    strategy.close()
    shoal.shutdown()


def launch(servers: int, wargs: list[str], mac: bool = False, tcp: bool = False) -> dict:
    """One job; `mac`: every message signed; `tcp`: over TCP with CURVE (SHOAL_PS_IPC=0), not ipc://."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out.json")
        extra = {**(_harness.signing_everywhere(tmp) if mac else {}), **({env.PS_IPC: "0"} if tcp else {})}
        wargs = ["--out", out, "--servers", str(servers), *wargs]
        ok = _harness.launch_keeping(out, __file__, 2, wargs, servers=servers, quiet=True, env=extra)
        return {**json.loads(Path(out).read_text()), "failed_after_timing": not ok}  # e.g. at shutdown


def server_work(servers: int, reps: int, mac: bool) -> dict[str, float]:
    """CPU milliseconds of one server's work per BSP clock with 2 workers (server 0 of `servers`),
    through the real `Server.handle` on real frames; the median of `reps` clocks. CPU time of this
    process, so that other processes on a busy machine do not inflate it. `mac`: messages carry the
    HMAC, as without CURVE (else tags, as under CURVE, the default)."""
    from shoal.comm.wire import Codec
    from shoal.ps import optim as ps_optim
    from shoal.ps.consistency import Mode
    from shoal.ps.protocol import INIT, PULL, PUSH
    from shoal.ps.server import Server
    from shoal.strategies.parameter_server.layout import Placement, lay_out, served_parameters

    torch.manual_seed(0)
    model = build(MODELS["wide_mlp_5m"])
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    served = served_parameters(model, opt)
    modes = {s.name: Mode("bsp") for s in served}
    layout = lay_out(served, opt, Placement(servers, 1 << 20, modes, "SGD", 60.0, "none"))
    codec = Codec(b"k" * 32)
    codec.signed = mac  # the server's socket is CURVE either way (it is not used here)
    server = Server(0, codec)
    spec, values = layout.specs[0], layout.values[0]
    seq = [0, 0]

    def frames(src: int, header: dict, tensors=()) -> list:
        seq[src] += 1
        addressed = {"to": server.index, "session": server.session}  # `shoal.comm.replay`
        owned = [t.clone() for t in tensors]  # a socket hands the server frames of its own, which it sums into
        return codec.encode({**header, "src": src, "seq": seq[src], **addressed}, owned)

    for w in (0, 1):
        server.handle(b"w%d" % w, frames(w, {"op": INIT, "world": 2, "spec": spec}, values if w == 0 else ()))
    grads = [torch.randn_like(v) * 1e-3 for v in values]
    hp = [ps_optim.hyperparameters("SGD", g) for g in opt.param_groups]
    keys = [k[0] for k in spec["keys"]]
    times: dict[str, list[float]] = defaultdict(list)
    for clock in range(reps):
        for w in (0, 1):
            msg = frames(w, {"op": PULL, "clock": clock})
            server.handle(b"w%d" % w, msg)
        pushes = [frames(w, {"op": PUSH, "clock": clock, "keys": keys, "hp": hp}, grads) for w in (0, 1)]
        t = time.process_time()
        codec.decode(pushes[0])
        times["check seal, decode one push"].append(time.process_time() - t)
        t = time.process_time()
        server.handle(b"w0", pushes[0])
        times["first push: check, accumulate"].append(time.process_time() - t)
        t = time.process_time()
        server.handle(b"w1", pushes[1])
        times["last push: check, add, average, apply"].append(time.process_time() - t)
        pulls = [frames(w, {"op": PULL, "clock": clock + 1}) for w in (0, 1)]
        t = time.process_time()
        for w in (0, 1):
            server.handle(b"w%d" % w, pulls[w])
        times["answer 2 pulls: snapshot, seal, send"].append(time.process_time() - t)
    server.close(linger_ms=0)  # with its ZAP handler, or the context waits for it
    return {k: 1000 * statistics.median(v) for k, v in times.items()}


VARIANTS = {  # name: strategy, servers, worker arguments, with the HMAC (a measurement only), over TCP + CURVE
    "data_parallel": ("dp", 0, [], False, False),
    "ps_bsp_1_server": ("bsp", 1, [], False, False),
    "ps_bsp_2_servers": ("bsp", 2, [], False, False),
    "ps_bsp_2_servers_overlap": ("bsp", 2, ["--overlap"], False, False),
    "ps_bsp_2_servers_tcp_curve": ("bsp", 2, [], False, True),
    "ps_bsp_2_servers_mac": ("bsp", 2, [], True, True),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default="")
    parser.add_argument("--strategy", default="bsp")
    parser.add_argument("--servers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--overlap", action="store_true", help="PS: push during backward (overlap=True)")
    parser.add_argument("--only", default="", help="comma-separated variants (default: all)")
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    torch.set_num_threads(1)
    chosen = {k: v for k, v in VARIANTS.items() if not args.only or k in args.only.split(",")}
    runs: dict[str, list[dict]] = {k: [] for k in chosen}
    load = [os.getloadavg()]
    for rep in range(args.reps):  # interleaved, so drift in the machine's load hits every variant,
        order = list(chosen.items())  # and every other round in reverse, so no variant always goes first
        for name, (strategy, servers, extra, mac, tcp) in order[::-1] if rep % 2 else order:
            r = launch(servers, ["--strategy", strategy, "--steps", str(args.steps), *extra], mac, tcp)
            runs[name].append(r)
            print(f"{name}: {r['steps_per_s']:.2f} steps/s, job CPU {r['job_cpu_ms_per_step']:.0f} ms/step", flush=True)
        load.append(os.getloadavg())
    jobs = {}
    for name, rs in runs.items():
        phases = {k: statistics.median(r["ms_per_step"].get(k, 0.0) for r in rs) for k in rs[0]["ms_per_step"]}
        jobs[name] = {
            "steps_per_s": statistics.median(r["steps_per_s"] for r in rs),
            "runs": [r["steps_per_s"] for r in rs],
            "job_cpu_ms_per_step": statistics.median(r["job_cpu_ms_per_step"] for r in rs),
            "signed": [r.get("signed") for r in rs],
            "ipc": [r.get("ipc") for r in rs],
            "failed_after_timing": sum(r["failed_after_timing"] for r in rs),
            "rank0_ms_per_step": phases,
        }
        print(name, json.dumps(jobs[name], indent=1), flush=True)
    server = {f"{n}_servers{'_mac' if mac else ''}": server_work(n, 7, mac) for n in (1, 2) for mac in (False, True)}
    print("one server's work per clock, ms:", json.dumps(server, indent=1))
    config = {"reps": args.reps, "steps": args.steps, "loadavg_1min_per_round": [round(x[0], 1) for x in load]}
    config["command"] = " ".join(["python", "benchmarks/ps_profile.py", *sys.argv[1:]])
    dp = jobs.get("data_parallel", {}).get("steps_per_s")
    ratios = {k: v["steps_per_s"] / dp for k, v in jobs.items()} if dp else {}
    summary = "ps profile, steps/s vs DDP: " + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items())
    summary += f" (load average {load[0][0]:.1f} to {load[-1][0]:.1f})"
    _harness.write(
        "ps_profile", {"config": config, "jobs": jobs, "vs_ddp": ratios, "server_ms_per_clock": server}, summary
    )


if __name__ == "__main__":
    main()
