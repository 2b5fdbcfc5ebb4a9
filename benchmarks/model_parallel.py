"""Model parallelism side by side, on 2 ranks (gloo, 1 torch thread each).

- pipeline: bubble fraction against the theory (S-1)/(M+S-1) for M = 1, 4,
  8, 16 micro-batches, S = 2 stages, a fixed batch. Per rank, the bubble is
  the part of a pipelined step the rank does not compute:
  1 - C / T, where T is the step's wall time and C the time the same rank
  takes to run its own stage's forward and backward on the same M
  micro-batches back to back, alone (measured right after, both ranks at
  once, so the machine is as busy as in the step). Communication counts as
  bubble; the theory assumes it is free and the stages equal.
- pipeline: peak activation memory per rank, GPipe against 1F1B (M = 8):
  the bytes autograd holds for backward, counted with
  `torch.autograd.graph.saved_tensors_hooks` as they are saved and freed.
- sharded (FSDP2) against DataParallel (DDP), Adam: model-state bytes per
  rank (parameters, gradients and optimizer state that the rank keeps, local
  shards counted) and steps/s.
- tensor parallel (2 ranks) against one process: the largest difference in
  loss and parameters after K steps, and step time.

    python benchmarks/model_parallel.py [--reps 3] [--sharded-steps 10] [--tp-steps 10]
                                        [--parts pipeline,sharded,tp] [--name model_parallel]

Writes benchmarks/results/model_parallel.json and one summary line.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
import weakref
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness

WIDTH, BLOCKS, BATCH = 1024, 8, 256  # pipeline model and batch
MICROBATCHES = (1, 4, 8, 16)


def pipeline_model() -> nn.Sequential:
    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.ReLU()) for _ in range(BLOCKS)]
    return nn.Sequential(*blocks, nn.Linear(WIDTH, 10))


def batch(n: int, features: int, classes: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, features, generator=g), torch.randint(0, classes, (n,), generator=g)


class SavedBytes:
    """Bytes autograd keeps for backward right now, and the peak since `reset`."""

    def __init__(self):
        self.live = self.peak = 0

    def reset(self):
        self.peak = self.live

    def hooks(self):
        def pack(t):
            box = _Box(t)
            n = t.numel() * t.element_size()
            self.live += n
            self.peak = max(self.peak, self.live)
            weakref.finalize(box, self._free, n)
            return box

        return torch.autograd.graph.saved_tensors_hooks(pack, lambda box: box.t)

    def _free(self, n):
        self.live -= n


class _Box:
    __slots__ = ("__weakref__", "t")

    def __init__(self, t):
        self.t = t


# ---------------------------------------------------------------- pipeline
def pipeline_part(reps: int) -> dict:
    import shoal

    rt = shoal.init()
    loss_fn = nn.functional.cross_entropy
    x, y = batch(BATCH, WIDTH, 10)
    out = {"bubble": {}, "memory": {}}
    for m in MICROBATCHES:
        strategy = shoal.Pipeline(
            stages=2, microbatches=m, schedule="gpipe", split="params"
        )  # 1F1B needs M >= S; same bubble
        model = pipeline_model()
        model, opt = strategy.prepare(model, torch.optim.SGD(model.parameters(), lr=0.0))
        stage = strategy.stage_modules[0]
        first, last = rt.rank == 0, rt.rank == 1

        def step():
            model(x, y, loss_fn=loss_fn)
            opt.zero_grad()

        mb = BATCH // m
        inputs = [x[i * mb : (i + 1) * mb] if first else torch.randn(mb, WIDTH).requires_grad_() for i in range(m)]

        def alone():  # this rank's own compute for the same micro-batches, no partner
            for i in range(m):
                o = stage(inputs[i])
                (loss_fn(o, y[i * mb : (i + 1) * mb]) if last else o.sum()).backward()
            stage.zero_grad(set_to_none=True)

        step(), alone()  # warm up both
        steps, computes = [], []
        for _ in range(reps):
            steps.append(_harness.timed_steps(step, 3, dist.barrier) / 3)  # the step ends when the last rank is done
            computes.append(local_seconds(alone, 3) / 3)  # this rank only
        t, c = statistics.median(steps), statistics.median(computes)
        out["bubble"][str(m)] = {"step_s": t, "compute_s": c, "bubble": max(0.0, 1 - c / t), "theory": 1 / (m + 1)}
    for schedule in ("gpipe", "1f1b"):
        strategy = shoal.Pipeline(stages=2, microbatches=8, schedule=schedule, split="params")
        model = pipeline_model()
        model, opt = strategy.prepare(model, torch.optim.SGD(model.parameters(), lr=0.0))
        counter = SavedBytes()
        model(x, y, loss_fn=loss_fn)
        opt.zero_grad()
        counter.reset()
        with counter.hooks():
            model(x, y, loss_fn=loss_fn)
        opt.zero_grad()
        out["memory"][schedule] = {"peak_saved_bytes": counter.peak, "microbatches": 8}
    return out


def local_seconds(fn, n: int) -> float:
    """Seconds this rank spends in `n` calls of `fn`; ranks start together."""
    dist.barrier()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    seconds = time.perf_counter() - start
    dist.barrier()
    return seconds


# ----------------------------------------------------------------- sharded
def model_state_bytes(model: nn.Module, opt: torch.optim.Optimizer) -> dict:
    from torch.distributed.tensor import DTensor

    def size(t):
        t = t.to_local() if isinstance(t, DTensor) else t
        return t.numel() * t.element_size()

    params = sum(size(p) for p in model.parameters())
    grads = sum(size(p.grad) for p in model.parameters() if p.grad is not None)
    state = sum(size(v) for s in opt.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0)
    return {"parameters": params, "gradients": grads, "optimizer": state, "total": params + grads + state}


def sharded_part(steps: int, reps: int) -> dict:
    import shoal

    rt = shoal.init()
    widths = [1024, 2048, 2048, 10]
    x, y = batch(64, widths[0], widths[-1], seed=rt.rank)
    out = {}
    for name, make in (("data_parallel", shoal.DataParallel), ("sharded", shoal.ShardedDataParallel)):
        torch.manual_seed(0)
        layers = [nn.Linear(a, b) for a, b in itertools.pairwise(widths)]
        model = nn.Sequential(layers[0], nn.ReLU(), layers[1], nn.ReLU(), layers[2])
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        strategy = make()
        model, opt = strategy.prepare(model, opt)
        memory = {}

        def step(keep=False):
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            if keep:
                memory.update(model_state_bytes(model, opt))
            opt.zero_grad()

        step(keep=True)  # warm up; Adam's state exists from here on
        rates = [steps / _harness.timed_steps(step, steps, dist.barrier) for _ in range(reps)]
        out[name] = {
            "model_state_bytes": memory,
            "steps_per_s": statistics.median(rates),
            "parameters": sum(p.numel() for p in model.parameters()),
        }
    return out


# ----------------------------------------------------------- tensor parallel
def tp_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(512, 2048),
        nn.ReLU(),
        nn.Linear(2048, 512),
        nn.ReLU(),
        nn.Linear(512, 2048),
        nn.ReLU(),
        nn.Linear(2048, 10),
    )


def tp_part(steps: int, reps: int) -> dict:
    from torch.distributed.tensor import DTensor

    import shoal

    rt = shoal.init()
    x, y = batch(128, 512, 10)
    loss_fn = nn.functional.cross_entropy

    def run(model, opt, n):
        losses = []
        for _ in range(n):
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        return losses

    strategy = shoal.TensorParallel()
    model = tp_model()
    model, opt = strategy.prepare(model, torch.optim.SGD(model.parameters(), lr=0.05))
    tp_losses = run(model, opt, steps)
    tp_params = {
        n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone() for n, p in model.named_parameters()
    }
    tp_time = statistics.median(
        _harness.timed_steps(lambda: run(model, opt, 1), steps, dist.barrier) / steps for _ in range(reps)
    )
    out = {"tp_step_s": tp_time}
    dist.barrier()
    if rt.rank == 0:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            ref = tp_model()
            ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05)
            ref_losses = run(ref, ref_opt, steps)
            if threads == 1:
                out["max_loss_diff"] = max(abs(a - b) for a, b in zip(tp_losses, ref_losses, strict=True))
                out["max_param_diff"] = max(
                    float((tp_params[n] - p.detach()).abs().max()) for n, p in ref.named_parameters()
                )
                out["loss_first_last"] = [ref_losses[0], ref_losses[-1]]
            out[f"single_step_s_{threads}_threads"] = statistics.median(
                _harness.timed_steps(lambda: run(ref, ref_opt, 1), steps) / steps for _ in range(reps)
            )
        torch.set_num_threads(1)
    dist.barrier()
    out["plan"] = strategy.plan_used
    return out if rt.rank == 0 else {}


# ------------------------------------------------------------------- driver
def worker(part: str, args) -> None:
    import shoal

    result = {
        "pipeline": lambda: pipeline_part(args.reps),
        "sharded": lambda: sharded_part(args.sharded_steps, args.reps),
        "tp": lambda: tp_part(args.tp_steps, args.reps),
    }[part]()
    Path(f"{args.out}.rank{shoal.runtime.current().rank}").write_text(
        json.dumps(result)
    )  # files, not pickled collectives
    shoal.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--sharded-steps", type=int, default=10)
    parser.add_argument("--tp-steps", type=int, default=10)
    parser.add_argument("--parts", default="pipeline,sharded,tp")
    parser.add_argument("--name", default="model_parallel")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--part", default="")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    if args.worker:
        return worker(args.part, args)
    _harness.RESULTS.mkdir(exist_ok=True)
    tmp = _harness.RESULTS / f"{args.name}.part.tmp"
    raw = {}
    for part in args.parts.split(","):
        _harness.launch(
            __file__,
            2,
            [
                "--part",
                part,
                "--out",
                str(tmp),
                "--reps",
                str(args.reps),
                "--sharded-steps",
                str(args.sharded_steps),
                "--tp-steps",
                str(args.tp_steps),
            ],
        )
        raw[part] = {}
        for rank in range(2):
            path = Path(f"{tmp}.rank{rank}")
            raw[part][f"rank{rank}"] = json.loads(path.read_text())
            path.unlink()
    result, summary = report(raw)
    _harness.write(args.name, {"raw": raw, **result}, summary)


def report(raw: dict) -> tuple[dict, str]:
    out, parts = {}, []
    if "pipeline" in raw:
        p = raw["pipeline"]
        bubble = {
            m: {
                "measured": statistics.mean(p[r]["bubble"][m]["bubble"] for r in p),
                "theory": p["rank0"]["bubble"][m]["theory"],
                "per_rank": [p[r]["bubble"][m]["bubble"] for r in p],
                "step_s": p["rank0"]["bubble"][m]["step_s"],
            }
            for m in p["rank0"]["bubble"]
        }
        peak = {s: [p[r]["memory"][s]["peak_saved_bytes"] for r in p] for s in ("gpipe", "1f1b")}
        out["pipeline"] = {
            "bubble": bubble,
            "peak_saved_bytes": peak,
            "gpipe_over_1f1b": [g / f for g, f in zip(peak["gpipe"], peak["1f1b"], strict=True)],
        }
        parts.append(
            "bubble " + ", ".join(f"M={m} {b['measured']:.2f} (theory {b['theory']:.2f})" for m, b in bubble.items())
        )
        parts.append(f"activation peak GPipe/1F1B rank0 {out['pipeline']['gpipe_over_1f1b'][0]:.1f}x")
    if "sharded" in raw:
        s = raw["sharded"]["rank0"]
        ratio = s["sharded"]["model_state_bytes"]["total"] / s["data_parallel"]["model_state_bytes"]["total"]
        speed = s["sharded"]["steps_per_s"] / s["data_parallel"]["steps_per_s"]
        out["sharded"] = {"memory_ratio": ratio, "steps_per_s_ratio": speed}
        parts.append(f"sharded/DP model state {ratio:.2f}x, steps/s {speed:.2f}x")
    if "tp" in raw:
        t = raw["tp"]["rank0"]
        out["tp"] = {
            "max_param_diff": t["max_param_diff"],
            "max_loss_diff": t["max_loss_diff"],
            "step_time_ratio_vs_1_thread": t["tp_step_s"] / t["single_step_s_1_threads"],
            "step_time_ratio_vs_2_threads": t["tp_step_s"] / t["single_step_s_2_threads"],
        }
        parts.append(
            f"TP max param diff {t['max_param_diff']:.1e}, "
            f"step time TP/single {out['tp']['step_time_ratio_vs_1_thread']:.2f}x (1 thread), "
            f"{out['tp']['step_time_ratio_vs_2_threads']:.2f}x (2 threads)"
        )
    return out, "model parallel (2 ranks): " + "; ".join(parts)


if __name__ == "__main__":
    main()
