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
The loss function is not an option (it is code): give it to the strategy,
`Pipeline(..., loss_fn=f)`, or per call, `model(x, y, loss_fn=f)`.
In eval mode `model(x)` is a plain forward through the stages; in training
it is refused (one sentence), since the output lives on the last stage only.
Guarantee: gradients are the mean over micro-batches, so a step equals one
process with the whole batch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from shoal import runtime
from shoal.config import check_choice, check_range
from shoal.errors import ConfigError
from shoal.mesh import ParallelDims
from shoal.strategies.base import LossFn, MeshStrategy, StrategyOptions
from shoal.strategies.optimizer import PreparedOptimizer, prepare_optimizer, rebind_optimizer
from shoal.strategies.pipeline.p2p import recv_tensor, send_tensor
from shoal.strategies.pipeline.split import measure_block_times, parameter_counts, split_balanced

log = logging.getLogger(__name__)
SCHEDULES = ("gpipe", "1f1b", "interleaved")
SPLITS = ("auto", "params", "time")


class Chunk(nn.Module):
    """Some consecutive children of a Sequential, under their original names."""

    def __init__(self, children: dict[str, nn.Module]) -> None:
        super().__init__()
        for name, module in children.items():
            self.add_module(name, module)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for module in self.children():
            x = module(x)
        return x


@dataclass
class _Stages:
    """What `prepare` builds: the cut, and this rank's chunks of it."""

    chunks: list[list[str]]
    """Child names of every chunk, in model order."""
    imbalance: float
    held: list[int]
    """Indices of the chunks on this rank (chunk c sits on pipeline rank c mod stages)."""
    by_index: nn.ModuleDict
    """This rank's chunks by index, as the schedule runs them."""
    by_name: Chunk
    """This rank's blocks under the whole model's names (for checkpoints)."""
    schedule: Any = None
    """torch's schedule object, built at the first training step."""

    @property
    def modules(self) -> list[nn.Module]:
        return list(self.by_index.values())


