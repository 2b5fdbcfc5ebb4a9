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

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: N817  (torch's own abbreviation)

from shoal import runtime
from shoal.compress import Compressor, parse
from shoal.compress.sparse import corrected_momentum
from shoal.config import check_range
from shoal.state import sub_state, with_prefix
from shoal.strategies.base import StepOptions, Strategy
from shoal.strategies.optimizer import Closure, PreparedOptimizer

if TYPE_CHECKING:
    from shoal.compress.ddp_hooks import CompressionHook

log = logging.getLogger(__name__)

COMPRESSION = "compression/"


@dataclass
class _Replica:
    """What `prepare` builds: the DDP module and its compression."""

    model: nn.Module
    compressor: Compressor
    hook: CompressionHook | None
    momentum: float
    """Momentum the compressor applied before sparsifying (the step then runs without it)."""
    last: dict[str, Any] = field(default_factory=dict)


class DataParallel(Strategy):
    """Data parallelism on DDP: `DataParallel(grad_accum=1, clip_norm=None, compression="none", ...)`."""

    name = "data_parallel"

    @dataclass(frozen=True, kw_only=True, slots=True)
    class Options(StepOptions):
        bucket_mb: float = 25.0
        find_unused_parameters: bool = False
        compression: str = "none"

        def __post_init__(self) -> None:
            StepOptions.__post_init__(self)  # grad_accum, clip_norm
            check_range(self.bucket_mb, "bucket_mb", low=0.0, low_open=True)
            parse(self.compression)  # ConfigError (key "compression") if malformed

    options: Options

    def __init__(self, options: Options | None = None, /, **kwargs: Any) -> None:
        super().__init__(options, **kwargs)
        self._replica: _Replica | None = None
        self._restored: dict[str, Any] = {}  # loaded before prepare(): applied by it
        self._skipped = 0

    def prepare(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        example: tuple[Any, Any] | None = None,
    ) -> tuple[nn.Module, PreparedOptimizer | None]:
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
        self._replica = _Replica(model, compressor, hook, 0.0)
        self.load_state_dict(self._restored)
        return self.finish_prepare(model, optimizer)

    def prepare_optimizer(self, optimizer: torch.optim.Optimizer) -> PreparedOptimizer:
        prepared = super().prepare_optimizer(optimizer)
        r = self.replica
        if r.hook is not None:
            r.momentum = r.compressor.momentum = corrected_momentum(r.compressor, optimizer)
        return prepared

    def step_needs(self) -> list[str]:
        needs = super().step_needs()
        if self.replica.hook is not None and self.options.compression != "none":  # no hook in a world of one
            needs.append(f"compression={self.options.compression!r}")
        return needs

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

    def set_gradient_sync(self, sync: bool) -> None:
        # What DDP.no_sync() toggles; set here because the user's loop runs the
        # forward pass before optimizer.step() tells us where we are.
        if isinstance(self.replica.model, DDP):
            self.replica.model.require_backward_grad_sync = sync

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """DDP's own `no_sync()` (nothing to hold back in a world of one)."""
        model = self.replica.model
        if not isinstance(model, DDP):
            yield
            return
        with model.no_sync():
            yield

    # ------------------------------------------------------------------ steps
    def average_gradients(self) -> bool:
        """Finish what DDP's backward began: the mean over micro-batches; False for a non-finite gradient."""
        r = self.replica
        if r.hook is not None:
            r.last = r.hook.take()
            if r.last["nonfinite"]:
                return False
        return super().average_gradients()

    def skip_step(self) -> None:
        self._skipped += 1
        log.warning(
            "non-finite gradient after %s compression and averaging: step skipped (%d so far)",
            self.options.compression,
            self._skipped,
        )
        super().skip_step()

    def apply_step(self, optimizer: PreparedOptimizer, closure: Closure | None) -> float | None:
        r = self.replica
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
        state: dict[str, Any] = {"micro": self._micro, "skipped_steps": self._skipped}
        if self._replica.hook is not None:
            state.update(with_prefix(self._replica.hook.state_dict(), COMPRESSION))
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._skipped = int(state.get("skipped_steps", 0))
        if self._replica is None:  # applied by prepare()
            self._restored = dict(state)
            return
        self._micro = int(state.get("micro", 0))
        compression = sub_state(state, COMPRESSION)
        if compression and self._replica.hook is not None:
            self._replica.hook.load_state_dict(compression)
        self.set_gradient_sync(self._micro == self.grad_accum - 1)


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
