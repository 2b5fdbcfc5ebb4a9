"""Pipeline parallelism on `torch.distributed.pipelining`.

The model, an `nn.Sequential`, is cut into contiguous chunks of children,
balanced by measured forward+backward time (when `prepare` is given an
example batch) or by parameter count, or at module names you give. Each
chunk keeps its children's names, so parameter names, optimizer state and
checkpoints are those of the whole model in every layout. Schedules are
torch's own: GPipe, 1F1B and interleaved 1F1B (several chunks per rank).

The prepared model hides the schedule: in training, `model(x, y)` runs the
whole schedule (forward and backward of all micro-batches) and returns the
mean loss on every rank; `loss.backward()` is then a no-op and
`optimizer.step()` applies (after averaging over data-parallel replicas).
In eval mode `model(x)` is a plain forward through the stages; in training
it is refused (one sentence), since the output lives on the last stage only. Guarantee:
gradients are the mean over micro-batches, so a step equals one process
with the whole batch.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.distributed as dist
from torch import nn

from shoal import runtime
from shoal.config import check_choice, check_range
from shoal.errors import ConfigError
from shoal.mesh import ParallelDims
from shoal.strategies.base import MeshStrategy, all_reduce_mean_grads, rebind_optimizer, wrap_optimizer

log = logging.getLogger(__name__)
SCHEDULES = ("gpipe", "1f1b", "interleaved")


@dataclass
class Pipeline(MeshStrategy):
    stages: int = 2
    """Pipeline ranks (the pipeline degree)."""
    microbatches: int = 4
    schedule: str = "1f1b"
    stages_per_rank: int = 0
    """Model chunks per rank (0: 2 for "interleaved", else 1)."""
    split: list[str] | str = "auto"
    """"auto" (measured time, else parameters), "params", or the names of the children that start stages 2..S."""
    dp: int = 1

    name: ClassVar[str] = "pipeline"

    def __post_init__(self):
        check_range(self.stages, "stages", low=2)
        check_range(self.microbatches, "microbatches", low=1)
        check_range(self.dp, "dp", low=1)
        check_choice(self.schedule, "schedule", SCHEDULES)
        if self.stages_per_rank == 0:
            self.stages_per_rank = 2 if self.schedule == "interleaved" else 1
        if self.schedule == "interleaved" and self.stages_per_rank < 2:
            raise ConfigError("'stages_per_rank' must be >= 2 for the interleaved schedule", "stages_per_rank")
        if self.schedule != "interleaved" and self.stages_per_rank != 1:
            raise ConfigError(
                f"'stages_per_rank' > 1 needs schedule = 'interleaved', not {self.schedule!r}", "stages_per_rank"
            )
        if self.schedule == "1f1b" and self.microbatches < self.stages:
            raise ConfigError(
                f"the 1f1b schedule needs 'microbatches' ({self.microbatches}) >= 'stages' ({self.stages}); use more micro-batches or 'gpipe'",
                "microbatches",
            )
        if self.schedule == "interleaved" and self.microbatches % self.stages:
            raise ConfigError(
                f"the interleaved schedule needs 'microbatches' ({self.microbatches}) to be a multiple of 'stages' ({self.stages})",
                "microbatches",
            )
        if isinstance(self.split, str) and self.split not in ("auto", "params", "time"):
            raise ConfigError(
                f"'split' must be 'auto', 'time', 'params' or a list of child names, not {self.split!r}", "split"
            )
        self.dims: ParallelDims | None = None
        self.chunks: list[list[str]] = []

    def prepare(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, example=None, loss_fn: Callable | None = None
    ):
        rt = runtime.current()
        if not isinstance(model, nn.Sequential):
            raise ConfigError(
                "the pipeline strategy splits an nn.Sequential (a sequence of blocks); wrap your blocks in one",
                "strategy.name",
            )
        self.dims = ParallelDims.for_world(rt.world_size, pp=self.stages, dp=self.dp)
        total = self.stages * self.stages_per_rank
        children = list(model.named_children())
        if len(children) < total:
            raise ConfigError(
                f"the model has {len(children)} top-level blocks, fewer than the {total} pipeline chunks asked for",
                "strategy.stages",
            )
        model.to(rt.device)
        costs, how = self._costs(model, example)
        self.chunks = split_balanced(
            [n for n, _ in children], costs, total, self.split if isinstance(self.split, list) else None
        )
        sums = [sum(costs[n] for n in chunk) for chunk in self.chunks]
        self.imbalance = max(sums) / (sum(sums) / len(sums))
        if rt.is_main:
            log.warning(
                "pipeline split by %s into %d chunks: %s (imbalance max/mean %.3f)",
                how,
                total,
                [f"{c[0]}..{c[-1]}" for c in self.chunks],
                self.imbalance,
            )

        names = {id(p): n for n, p in model.named_parameters()}
        mine = [c for c in range(total) if c % self.stages == self.dims.pp_rank]  # looped placement
        modules = dict(children)
        self.stage_modules = [Chunk({n: modules[n] for n in self.chunks[c]}) for c in mine]
        self.holder = nn.ModuleDict({str(c): m for c, m in zip(mine, self.stage_modules)})
        self.local = Chunk({n: m for chunk in self.stage_modules for n, m in chunk.named_children()})  # original names
        rebind_optimizer(optimizer, names, {n: p for m in self.stage_modules for n, p in m.named_parameters()})
        self._mine, self._total = mine, total
        self._loss_fn = loss_fn
        self._schedule = None
        self._params = [p for m in self.stage_modules for p in m.parameters() if p.requires_grad]
        wrapped = PipelinedModel(self)
        return wrapped, wrap_optimizer(optimizer, self._step)

    def _costs(self, model: nn.Sequential, example) -> tuple[dict[str, float], str]:
        mode = self.split if isinstance(self.split, str) else "params"
        if mode in ("auto", "time") and example is not None:
            times = measure_block_times(model, example[0])
            # Timings differ from rank to rank: every rank must cut at the same places.
            summed = torch.tensor(list(times.values()), dtype=torch.float64)
            if dist.is_initialized():
                dist.all_reduce(summed)
            return dict(zip(times, summed.tolist())), "measured forward+backward time"
        if mode == "time":
            raise ConfigError(
                "split = 'time' needs an example batch: prepare(model, optimizer, example=(x, y))", "split"
            )
        return {
            n: float(sum(p.numel() for p in m.parameters())) or 1.0 for n, m in model.named_children()
        }, "parameter count"

    # ------------------------------------------------------------ training
    def _build_schedule(self, loss_fn: Callable):
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

        rt = runtime.current()
        group = self.dims.group("pp")
        stages = [
            PipelineStage(m, c, self._total, rt.device, group=group) for c, m in zip(self._mine, self.stage_modules)
        ]
        if self.schedule == "interleaved":
            return ScheduleInterleaved1F1B(stages, n_microbatches=self.microbatches, loss_fn=loss_fn)
        cls = ScheduleGPipe if self.schedule == "gpipe" else Schedule1F1B
        return cls(stages[0], n_microbatches=self.microbatches, loss_fn=loss_fn)

    def run_schedule(self, x: torch.Tensor, y: torch.Tensor, loss_fn: Callable) -> torch.Tensor:
        if len(x) % self.microbatches:
            raise ConfigError(
                f"the per-rank batch ({len(x)}) must be a multiple of 'microbatches' ({self.microbatches})",
                "data.batch_size",
            )
        if self._schedule is None:
            self._schedule = self._build_schedule(loss_fn)
        first, last = 0 in self._mine, self._total - 1 in self._mine
        losses: list[torch.Tensor] = []
        args = (x,) if first else ()
        self._schedule.step(*args, target=y if last else None, losses=losses if last else None)
        loss = torch.stack([l.detach() for l in losses]).mean().reshape(1) if last else torch.zeros(1, device=x.device)
        dist.broadcast(loss, src=self._last_rank(), group=self.dims.group("pp"))
        return loss[0]

    def _last_rank(self) -> int:
        return dist.get_global_rank(self.dims.group("pp"), (self._total - 1) % self.stages)

    def train_step(self, model, optimizer, loss_fn, batch):
        x, y = batch
        loss = model(x, y, loss_fn=loss_fn)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return loss.detach()

    def _step(self, original_step, closure=None):
        if self.dims.dp > 1:
            all_reduce_mean_grads(self._params, self.dims.group("dp"), self.dims.dp)
        return original_step(closure)

    # ------------------------------------------------------------ evaluation
    @torch.no_grad()
    def forward_through(self, x: torch.Tensor) -> torch.Tensor | None:
        """A plain forward, chunk by chunk over the pipeline ranks; the output on the last stage's rank."""
        group = self.dims.group("pp")
        h = x
        for c in range(self._total):
            if c in self._mine:
                if c > 0:
                    h = recv_tensor(dist.get_global_rank(group, (c - 1) % self.stages), group, x.device)
                h = self.holder[str(c)](h)
                if c < self._total - 1:
                    send_tensor(h, dist.get_global_rank(group, (c + 1) % self.stages), group)
        return h if self._total - 1 in self._mine else None

    @torch.no_grad()
    def evaluate(self, model, dataset, loss_fn, batch_size: int = 512):
        from shoal.data.loader import eval_shard, fetch

        rt = runtime.current()
        idx = eval_shard(len(dataset), self.data_rank, self.data_world)
        totals = torch.zeros(3, dtype=torch.float64)
        for m in self.stage_modules:
            m.eval()
        for start in range(0, len(idx), batch_size):
            x, y = fetch(dataset, idx[start : start + batch_size], rt.device)
            out = self.forward_through(x)
            if out is not None:
                totals += self.eval_totals(out, y, loss_fn)
        for m in self.stage_modules:
            m.train()
        dist.all_reduce(totals)  # only last stages hold totals: one per data-parallel shard
        return {"eval_loss": totals[0].item() / totals[2].item(), "eval_accuracy": totals[1].item() / totals[2].item()}

    def unwrap(self, model: nn.Module) -> nn.Module:
        """This rank's blocks under the whole model's names (for checkpoints)."""
        return self.local


