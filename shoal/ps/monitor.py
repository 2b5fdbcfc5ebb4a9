"""The launcher's view of a parameter-server job while it runs.

Subscribes to what servers and workers publish (`shoal.comm.pubsub`),
keeps the newest row per worker (rank, step, samples/s, staleness, wait %),
shows it as a live table when asked, and appends every message as a JSON
line to `record` (the run directory's `ps_events.jsonl` under `shoal train`).

When a server declares a worker departed (`shoal.ps.membership`: its
connection closed, or it stopped answering heartbeats: it hangs), the monitor
SIGKILLs that worker's pid if it is a process this launcher started (a
descendant of this process), so that torch's agent sees it fail and takes
its restart path now, not when (if ever) the hung process wakes. A worker on
another machine is left to its own launcher's agent (not yet: it is fenced by
the servers and stops when it wakes).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import threading
import time

from rich.console import Console
from rich.live import Live
from rich.table import Table

from shoal.comm.pubsub import Subscriber
from shoal.comm.wire import Codec
from shoal.procfs import parent_of

log = logging.getLogger("shoal.ps.monitor")


def descends_from(pid: int, ancestor: int) -> bool:
    """Whether process `pid` is `ancestor` or one of its descendants (read from /proc)."""
    for _ in range(64):
        if pid == ancestor:
            return True
        if pid <= 1:
            return False
        parent = parent_of(pid)
        if parent is None:
            return False
        pid = parent
    return False


def stop_departed(event: dict) -> bool:
    """SIGKILL the worker a server declared departed, if this launcher started it; whether it did."""
    pid = event.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid == os.getpid() or not descends_from(pid, os.getpid()):
        return False
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
        log.warning("stopped worker %s (pid %d): %s", event.get("departed"), pid, event.get("message", ""))
        return True
    return False


class Monitor:
    def __init__(
        self,
        codec: Codec,
        record: str | None = None,
        live: bool = False,
        console: Console | None = None,
        host: str = "127.0.0.1",
    ):
        self.sub = Subscriber(codec, host)
        self.endpoint = self.sub.endpoint
        self.record = record
        if record:
            with open(record, "a"):  # the file exists from the start, as the run directory promises
                pass
        self.live = live
        self.console = console or Console(stderr=True)
        self.rows: dict[int, dict] = {}
        self.events: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="shoal-ps-monitor", daemon=True)

    def start(self) -> Monitor:
        self._thread.start()
        return self

    def _take(self, messages: list[dict]) -> None:
        if self.record and messages:
            now = round(time.time(), 3)
            with open(self.record, "a") as out:
                out.writelines(json.dumps({"time": now, **m}) + "\n" for m in messages)
        for m in messages:
            if m.get("topic") == "metrics" and isinstance(m.get("rank"), int):
                self.rows[m["rank"]] = m
            elif m.get("topic") == "event":
                self.events.append(str(m.get("message", ""))[:200])
                if "departed" in m:
                    stop_departed(m)

    def table(self) -> Table:
        t = Table(title="parameter server: workers", title_justify="left")
        for col in ("rank", "step", "samples/s", "staleness", "wait %"):
            t.add_column(col, justify="right")
        for rank in sorted(self.rows):
            r = self.rows[rank]
            t.add_row(
                str(rank),
                str(r.get("step", "")),
                f"{r.get('samples_per_s', 0.0):.0f}",
                f"{r.get('staleness', 0.0):.2f}",
                f"{100 * r.get('wait_frac', 0.0):.0f}",
            )
        return t

    def _run(self) -> None:
        if not self.live:
            while not self._stop.is_set():
                self._take(self.sub.poll(200))
            return
        with Live(self.table(), console=self.console, refresh_per_second=2, transient=False) as live:
            while not self._stop.is_set():
                self._take(self.sub.poll(200))
                live.update(self.table())

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._take(self.sub.poll(0))
        self.sub.close()
