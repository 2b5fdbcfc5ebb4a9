"""Synchronous data parallelism on `DistributedDataParallel`.

Guarantee: with the same seed, N ranks with batch b take exactly the steps of
one process with batch N*b (the loader hands out slices of the same global
batch, DDP averages gradients). Gradient accumulation over k calls of
`optimizer.step()` all-reduces once and applies the mean of the k micro
batches, so it equals one step with the k-times batch; clipping is applied to
the averaged gradient, as the single process with the combined batch would.
`synchronize()` finishes that averaging before `step()`, so a user who clips
by hand gets the same.

`compression` (see `shoal.compress`) swaps DDP's all-reduce for a comm hook
that compresses each bucket. The hook runs only on the synchronizing
micro-step, so an accumulated gradient is compressed once; clipping then
applies to the decoded, averaged gradient. A non-finite averaged gradient
(fp16 overflow, a NaN loss) is never applied: the step is skipped, counted in
`skipped_steps` and logged, as mixed-precision training does. Error-feedback
residuals are this rank's own tensors in `state_dict()` (under
`compression/...`), which the checkpoint keeps per rank.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: N817  (torch's own abbreviation)

from shoal import runtime
from shoal.compress import Compressor, ErrorFeedback, parse
from shoal.config import check_range
from shoal.errors import ConfigError
from shoal.state import sub_state, with_prefix
from shoal.strategies.base import Strategy, StrategyOptions
from shoal.strategies.optimizer import Closure, PreparedOptimizer, prepare_optimizer

if TYPE_CHECKING:
    from shoal.compress.ddp_hooks import CompressionHook

log = logging.getLogger(__name__)

SPARSE = ("topk", "randomk")
COMPRESSION = "compression/"


def sgd_momentum(optimizer: torch.optim.Optimizer) -> float:
    """The momentum to apply before sparsifying (DGC momentum correction), or
    0 where it does not apply: only plain SGD (no Nesterov, no dampening) with
    one momentum value > 0 in every group."""
    if not isinstance(optimizer, torch.optim.SGD):
        return 0.0
    groups = optimizer.param_groups
    values = {float(g.get("momentum", 0.0)) for g in groups}
    if len(values) != 1 or any(g.get("nesterov") or g.get("dampening", 0.0) for g in groups):
        return 0.0
    return values.pop()


@dataclass
class _Replica:
    """What `prepare` builds: the DDP module and where this rank is in a step."""

    model: nn.Module
    params: list[nn.Parameter]
    compressor: Compressor
    hook: CompressionHook | None
    momentum: float
    """Momentum the compressor applied before sparsifying (the step then runs without it)."""
    micro: int = 0
    synchronized: bool | None = None
    """After `synchronize()`: whether the coming step applies (None: not synchronized)."""
    last: dict[str, Any] = field(default_factory=dict)


class DataParallel(Strategy):
    """Data parallelism on DDP: `DataParallel(grad_accum=1, clip_norm=None, compression="none", ...)`."""

    name = "data_parallel"

    @dataclass(frozen=True, kw_only=True, slots=True)
    class Options(StrategyOptions):
        grad_accum: int = 1
        clip_norm: float | None = None
        bucket_mb: float = 25.0
        find_unused_parameters: bool = False
        compression: str = "none"

        def __post_init__(self) -> None:
            check_range(self.grad_accum, "grad_accum", low=1)
            check_range(self.bucket_mb, "bucket_mb", low=0.0, low_open=True)
            if self.clip_norm is not None and self.clip_norm <= 0:
                raise ConfigError(
                    f"'clip_norm' must be > 0 (or unset for no clipping), not {self.clip_norm}", "clip_norm"
                )
            parse(self.compression)  # ConfigError (key "compression") if malformed

    options: Options

    def __init__(self, options: Options | None = None, /, **kwargs: Any) -> None:
        super().__init__(options, **kwargs)
        self._replica: _Replica | None = None
        self._restored: dict[str, Any] = {}  # loaded before prepare(): applied by it
        self._skipped = 0

    @property
    def grad_accum(self) -> int:
        return self.options.grad_accum

    def prepare(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, *, example: tuple[Any, Any] | None = None
    ) -> tuple[nn.Module, PreparedOptimizer]:
        rt = runtime.current()
        model.to(rt.device)
        compressor = parse(self.options.compression)
        hook = None
        if rt.distributed:
            from shoal.compress.ddp_hooks import CompressionHook

            model = DDP(
                model,
                device_ids=[rt.device] if rt.device.type == "cuda" else None,
                bucket_cap_mb=self.options.bucket_mb,
                find_unused_parameters=self.options.find_unused_parameters,
            )
            runtime.release_before_shutdown(model, _drop_reducer)
            model.register_state_dict_post_hook(_plain_names)
            model.register_load_state_dict_pre_hook(_accept_plain_names)
            names = {id(p): name for name, p in model.module.named_parameters()}
            compressor.reseed(1_000 + rt.rank)  # independent rounding noise per rank
            hook = CompressionHook(compressor, model, names, self.data_group())
        momentum = 0.0
        if hook is not None and compressor.family in SPARSE and isinstance(compressor, ErrorFeedback):
            momentum = compressor.momentum = sgd_momentum(optimizer)
        params = [p for p in model.parameters() if p.requires_grad]
        self._replica = _Replica(model, params, compressor, hook, momentum)
        self.load_state_dict(self._restored)
        return model, prepare_optimizer(optimizer, self)

    @property
    def replica(self) -> _Replica:
        if self._replica is None:
            raise self.not_prepared()
        return self._replica

    @property
    def compressor(self) -> Compressor:
        """The live compressor (after `prepare`)."""
        return self.replica.compressor

    def unwrap(self, model: nn.Module) -> nn.Module:
        return model.module if isinstance(model, DDP) else model

    def _set_sync(self, sync: bool) -> None:
        # What DDP.no_sync() toggles; set here because the user's loop runs the
        # forward pass before optimizer.step() tells us where we are.
        if isinstance(self.replica.model, DDP):
            self.replica.model.require_backward_grad_sync = sync

    # ------------------------------------------------------------------ steps
    def synchronize(self) -> bool:
        r = self.replica
        if r.micro < self.grad_accum - 1:
            return False  # an accumulating micro-step: the gradients are partial sums
        if r.synchronized is None:
            r.synchronized = self._average(r)
        return r.synchronized

    def _average(self, r: _Replica) -> bool:
        """Finish what DDP's backward began: the mean over micro-batches; False for a non-finite gradient."""
        if r.hook is not None:
            r.last = r.hook.take()
            if r.last["nonfinite"]:
                return False
        if self.grad_accum > 1:
            for p in r.params:
                if p.grad is not None:
                    p.grad.div_(self.grad_accum)
        return True

    def optimizer_step(self, optimizer: PreparedOptimizer, closure: Closure | None) -> float | None:
        r = self.replica
        r.micro += 1
        if r.micro < self.grad_accum:
            self._set_sync(r.micro == self.grad_accum - 1)
            return None
        r.micro = 0
        applies = self._average(r) if r.synchronized is None else r.synchronized
        r.synchronized = None
        self._set_sync(self.grad_accum == 1)
        if not applies:
            return self._skip(r)
        if self.options.clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(r.params, self.options.clip_norm)
        if not r.momentum:
            return optimizer.local_step(closure)
        # The compressor applied the momentum before sparsifying: step without it.
        groups = optimizer.param_groups  # replaced by load_state_dict: read them at each step
        saved = [g["momentum"] for g in groups]
        for g in groups:
            g["momentum"] = 0.0
        try:
            return optimizer.local_step(closure)
        finally:
            for g, m in zip(groups, saved, strict=True):
                g["momentum"] = m

    def _skip(self, r: _Replica) -> None:
        self._skipped += 1
        log.warning(
            "non-finite gradient after %s compression and averaging: step skipped (%d so far)",
            self.options.compression,
            self._skipped,
        )
        for p in r.params:
            p.grad = None

    def optimizer_zero_grad(self, optimizer: PreparedOptimizer, set_to_none: bool) -> None:
        if self.replica.micro == 0:  # gradients of an unfinished accumulation are kept
            optimizer.local_zero_grad(set_to_none)

    def step_metrics(self) -> dict[str, float]:
        last = self.replica.last if self._replica else {}
        if not last:
            return {}
        sent = last["bytes_sent"]
        out = {"bytes_sent": sent, "skipped_steps": float(self._skipped)}
        if sent > 0:
            out["compression_ratio"] = last["uncompressed"] / sent
        return out

    # ------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        if self._replica is None:
            return dict(self._restored)
        state: dict[str, Any] = {"micro": self._replica.micro, "skipped_steps": self._skipped}
        if self._replica.hook is not None:
            state.update(with_prefix(self._replica.hook.state_dict(), COMPRESSION))
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._skipped = int(state.get("skipped_steps", 0))
        if self._replica is None:  # applied by prepare()
            self._restored = dict(state)
            return
        self._replica.micro = int(state.get("micro", 0))
        compression = sub_state(state, COMPRESSION)
        if compression and self._replica.hook is not None:
            self._replica.hook.load_state_dict(compression)
        self._set_sync(self._replica.micro == self.grad_accum - 1)


