"""A fault schedule for one test, and the proof that it fired:

    faults = Faults(tmp_path).kill("worker", rank=1, step=3)
    result = shoal("run", ..., env=faults.env())
    faults.assert_fired("worker", rank=1, step=3, action="kill")

The schedule travels to every process in `SHOAL_FAULTS` (see `shoal.faults`);
each fired fault is a line in `tmp_path/faults.jsonl`.
"""

from __future__ import annotations

import json
from pathlib import Path

from shoal import env, faults


class Faults:
    def __init__(self, directory: Path, seed: int = 0) -> None:
        self.record = Path(directory) / "faults.jsonl"
        self.seed = seed
        self.entries: list[dict] = []

    def add(self, role: str, rank: int | str, step: int | str, action: str, **more: float) -> Faults:
        self.entries.append({"role": role, "rank": rank, "step": step, "action": action, **more})
        return self

    def raise_at(self, role: str, rank: int | str, step: int | str) -> Faults:
        return self.add(role, rank, step, "raise")

    def kill(self, role: str, rank: int | str, step: int | str) -> Faults:
        return self.add(role, rank, step, "kill")

    def stop(self, role: str, rank: int | str, step: int | str, seconds: float) -> Faults:
        return self.add(role, rank, step, "stop", seconds=seconds)

    def kill_launcher(self, role: str, rank: int | str, step: int | str) -> Faults:
        return self.add(role, rank, step, "kill-launcher")

    def stop_launcher(self, role: str, rank: int | str, step: int | str, seconds: float) -> Faults:
        return self.add(role, rank, step, "stop-launcher", seconds=seconds)

    def sleep(self, role: str, rank: int | str, step: int | str, seconds: float, prob: float = 1.0) -> Faults:
        return self.add(role, rank, step, "sleep", seconds=seconds, prob=prob)

    def env(self) -> dict[str, str]:
        """The environment entry that gives every process this schedule."""
        text = json.dumps({"record": str(self.record), "seed": self.seed, "faults": self.entries})
        faults.parse(text)  # a mistake in the test fails here, not in a child
        return {env.FAULTS: text}

    def fired(self) -> list[dict]:
        """Every fault that fired, in order: role, rank, step, action, pid."""
        return faults.fired(str(self.record))

    def assert_fired(self, role: str, rank: int, step: int, action: str) -> dict:
        """The one record of this fault firing (AssertionError, with what did fire, if none)."""
        want = {"role": role, "rank": rank, "step": step, "action": action}
        found = [r for r in self.fired() if {k: r[k] for k in want} == want]
        assert len(found) == 1, f"expected {want} to fire once; fired: {self.fired()}"
        return found[0]
