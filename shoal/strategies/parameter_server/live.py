"""What a parameter-server worker reports: per-step figures and the launcher's live table.

`StepWindow` collects wait time and staleness between two `step_metrics()`
calls; `LiveRow` publishes this worker's row of the launcher's live table
(rate, wait fraction, staleness, bytes) every half second over pub/sub.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from shoal.comm.pubsub import Publisher

PUBLISH_EVERY_S = 0.5


@dataclass
class StepWindow:
    """Figures since the last `step_metrics()`."""

    wait_s: float = 0.0
    staleness: list[float] = field(default_factory=list)
    start: float = field(default_factory=time.perf_counter)
    pushed0: int = 0
    pulled0: int = 0
    raw0: int = 0
    raw_pulled0: int = 0


@dataclass
class Totals:
    """Figures since `prepare`."""

    wait_s: float = 0.0
    raw_pushed: int = 0
    raw_pulled: int = 0
    """Bytes the pulls installed would have taken whole (for the pull compression ratio)."""
    skipped: int = 0


class LiveRow:
    """This worker's row of the launcher's live table, published at most every half second."""

    def __init__(self, publisher: Publisher, rank: int) -> None:
        self.publisher = publisher
        self.rank = rank
        self.since = time.perf_counter()
        self.steps = 0
        self.samples = 0
        self.wait_at_since = 0.0
        self.batch = 0
        """The batch size last seen at the model's input."""

    def step(self, clock: int, totals: Totals, staleness: float, pushed: int, pulled: int, final: bool = False) -> None:
        if not final:
            self.steps += 1
            self.samples += self.batch
        now = time.perf_counter()
        elapsed = now - self.since
        if elapsed < PUBLISH_EVERY_S and not (final and self.steps):
            return
        row = {
            "rank": self.rank,
            "step": clock,
            "samples_per_s": self.samples / elapsed,
            "steps_per_s": self.steps / elapsed,
            "wait_frac": (totals.wait_s - self.wait_at_since) / elapsed,
            "staleness": staleness,
            "bytes_pushed": pushed,
            "bytes_pulled": pulled,
        }
        self.publisher.publish("metrics", row)
        self.since, self.steps, self.samples, self.wait_at_since = now, 0, 0, totals.wait_s

    def close(self) -> None:
        self.publisher.close()