class Pipeline(MeshStrategy):
    """Pipeline stages over ranks: `Pipeline(stages=2, microbatches=4, schedule="1f1b", dp=1, loss_fn=None)`."""

    name = "pipeline"

    @dataclass(frozen=True, kw_only=True, slots=True)
    class Options(StrategyOptions):
        stages: int = 2
        """Pipeline ranks (the pipeline degree)."""
        microbatches: int = 4
        schedule: str = "1f1b"
        stages_per_rank: int = 0
        """Model chunks per rank (0: 2 for "interleaved", else 1)."""
        split: list[str] | str = "auto"
        """"auto" (measured time, else parameters), "params", or the names of the children that start stages 2..S."""
        dp: int = 1

        def __post_init__(self) -> None:
            check_range(self.stages, "stages", low=2)
            check_range(self.microbatches, "microbatches", low=1)
            check_range(self.dp, "dp", low=1)
            check_choice(self.schedule, "schedule", SCHEDULES)
            if isinstance(self.split, str) and self.split not in SPLITS:
                raise ConfigError(
                    f"'split' must be 'auto', 'time', 'params' or a list of child names, not {self.split!r}", "split"
                )
            self._check_schedule()

        @property
        def chunks_per_rank(self) -> int:
            """`stages_per_rank`, with 0 resolved for the schedule."""
            return self.stages_per_rank or (2 if self.schedule == "interleaved" else 1)

        @property
        def chunks(self) -> int:
            """Model chunks in all: stages x chunks per rank."""
            return self.stages * self.chunks_per_rank

        def _check_schedule(self) -> None:
            """What each schedule needs of the micro-batches and the chunks per rank."""
            if self.schedule == "interleaved" and self.chunks_per_rank < 2:
                raise ConfigError("'stages_per_rank' must be >= 2 for the interleaved schedule", "stages_per_rank")
            if self.schedule != "interleaved" and self.chunks_per_rank != 1:
                raise ConfigError(
                    f"'stages_per_rank' > 1 needs schedule = 'interleaved', not {self.schedule!r}", "stages_per_rank"
                )
            if self.schedule == "1f1b" and self.microbatches < self.stages:
                raise ConfigError(
                    f"the 1f1b schedule needs 'microbatches' ({self.microbatches}) >= 'stages' ({self.stages}); "
                    "use more micro-batches or 'gpipe'",
                    "microbatches",
                )
            if self.schedule == "interleaved" and self.microbatches % self.stages:
                raise ConfigError(
                    f"the interleaved schedule needs 'microbatches' ({self.microbatches}) "
                    f"to be a multiple of 'stages' ({self.stages})",
                    "microbatches",
                )

    options: Options

    def __init__(self, options: Options | None = None, /, *, loss_fn: LossFn | None = None, **kwargs: Any) -> None:
        super().__init__(options, **kwargs)
        self.loss_fn: LossFn = loss_fn or nn.functional.cross_entropy
        """The loss `model(x, y)` computes on the last stage (per call: `model(x, y, loss_fn=f)`)."""
        self._stages: _Stages | None = None

    @property
    def stages(self) -> _Stages:
        if self._stages is None:
            raise self.not_prepared()
        return self._stages

    @property
    def stage_modules(self) -> list[nn.Module]:
        """This rank's chunks."""
        return self.stages.modules

    def prepare(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, *, example: tuple[Any, Any] | None = None
    ) -> tuple[nn.Module, PreparedOptimizer]:
        if not isinstance(model, nn.Sequential):
            raise ConfigError(
                "the pipeline strategy splits an nn.Sequential (a sequence of blocks); wrap your blocks in one",
                "strategy.name",
            )
        o, rt = self.options, runtime.current()
        self.dims = ParallelDims.for_world(rt.world_size, pp=o.stages, dp=o.dp)
        children = dict(model.named_children())
        if len(children) < o.chunks:
            raise ConfigError(
                f"the model has {len(children)} top-level blocks, fewer than the {o.chunks} pipeline chunks asked for",
                "strategy.stages",
            )
        model.to(rt.device)
        names = {id(p): n for n, p in model.named_parameters()}
        chunks, imbalance = self._cut(model, example)
        held = [c for c in range(o.chunks) if c % o.stages == self.dims.pp_rank]  # looped placement
        by_index = nn.ModuleDict({str(c): Chunk({n: children[n] for n in chunks[c]}) for c in held})
        by_name = Chunk({n: children[n] for c in held for n in chunks[c]})
        self._stages = _Stages(chunks, imbalance, held, by_index, by_name)
        rebind_optimizer(optimizer, names, dict(by_name.named_parameters()))
        self._params = [p for p in by_name.parameters() if p.requires_grad]
        return PipelinedModel(self, by_index), prepare_optimizer(optimizer, self)

    def _cut(self, model: nn.Sequential, example: tuple[Any, Any] | None) -> tuple[list[list[str]], float]:
        """The chunks (by the options' split) and their imbalance, max/mean cost; logged on rank 0."""
        split = self.options.split
        costs, how = self._costs(model, example)
        chunks = split_balanced(list(costs), costs, self.options.chunks, split if isinstance(split, list) else None)
        sums = [sum(costs[n] for n in chunk) for chunk in chunks]
        imbalance = max(sums) / (sum(sums) / len(sums))
        if runtime.current().is_main:
            shown = [f"{c[0]}..{c[-1]}" for c in chunks]
            log.info(
                "pipeline split by %s into %d chunks: %s (imbalance max/mean %.3f)", how, len(chunks), shown, imbalance
            )
        return chunks, imbalance

    def _costs(self, model: nn.Sequential, example: tuple[Any, Any] | None) -> tuple[dict[str, float], str]:
        mode = self.options.split if isinstance(self.options.split, str) else "params"
        if mode in ("auto", "time") and example is not None:
            times = measure_block_times(model, example[0])
            # Timings differ from rank to rank: every rank must cut at the same places.
            summed = torch.tensor(list(times.values()), dtype=torch.float64)
            if dist.is_initialized():
                dist.all_reduce(summed)
            return dict(zip(times, summed.tolist(), strict=True)), "measured forward+backward time"
        if mode == "time":
            raise ConfigError(
                "split = 'time' needs an example batch: prepare(model, optimizer, example=(x, y))", "split"
            )
        return parameter_counts(model), "parameter count"

    # ------------------------------------------------------------ training
    def _build_schedule(self, loss_fn: LossFn) -> Any:
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

        o, s = self.options, self.stages
        device, group = runtime.current().device, self.mesh.group("pp")
        stages: list[Any] = [PipelineStage(s.by_index[str(c)], c, o.chunks, device, group=group) for c in s.held]
        if o.schedule == "interleaved":
            return ScheduleInterleaved1F1B(stages, n_microbatches=o.microbatches, loss_fn=loss_fn)
        cls = ScheduleGPipe if o.schedule == "gpipe" else Schedule1F1B
        return cls(stages[0], n_microbatches=o.microbatches, loss_fn=loss_fn)

    def run_schedule(self, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn) -> torch.Tensor:
        """Forward and backward of every micro-batch; the mean loss, on every pipeline rank."""
        o, s = self.options, self.stages
        if len(x) % o.microbatches:
            raise ConfigError(
                f"the per-rank batch ({len(x)}) must be a multiple of 'microbatches' ({o.microbatches})",
                "data.batch_size",
            )
        if s.schedule is None:
            s.schedule = self._build_schedule(loss_fn)
        first, last = 0 in s.held, o.chunks - 1 in s.held
        losses: list[torch.Tensor] = []
        args = (x,) if first else ()
        s.schedule.step(*args, target=y if last else None, losses=losses if last else None)
        loss = torch.stack([v.detach() for v in losses]).mean().reshape(1) if last else torch.zeros(1, device=x.device)
        group = self.mesh.group("pp")
        dist.broadcast(loss, src=dist.get_global_rank(group, (o.chunks - 1) % o.stages), group=group)
        return loss[0]

    def compute_loss(self, model: nn.Module, loss_fn: LossFn, x: Any, y: torch.Tensor) -> torch.Tensor:
        return model(x, y, loss_fn=loss_fn)

    # ------------------------------------------------------------ evaluation
    @torch.no_grad()
    def forward_through(self, x: torch.Tensor) -> torch.Tensor | None:
        """A plain forward, chunk by chunk over the pipeline ranks; the output on the last stage's rank."""
        o, s = self.options, self.stages
        group = self.mesh.group("pp")
        h = x
        for c in s.held:
            if c > 0:
                h = recv_tensor(dist.get_global_rank(group, (c - 1) % o.stages), group, x.device)
            h = s.by_index[str(c)](h)
            if c < o.chunks - 1:
                send_tensor(h, dist.get_global_rank(group, (c + 1) % o.stages), group)
        return h if o.chunks - 1 in s.held else None

    def reduce_eval_totals(self, totals: torch.Tensor) -> None:
        if dist.is_initialized():
            dist.all_reduce(totals)  # only last stages hold totals: one per data-parallel shard

    def unwrap(self, model: nn.Module) -> nn.Module:
        """This rank's blocks under the whole model's names (for checkpoints)."""
        return self.stages.by_name


class PipelinedModel(nn.Module):
    """What `prepare` returns: `model(x, y)` trains through the schedule, `model(x)` in eval mode predicts."""

    def __init__(self, strategy: Pipeline, chunks: nn.ModuleDict) -> None:
        super().__init__()
        self.strategy = strategy
        self.stages = chunks

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None, loss_fn: LossFn | None = None) -> Any:
        s = self.strategy
        if self.training and torch.is_grad_enabled() and y is not None:
            loss = s.run_schedule(x, y, loss_fn or s.loss_fn)
            return loss.detach().requires_grad_()  # backward already ran inside the schedule
        if self.training and torch.is_grad_enabled():
            # `loss_fn(model(x), y)` cannot work: the output exists only on the last
            # stage and backward must run in the schedule.
            raise ConfigError(
                "a pipelined model trains through its schedule: write `loss = model(x, y)` (the loss is computed "
                "on the last stage), or call model.eval() / torch.no_grad() to predict with model(x)",
                "strategy.name",
            )
        return s.forward_through(x)