class Chunk(nn.Module):
    """Some consecutive children of a Sequential, under their original names."""

    def __init__(self, children: dict[str, nn.Module]):
        super().__init__()
        for name, module in children.items():
            self.add_module(name, module)

    def forward(self, x):
        for module in self.children():
            x = module(x)
        return x


class PipelinedModel(nn.Module):
    """What `prepare` returns: `model(x, y)` trains through the schedule, `model(x)` in eval mode predicts."""

    def __init__(self, strategy: Pipeline):
        super().__init__()
        self.strategy = strategy
        self.stages = strategy.holder

    def forward(self, x, y=None, loss_fn: Callable | None = None):
        s = self.strategy
        if self.training and torch.is_grad_enabled() and y is not None:
            loss = s.run_schedule(x, y, loss_fn or s._loss_fn or nn.functional.cross_entropy)
            return loss.detach().requires_grad_()  # backward already ran inside the schedule
        if self.training and torch.is_grad_enabled():
            # `loss_fn(model(x), y)` cannot work: the output exists only on the last stage and backward must run in the schedule.
            raise ConfigError(
                "a pipelined model trains through its schedule: write `loss = model(x, y)` (the loss is computed on the last stage), or call model.eval() / torch.no_grad() to predict with model(x)",
                "strategy.name",
            )
        return s.forward_through(x)