def _drop_reducer(ddp: DDP) -> None:
    """Let DDP's reducer go while the process group still exists (see `runtime.release_before_shutdown`);
    the module inside (`ddp.module`) stays usable."""
    if hasattr(ddp, "reducer"):
        del ddp.reducer


# DDP's state dict carries its `module.` prefix, so a saved `model.state_dict()`
# would not load into the user's plain model. The prepared model's state dict has
# the plain names, and its `load_state_dict` takes both. (torch's own
# `get_model_state_dict` expects the prefix from a DDP: give it `strategy.unwrap(model)`.)
DDP_PREFIX = "module."


def _plain_names(module: nn.Module, state: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    """State-dict post-hook: `module.x` -> `x` (in place, in order), per-module metadata included."""
    _rename(state, prefix + DDP_PREFIX, prefix)
    _rename_modules(state, prefix + "module", prefix[:-1])


def _accept_plain_names(module: nn.Module, state: dict[str, Any], prefix: str, *_: Any) -> None:
    """Load pre-hook: a state dict with plain names gets DDP's prefix back (a prefixed one loads as it is)."""
    names = set(module.get_submodule("module").state_dict(keep_vars=True))
    given = [key[len(prefix) :] for key in state if key.startswith(prefix)]
    plain = sum(key in names for key in given)
    prefixed = sum(key.startswith(DDP_PREFIX) and key[len(DDP_PREFIX) :] in names for key in given)
    if plain <= prefixed:  # DDP's own names (also for a model whose child is called `module`), or neither
        return
    _rename(state, prefix, prefix + DDP_PREFIX)
    _rename_modules(state, prefix[:-1], prefix + "module")


def _rename(state: dict[str, Any], old: str, new: str) -> None:
    """Keys starting with `old` start with `new` instead; in place, keeping the order."""
    items = list(state.items())
    state.clear()
    for key, value in items:
        state[new + key[len(old) :] if key.startswith(old) else key] = value


def _rename_modules(state: dict[str, Any], old: str, new: str) -> None:
    """In the per-module metadata (keyed by module name), module `old` and those inside it move to `new`."""
    metadata = getattr(state, "_metadata", None)
    if metadata is None:
        return

    def moved(name: str) -> str:
        if name == old:
            return new
        if not old or name.startswith(old + "."):
            rest = name[len(old) + 1 :] if old else name
            return f"{new}.{rest}" if new else rest
        return name

    items = list(metadata.items())
    metadata.clear()
    for name, value in items:
        metadata[moved(name)] = value
