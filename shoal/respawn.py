"""Start a launcher's helper processes again when they exit, one by one, while its workers run.

A launcher's control-plane members (`shoal.control.launch`) and its replicated
parameter servers (`shoal.ps.servers`) are single processes that come back on
their own, each with its own count, while the workers run on. torch's elastic
agent restarts only workers, and all of a machine's together; so this small
watcher, one thread that polls, serves both.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Callable

POLL_S = 0.2


class Respawner:
    """Watches `procs` (index to process, a dict or a list) and, when one exits, asks `why(index, code)`
    for the line that says so (None: leave it, it stopped for a reason of its own); then prints that line
    with the count and puts `start(index, count)` in its place, each index at most `limit` times."""

    def __init__(
        self,
        procs: dict[int, subprocess.Popen] | list[subprocess.Popen],
        start: Callable[[int, int], subprocess.Popen],
        why: Callable[[int, int], str | None],
        limit: int,
        name: str,
    ) -> None:
        self.procs, self.start, self.why, self.limit = procs, start, why, limit
        self.count: Counter[int] = Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop watching (before the processes are ended); safe to call twice."""
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(POLL_S):
            pairs = self.procs.items() if isinstance(self.procs, dict) else enumerate(self.procs)
            for i, proc in list(pairs):
                code = proc.poll()
                if code is None or self.count[i] >= self.limit or self._stop.is_set():
                    continue
                line = self.why(i, code)
                if line is None:
                    continue
                self.count[i] += 1
                print(f"shoal: {line} ({self.count[i]} of {self.limit})", file=sys.stderr, flush=True)
                self.procs[i] = self.start(i, self.count[i])
