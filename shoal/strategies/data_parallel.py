"""Synchronous data parallelism on `DistributedDataParallel`.

Guarantee: with the same seed, N ranks with batch b take exactly the steps of
one process with batch N*b (the loader hands out slices of the same global
batch, DDP averages gradients). Gradient accumulation over k calls of
`optimizer.step()` all-reduces once and applies the mean of the k micro
batches, so it equals one step with the k-times batch; clipping is applied to
the averaged gradient, as the single process with the combined batch would.

`compression` (see `shoal.compress`) swaps DDP's all-reduce for a comm hook
that compresses each bucket. The hook runs only on the synchronizing
micro-step, so an accumulated gradient is compressed once; clipping then
applies to the decoded, averaged gradient. A non-finite averaged gradient
(fp16 overflow, a NaN loss) is never applied: the step is skipped, counted in
`skipped_steps` and logged, as mixed-precision training does. Error-feedback
residuals are per rank: `rank_tensors()` hands them to the DCP checkpoint
under `rank_state/rank{r}/compression/...` (see Strategy.add_rank_tensors),
so each rank writes its own as binary tensors; `state_dict()` stays small.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from shoal import runtime
from shoal.compress import parse
from shoal.compress.base import unpack_state
from shoal.config import check_range
from shoal.errors import ConfigError
from shoal.strategies.base import Strategy, wrap_optimizer

log = logging.getLogger(__name__)

SPARSE = ("topk", "randomk")


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
class DataParallel(Strategy):
    grad_accum: int = 1
    clip_norm: float | None = None
    bucket_mb: float = 25.0
    find_unused_parameters: bool = False
    compression: str = "none"

    name: ClassVar[str] = "data_parallel"

    def __post_init__(self):
        check_range(self.grad_accum, "grad_accum", low=1)
        check_range(self.bucket_mb, "bucket_mb", low=0.0, low_open=True)
        if self.clip_norm is not None and self.clip_norm <= 0:
            raise ConfigError(f"'clip_norm' must be > 0 (or unset for no clipping), not {self.clip_norm}", "clip_norm")
        self._compressor = parse(self.compression)  # ConfigError (key "compression") if malformed
        self._ddp: nn.Module | None = None
        self._micro = 0
        self._hook = None
        self._pending_compression: dict | None = None
        self._last: dict = {}
        self._skipped = 0

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        rt = runtime.current()
        model.to(rt.device)
        if rt.distributed:
            ids = [rt.device] if rt.device.type == "cuda" else None
            model = DDP(
                model, device_ids=ids, bucket_cap_mb=self.bucket_mb, find_unused_parameters=self.find_unused_parameters
            )
            self._attach_compression(model, rt.rank)
        self._ddp = model
        self._params = [p for p in model.parameters() if p.requires_grad]
        self._set_sync(self.grad_accum == 1)
        self._correct_momentum = 0.0
        if self._hook is not None and self._compressor.family in SPARSE:
            self._correct_momentum = sgd_momentum(optimizer)
            self._compressor.momentum = self._correct_momentum
        self._optimizer = optimizer  # its param_groups are replaced by load_state_dict: read them at each step
        return model, wrap_optimizer(optimizer, self._step, self._zero_grad)

    def _attach_compression(self, ddp: DDP, rank: int) -> None:
        from shoal.compress.ddp_hooks import CompressionHook

        names = {id(p): name for name, p in ddp.module.named_parameters()}
        self._compressor.reseed(1_000 + rank)  # independent rounding noise per rank
        self._hook = CompressionHook(self._compressor, ddp, names, self.data_group())
        if self._pending_compression is not None:
            self._hook.load_state_dict(self._pending_compression)
            self._pending_compression = None

    def _set_sync(self, sync: bool) -> None:
        # What DDP.no_sync() toggles; set here because the user's loop runs the
        # forward pass before optimizer.step() tells us where we are.
        if isinstance(self._ddp, DDP):
            self._ddp.require_backward_grad_sync = sync

    def _step(self, original_step, closure=None):
        self._micro += 1
        if self._micro < self.grad_accum:
            self._set_sync(self._micro == self.grad_accum - 1)
            return None
        self._micro = 0
        if self._hook is not None:
            self._last = self._hook.take()
            if self._last["nonfinite"]:
                return self._skip()
        if self.grad_accum > 1:
            for p in self._params:
                if p.grad is not None:
                    p.grad.div_(self.grad_accum)
        if self.clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(self._params, self.clip_norm)
        if self._correct_momentum:  # the compressor applied it before sparsifying
            groups = self._optimizer.param_groups
            saved = [g["momentum"] for g in groups]
            for g in groups:
                g["momentum"] = 0.0
            try:
                result = original_step(closure)
            finally:
                for g, m in zip(groups, saved):
                    g["momentum"] = m
        else:
            result = original_step(closure)
        self._set_sync(self.grad_accum == 1)
        return result

    def _skip(self):
        self._skipped += 1
        log.warning(
            "non-finite gradient after %s compression and averaging: step skipped (%d so far)",
            self.compression,
            self._skipped,
        )
        for p in self._params:
            p.grad = None
        self._set_sync(self.grad_accum == 1)
        return None

    def step_metrics(self) -> dict[str, float]:
        if not self._last:
            return {}
        sent = self._last["bytes_sent"]
        out = {"bytes_sent": sent, "skipped_steps": float(self._skipped)}
        if sent > 0:
            out["compression_ratio"] = self._last["uncompressed"] / sent
        return out

    def _zero_grad(self, original_zero_grad, set_to_none: bool = True):
        if self._micro == 0:  # gradients of an unfinished accumulation are kept
            original_zero_grad(set_to_none)

    def state_dict(self):
        return {"micro": self._micro, "skipped_steps": self._skipped}

    def rank_tensors(self) -> dict[str, torch.Tensor]:
        if self._hook is not None:
            return {f"compression/{k}": v for k, v in self._hook.state_dict().items()}
        return {f"compression/{k}": v for k, v in (self._pending_compression or {}).items()}

    def load_rank_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        state = {k[len("compression/") :]: v for k, v in tensors.items() if k.startswith("compression/")}
        if state:
            self._load_compression(state)

    def _load_compression(self, tensors: dict[str, torch.Tensor]) -> None:
        if self._hook is not None:
            self._hook.load_state_dict(tensors)
        else:  # loaded before prepare(): applied when the hook exists
            self._pending_compression = tensors

    def load_state_dict(self, state):
        self._micro = int(state.get("micro", 0))
        self._skipped = int(state.get("skipped_steps", 0))
        if "compression" in state:  # checkpoints from before the state moved into DCP
            self._load_compression(unpack_state(state["compression"]))
        self._set_sync(self._micro == self.grad_accum - 1)
