"""Progress of a running job, shown by the launching process.

Workers only write metrics.jsonl; this thread tails it, so the terminal is
owned by one process and the same display works for every strategy. On a
terminal it is a rich progress bar; elsewhere (CI, pipes) a plain line every
tenth of the run and at each evaluation.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class ProgressMonitor(threading.Thread):
    def __init__(self, metrics_path: Path, total_steps: int, console: Console | None = None, interval_s: float = 0.2):
        super().__init__(daemon=True)
        self.path = Path(metrics_path)
        self.total = total_steps
        self.console = console or Console()
        self.interval = interval_s
        self._halt = threading.Event()
        self._offset = 0
        self._next_plain = 0

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=5)

    def run(self) -> None:
        if self.console.is_terminal:
            columns = [
                TextColumn("[bold]training"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
            ]
            with Progress(*columns, console=self.console, transient=False) as bar:
                task = bar.add_task("train", total=self.total, info="starting workers")
                shown: dict[str, str] = {}
                while True:
                    stopping = self._halt.is_set()
                    for rec in self._new_records():
                        shown[rec["kind"]] = _describe(rec)
                        info = "  ".join(shown[k] for k in ("train", "eval") if k in shown)
                        bar.update(task, completed=rec["step"], info=info)
                    if stopping:
                        break
                    self._halt.wait(self.interval)
        else:
            while True:
                stopping = self._halt.is_set()
                for rec in self._new_records():
                    if rec["kind"] == "eval" or (rec["kind"] == "train" and rec["step"] >= self._next_plain):
                        self.console.print(f"step {rec['step']}/{self.total}  {_describe(rec)}", highlight=False)
                        if rec["kind"] == "train":
                            self._next_plain = rec["step"] + max(1, self.total // 10)
                if stopping:
                    break
                self._halt.wait(self.interval)

    def _new_records(self) -> list[dict]:
        if not self.path.exists():
            return []
        with open(self.path) as f:
            f.seek(self._offset)
            chunk = f.read()
        complete = chunk[: chunk.rfind("\n") + 1]
        self._offset += len(complete.encode())
        out = []
        for line in complete.splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out


def _describe(rec: dict) -> str:
    if rec["kind"] == "eval":
        accuracy, loss = rec.get("eval_accuracy", float("nan")), rec.get("eval_loss", float("nan"))
        return f"eval accuracy {accuracy:.4f}  eval loss {loss:.4f}"
    if rec["kind"] == "train":
        return f"loss {rec['loss']:.4f}  {rec['samples_per_s']:.0f} samples/s"
    return rec["kind"]
