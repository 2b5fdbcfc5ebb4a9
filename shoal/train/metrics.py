"""Run metrics: one JSON object per line in metrics.jsonl, mirrored to TensorBoard.

JSON lines are what the launcher's progress display and `shoal report`-style
tools read; TensorBoard is for people. Only the main rank writes.
"""

from __future__ import annotations

import json
import time
from pathlib import Path


class MetricsWriter:
    def __init__(self, run_dir: Path, tensorboard: bool = True, append: bool = False):
        self.path = Path(run_dir) / "metrics.jsonl"
        self._file = open(self.path, "a" if append else "w", buffering=1)
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))
        self._start = time.time()

    def log(self, step: int, kind: str = "train", **values: float) -> None:
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


def read_metrics(path: Path) -> list[dict]:
    if not Path(path).exists():
        return []
    out = []
    for line in Path(path).read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # a line being written
    return out
