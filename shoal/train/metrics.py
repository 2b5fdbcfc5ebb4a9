"""Run metrics: one JSON object per line in metrics.jsonl, mirrored to TensorBoard.

JSON lines are what the launcher's progress display and `shoal report`-style
tools read; TensorBoard is for people. Only the main rank writes; `StepLog`
gathers the training loss of every rank between two logged steps.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import torch

Value = float | int | str


class MetricsWriter:
    def __init__(self, run_dir: Path, tensorboard: bool = True, append: bool = False) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self._file = open(self.path, "a" if append else "w", buffering=1)  # noqa: SIM115  (open until close())
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))
        self._start = time.time()

    def log(self, step: int, kind: str = "train", /, **values: Value) -> None:
        """One record: its kind ("train", "eval", "resume"), the step and named values."""
        record = {"kind": kind, "step": step, "time": round(time.time() - self._start, 4), **values}
        self._file.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    self._tb.add_scalar(f"{kind}/{key}", value, step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


class StepLog:
    """Mean loss and throughput between two logged steps.

    Every rank adds its micro-batch losses; at a logged step the sums are
    reduced over the ranks (`reduce`, collective) and the main rank writes.
    """

    def __init__(
        self, writer: MetricsWriter | None, samples_per_step: int, reduce: Callable[[torch.Tensor], torch.Tensor]
    ) -> None:
        self.writer = writer
        self.samples_per_step = samples_per_step
        self.reduce = reduce
        self.loss = torch.zeros(2, dtype=torch.float64)  # sum, count
        self.start, self.steps = time.perf_counter(), 0

    def add(self, loss: torch.Tensor) -> None:
        self.loss[0] += float(loss)
        self.loss[1] += 1

    def step_done(self) -> None:
        self.steps += 1

    def write(self, step: int, **values: Value) -> None:
        """Collective: log the window's mean loss and samples/s with `values`, then start a new window."""
        self.reduce(self.loss)
        elapsed = time.perf_counter() - self.start
        if self.writer is not None:
            self.writer.log(
                step,
                "train",
                loss=self.loss[0].item() / max(1.0, self.loss[1].item()),
                samples_per_s=self.samples_per_step * self.steps / max(elapsed, 1e-9),
                **values,
            )
        self.loss.zero_()
        self.start, self.steps = time.perf_counter(), 0
