"""Synchronous data parallelism on `DistributedDataParallel`.

Guarantee: with the same seed, N ranks with batch b take exactly the steps of
one process with batch N*b (the loader hands out slices of the same global
batch, DDP averages gradients). Gradient accumulation over k calls of
`optimizer.step()` all-reduces once and applies the mean of the k micro
batches, so it equals one step with the k-times batch; clipping is applied to
the averaged gradient, as the single process with the combined batch would.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from shoal import runtime
from shoal.config import check_range
from shoal.errors import ConfigError
from shoal.strategies.base import Strategy, wrap_optimizer


@dataclass
class DataParallel(Strategy):
    grad_accum: int = 1
    clip_norm: float | None = None
    bucket_mb: float = 25.0
    find_unused_parameters: bool = False

    name: ClassVar[str] = "data_parallel"

    def __post_init__(self):
        check_range(self.grad_accum, "grad_accum", low=1)
        check_range(self.bucket_mb, "bucket_mb", low=0.0, low_open=True)
        if self.clip_norm is not None and self.clip_norm <= 0:
            raise ConfigError(f"'clip_norm' must be > 0 (or unset for no clipping), not {self.clip_norm}", "clip_norm")
        self._ddp: nn.Module | None = None
        self._micro = 0

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        rt = runtime.current()
        model.to(rt.device)
        if rt.distributed:
            ids = [rt.device] if rt.device.type == "cuda" else None
            model = DDP(model, device_ids=ids, bucket_cap_mb=self.bucket_mb, find_unused_parameters=self.find_unused_parameters)
        self._ddp = model
        self._params = [p for p in model.parameters() if p.requires_grad]
        self._set_sync(self.grad_accum == 1)
        return model, wrap_optimizer(optimizer, self._step, self._zero_grad)

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
        if self.grad_accum > 1:
            for p in self._params:
                if p.grad is not None:
                    p.grad.div_(self.grad_accum)
        if self.clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(self._params, self.clip_norm)
        result = original_step(closure)
        self._set_sync(self.grad_accum == 1)
        return result

    def _zero_grad(self, original_zero_grad, set_to_none: bool = True):
        if self._micro == 0:  # gradients of an unfinished accumulation are kept
            original_zero_grad(set_to_none)

    def state_dict(self):
        return {"micro": self._micro}

    def load_state_dict(self, state):
        self._micro = int(state.get("micro", 0))
        self._set_sync(self._micro == self.grad_accum - 1)
