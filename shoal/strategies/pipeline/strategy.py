"""Pipeline parallelism on `torch.distributed.pipelining`.

The model is cut into contiguous chunks of blocks: an `nn.Sequential`'s
children, or for any other module its top-level children holding
parameters (a ModuleList's entries each a block), split by torch's tracing
frontend (`shoal.strategies.pipeline.trace`). The cut balances measured
forward+backward time (a Sequential, given an example batch) or parameter
counts, or falls at block names you give. Parameter names, optimizer state
and checkpoints are those of the whole model in every layout. Schedules are
torch's own: GPipe, 1F1B and interleaved 1F1B (several chunks per rank).

The prepared model hides the schedule: in training, `model(x, y)` runs the
whole schedule (forward and backward of all micro-batches) and returns the
mean loss on every rank; `loss.backward()` is then a no-op and
`optimizer.step()` applies (after averaging over data-parallel replicas).
The loss function is not an option (it is code): give it to the strategy,
`Pipeline(..., loss_fn=f)`, or per call, `model(x, y, loss_fn=f)`.
In eval mode (or under `torch.no_grad()`) `model(x)` is a plain forward
through the stages whose output every rank receives, so a script's own
test loop runs unchanged; in training it is refused (one sentence), since
backward must run inside the schedule.
Guarantee: gradients are the mean over micro-batches, so a step equals one
process with the whole batch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, overload

import torch
import torch.distributed as dist
from torch import nn

from shoal import runtime
from shoal.config import check_choice, check_range
from shoal.errors import ConfigError
from shoal.mesh import ParallelDims
from shoal.strategies.base import LossFn, StepOptions
from shoal.strategies.mesh_strategy import MeshStrategy
from shoal.strategies.optimizer import PreparedOptimizer, rebind_optimizer
from shoal.strategies.pickling import refuse_pickling
from shoal.strategies.pipeline import state, trace
from shoal.strategies.pipeline.model import Chunk, PipelinedModel, Runner, Stages, shell
from shoal.strategies.pipeline.p2p import broadcast_tensor, recv_tensor, send_tensor
from shoal.strategies.pipeline.split import measure_block_times, parameter_counts, split_balanced

log = logging.getLogger(__name__)
SCHEDULES = ("gpipe", "1f1b", "interleaved")
SPLITS = ("auto", "params", "time")


class Pipeline(MeshStrategy):
    """Pipeline stages over ranks:
    `Pipeline(stages=2, microbatches=4, schedule="1f1b", dp=1, grad_accum=1, clip_norm=None, loss_fn=None)`."""

    name = "pipeline"

    @dataclass(frozen=True, kw_only=True, slots=True)
    class Options(StepOptions):
        stages: int = 2
        """Pipeline ranks (the pipeline degree)."""
        microbatches: int = 4
        schedule: str = "1f1b"
        stages_per_rank: int = 0
        """Model chunks per rank (0: 2 for "interleaved", else 1)."""
        split: list[str] | str = "auto"
        """"auto" (measured time, else parameters), "params", or the names of the blocks that start stages 2..S."""
        dp: int = 1

        def __post_init__(self) -> None:
            StepOptions.__post_init__(self)  # grad_accum; clip_norm clips all stages together
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
        self._stages: Stages | None = None
        self._source_names: dict[int, str] = {}
        """id(parameter) -> name in the model given to `prepare` (to rebind an optimizer made before)."""
        self.all_names: list[str] = []
        """The whole model's parameter names, in its order."""
        self._loss: LossFn = self.loss_fn
        self._batch_checks_left = 2
        """Training steps whose batch is compared over the pipeline's ranks."""

    @property
    def stages(self) -> Stages:
        if self._stages is None:
            raise self.not_prepared()
        return self._stages

    @property
    def stage_modules(self) -> list[nn.Module]:
        """This rank's chunks (of a Sequential; a traced model's exist once traced)."""
        runner = next(iter(self.stages.runners.values()), None)
        return list(runner.by_index.values()) if runner else []

    @property
    def grad_accum(self) -> int:
        return self.options.grad_accum

    @property
    def clip_norm(self) -> float | None:
        return self.options.clip_norm

    @overload
    def prepare(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, *, example: tuple[Any, Any] | None = None
    ) -> tuple[nn.Module, PreparedOptimizer]: ...

    @overload
    def prepare(
        self, model: nn.Module, optimizer: None = None, *, example: tuple[Any, Any] | None = None
    ) -> tuple[nn.Module, None]: ...

    def prepare(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        example: tuple[Any, Any] | None = None,
    ) -> tuple[nn.Module, PreparedOptimizer | None]:
        """Cut the model into stages and keep this rank's; the optimizer (if given) follows them."""
        o, rt = self.options, runtime.current()
        self.dims = ParallelDims.for_world(rt.world_size, pp=o.stages, dp=o.dp)
        sequential = isinstance(model, nn.Sequential)
        if not sequential:
            trace.check_traceable(model)
        blocks = dict(model.named_children()) if sequential else trace.units(model)
        if len(blocks) < o.chunks:
            what = "top-level blocks" if sequential else "blocks with parameters"
            raise ConfigError(
                f"the model has {len(blocks)} {what}, fewer than the {o.chunks} pipeline chunks asked for",
                "strategy.stages",
            )
        model.to(rt.device)
        self._source_names = {id(p): n for n, p in model.named_parameters()}
        self.all_names = list(self._source_names.values())
        chunks, imbalance = self._cut(model, blocks, example)
        held = [c for c in range(o.chunks) if c % o.stages == self.dims.pp_rank]  # looped placement
        if sequential:
            by_index = nn.ModuleDict({str(c): Chunk({n: blocks[n] for n in chunks[c]}) for c in held})
            by_name: nn.Module = Chunk({n: blocks[n] for c in held for n in chunks[c]})
            self._stages = Stages(chunks, imbalance, held, by_name, runners={None: Runner(by_index)})
        else:
            owners = trace.owner_names(model, chunks)
            units = [n for c in held for n in chunks[c]]
            loose = trace.loose_state(model, chunks) if 0 in held else []
            by_name = shell(model, units + loose)
            self._stages = Stages(chunks, imbalance, held, by_name, source=model, owners=owners)
            if example is not None:  # trace now: a model torch cannot split stops at prepare
                self._runner(True, example[0][: max(1, len(example[0]) // o.microbatches)])
        # The optimizer may be made on the whole model before prepare (it is pointed at this
        # stage's parameters) or on model.parameters() after it; one made before and not given
        # to prepare is stopped at its step() (finish_prepare's guard).
        prepared = PipelinedModel(self, by_name)
        refuse_pickling(prepared, "each rank holds one stage of it")
        return self.finish_prepare(prepared, optimizer, replaced=list(model.parameters()))

    def prepare_optimizer(self, optimizer: torch.optim.Optimizer) -> PreparedOptimizer:
        """The optimizer, made on this stage's parameters (`model.parameters()` after `prepare`) or on the
        whole model before it (then pointed at this stage's parameters)."""
        held = dict(self.stages.by_name.named_parameters())
        mine = {id(p) for p in held.values()}
        if any(id(p) not in mine for g in optimizer.param_groups for p in g["params"]):
            rebind_optimizer(optimizer, self._source_names, held)
        return super().prepare_optimizer(optimizer)

    def _cut(
        self, model: nn.Module, blocks: dict[str, nn.Module], example: tuple[Any, Any] | None
    ) -> tuple[list[list[str]], float]:
        """The chunks (by the options' split) and their imbalance, max/mean cost; logged on rank 0."""
        split = self.options.split
        costs, how = self._costs(model, blocks, example)
        starts = split if isinstance(split, list) else None
        chunks = split_balanced(list(costs), costs, self.options.chunks, starts)
        sums = [sum(costs[n] for n in chunk) for chunk in chunks]
        imbalance = max(sums) / (sum(sums) / len(sums))
        if runtime.current().is_main:
            shown = [f"{c[0]}..{c[-1]}" for c in chunks]
            log.info(
                "pipeline split by %s into %d chunks: %s (imbalance max/mean %.3f)", how, len(chunks), shown, imbalance
            )
        return chunks, imbalance

    def _costs(
        self, model: nn.Module, blocks: dict[str, nn.Module], example: tuple[Any, Any] | None
    ) -> tuple[dict[str, float], str]:
        mode = self.options.split if isinstance(self.options.split, str) else "params"
        if not isinstance(model, nn.Sequential):
            if mode == "time":
                raise ConfigError(
                    f"split = 'time' measures the blocks of an nn.Sequential and {type(model).__name__} is not one; "
                    "use split = 'params' or the names of the modules where stages start",
                    "split",
                )
            return parameter_counts(blocks), "parameter count"
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
        return parameter_counts(blocks), "parameter count"

    def _runner(self, training: bool, example: torch.Tensor) -> Runner:
        """This rank's stage modules for inputs like `example` in that mode (traced on first use)."""
        s = self.stages
        if s.source is None:
            return s.runners[None]
        key = (training, tuple(example.shape), example.dtype)
        if key not in s.runners:
            modules = trace.trace_stages(s.source, [c[0] for c in s.chunks[1:]], example, training)
            trace.check_owners(s.source, modules, s.owners)
            s.runners[key] = Runner(nn.ModuleDict({str(c): modules[c] for c in s.held}))
        return s.runners[key]

    # ------------------------------------------------------------ training
    def _build_schedule(self, runner: Runner) -> Any:
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

        o, s = self.options, self.stages
        device, group = runtime.current().device, self.mesh.group("pp")
        stages: list[Any] = [PipelineStage(runner.by_index[str(c)], c, o.chunks, device, group=group) for c in s.held]
        # The loss is divided by the micro-batches, not the gradients afterwards (torch's
        # scale_grads): the gradients of earlier calls, still accumulating, stay as they are.
        loss, m = self._mean_loss, o.microbatches
        if o.schedule == "interleaved":
            return ScheduleInterleaved1F1B(stages, n_microbatches=m, loss_fn=loss, scale_grads=False)
        cls = ScheduleGPipe if o.schedule == "gpipe" else Schedule1F1B
        return cls(stages[0], n_microbatches=m, loss_fn=loss, scale_grads=False)

    def _mean_loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One micro-batch's share of the mean loss."""
        return self._loss(out, y) / self.options.microbatches

    def run_schedule(self, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn) -> torch.Tensor:
        """Forward and backward of every micro-batch; the mean loss, on every pipeline rank."""
        o, s = self.options, self.stages
        if len(x) % o.microbatches:
            raise ConfigError(
                f"the per-rank batch ({len(x)}) must be a multiple of 'microbatches' ({o.microbatches})",
                "data.batch_size",
            )
        if self._batch_checks_left > 0:  # the first steps: every stage must hold the same (x, y)
            self._batch_checks_left -= 1
            self.check_same_batch([x, y], "pp")
        runner = self._runner(True, x[: len(x) // o.microbatches])
        if runner.schedule is None:
            runner.schedule = self._build_schedule(runner)
        self._loss = loss_fn
        first, last = 0 in s.held, o.chunks - 1 in s.held
        losses: list[torch.Tensor] = []
        args = (x,) if first else ()
        runner.schedule.step(*args, target=y if last else None, losses=losses if last else None)
        loss = torch.stack([v.detach() for v in losses]).sum().reshape(1) if last else torch.zeros(1, device=x.device)
        dist.broadcast(loss, src=self._last_rank(), group=self.mesh.group("pp"))
        return loss[0]

    def compute_loss(self, model: nn.Module, loss_fn: LossFn, x: Any, y: torch.Tensor) -> torch.Tensor:
        return model(x, y, loss_fn=loss_fn)

    def _last_rank(self) -> int:
        """The global rank holding the last chunk of this rank's pipeline."""
        return dist.get_global_rank(self.mesh.group("pp"), (self.options.chunks - 1) % self.options.stages)

    # ------------------------------------------------------------ gradients
    def clip_gradients(self, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        """The norm over every stage (each rank's part, combined over the pipeline group), as one
        process clipping the whole model; torch's `clip_grad_norm_` would see this stage only."""
        grads = [p.grad for p in self._params if p.grad is not None]
        local = torch.nn.utils.get_total_norm(grads, norm_type).to(runtime.current().device, torch.float64)
        group = self.mesh.group("pp")
        if norm_type == float("inf"):
            dist.all_reduce(local, op=dist.ReduceOp.MAX, group=group)
            total = local
        else:
            total = local.pow(norm_type)
            dist.all_reduce(total, group=group)
            total = total.pow(1.0 / norm_type)
        torch.nn.utils.clip_grads_with_norm_(self._params, max_norm, total.float())
        return total.float()

    # ------------------------------------------------------------ evaluation
    @torch.no_grad()
    def predict(self, x: torch.Tensor, training: bool = False) -> torch.Tensor | None:
        """A plain forward, chunk by chunk over the pipeline ranks; the output on every pipeline rank."""
        if len(x) == 0:
            return None  # every rank of a pipeline has the same (empty) batch
        o, s = self.options, self.stages
        runner = self._runner(training, x)
        group = self.mesh.group("pp")
        h = x
        for c in s.held:
            if c > 0:
                h = recv_tensor(dist.get_global_rank(group, (c - 1) % o.stages), group, x.device)
            h = runner.by_index[str(c)](h)
            if c < o.chunks - 1:
                send_tensor(h, dist.get_global_rank(group, (c + 1) % o.stages), group)
        out = h if o.chunks - 1 in s.held else None
        return broadcast_tensor(out, self._last_rank(), group, x.device)

    def unwrap(self, model: nn.Module) -> nn.Module:
        """This rank's blocks under the whole model's names (for checkpoints)."""
        return self.stages.by_name

    # ------------------------------------------------------------ state
    def full_state_dict(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any]:
        """The whole model's (and optimizer's) state on every rank, under the plain model's names (collective)."""
        return state.gather(self, optimizer)

    def load_full_state_dict(
        self, model: nn.Module, full: dict[str, Any], optimizer: torch.optim.Optimizer | None = None
    ) -> None:
        """Put a `full_state_dict` (from any layout) into this rank's stage and its optimizer."""
        state.scatter(self, full, optimizer)

    def state_dict(self) -> dict[str, Any]:
        return {"micro": self._micro}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._micro = int(state.get("micro", 0))