def measure_block_times(model: nn.Sequential, x: torch.Tensor, repeats: int = 3) -> dict[str, float]:
    """Forward+backward seconds of each child on an example input (median of `repeats`)."""
    times: dict[str, list[float]] = {}
    for _ in range(repeats):
        h = x
        for name, module in model.named_children():
            inp = h.detach().requires_grad_(h.is_floating_point())
            start = time.perf_counter()
            out = module(inp)
            out.float().sum().backward()
            times.setdefault(name, []).append(time.perf_counter() - start)
            h = out.detach()
    model.zero_grad(set_to_none=True)
    return {n: sorted(t)[len(t) // 2] for n, t in times.items()}


def split_balanced(
    names: list[str], costs: dict[str, float], parts: int, starts: list[str] | None = None
) -> list[list[str]]:
    """Contiguous chunks minimizing the largest chunk's cost (or starting at the given names)."""
    if starts is not None:
        unknown = [s for s in starts if s not in names]
        if unknown or len(starts) != parts - 1:
            raise ConfigError(
                f"'split' must name {parts - 1} children of the model where stages 2..{parts} start; got {starts} (children: {names})",
                "split",
            )
        cuts = [0] + sorted(names.index(s) for s in starts) + [len(names)]
        return [names[a:b] for a, b in zip(cuts, cuts[1:])]
    n = len(names)
    prefix = [0.0]
    for name in names:
        prefix.append(prefix[-1] + costs[name])
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(parts + 1)]  # best[k][i]: first i blocks in k chunks
    cut = [[0] * (n + 1) for _ in range(parts + 1)]
    best[0][0] = 0.0
    for k in range(1, parts + 1):
        for i in range(k, n - (parts - k) + 1):
            for j in range(k - 1, i):
                value = max(best[k - 1][j], prefix[i] - prefix[j])
                if value < best[k][i]:
                    best[k][i], cut[k][i] = value, j
    bounds, i = [], n
    for k in range(parts, 0, -1):
        bounds.append((cut[k][i], i))
        i = cut[k][i]
    return [names[a:b] for a, b in reversed(bounds)]


_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64]


def send_tensor(t: torch.Tensor, dst: int, group) -> None:
    header = torch.tensor([_DTYPES.index(t.dtype), t.dim(), *t.shape], dtype=torch.int64, device=t.device)
    dist.send(torch.tensor([len(header)], dtype=torch.int64, device=t.device), dst, group=group)
    dist.send(header, dst, group=group)
    dist.send(t.contiguous(), dst, group=group)


def recv_tensor(src: int, group, device) -> torch.Tensor:
    size = torch.zeros(1, dtype=torch.int64, device=device)
    dist.recv(size, src, group=group)
    header = torch.zeros(int(size), dtype=torch.int64, device=device)
    dist.recv(header, src, group=group)
    dtype, ndim = _DTYPES[int(header[0])], int(header[1])
    out = torch.empty([int(d) for d in header[2 : 2 + ndim]], dtype=dtype, device=device)
    dist.recv(out, src, group=group)
    return out
