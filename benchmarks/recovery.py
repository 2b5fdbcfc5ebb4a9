"""What recovery points cost, and how long a data-parallel `shoal train` job takes to recover from a SIGKILL.

1. Steps/s of `shoal train examples/synthetic-wide.toml` (the 5.4M-parameter
   MLP, 2 workers) with recovery points off, every k steps and every step,
   alternating the settings over `--reps` rounds so that machine noise hits
   all alike; median per setting.
2. `--trials` runs with `--launch.max_restarts=1` whose worker 1 is SIGKILLed
   at a step: the time from the kill (the fault record's mtime, written and
   fsynced just before it) to training running again (the `restart` record's
   `unix_time`, written once every rank has loaded the recovery point).

    PYTHONPATH=. python benchmarks/recovery.py [--reps 3] [--trials 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness

from tests.helpers.cli import shoal
from tests.helpers.faults import Faults

CONFIG = "examples/synthetic-wide.toml"
QUIET = ["--logging.tensorboard=false", "--logging.progress=false"]


def train(root: Path, name: str, *args: str, env: dict[str, str] | None = None) -> Path:
    result = shoal(
        "train", CONFIG, f"--logging.run_dir={root}", f"--logging.name={name}", *QUIET, *args, env=env, timeout=900
    )
    if result.returncode != 0:
        sys.exit(f"{result.stderr[-3000:]}\nshoal train {name} exited with code {result.returncode}")
    return root / name


def steps_per_s(run_dir: Path) -> float:
    summary = json.loads((run_dir / "summary.json").read_text())
    return summary["step"] / summary["wall_s"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--every", type=int, nargs="+", default=[0, 1, 5, 10])
    parser.add_argument("--trials", type=int, default=5)
    ns = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="shoal-recovery-"))
    rates: dict[int, list[float]] = {k: [] for k in ns.every}
    for rep in range(ns.reps):
        for k in ns.every:
            run = train(root, f"cost-{k}-{rep}", f"--train.steps={ns.steps}", f"--checkpoint.recovery_every={k}")
            rates[k].append(steps_per_s(run))
            print(f"recovery_every={k}: {rates[k][-1]:.2f} steps/s", flush=True)
    base = statistics.median(rates[0]) if 0 in rates else None
    cost = {
        str(k): {
            "steps_per_s": statistics.median(v),
            "all": v,
            **({"cost": 1 - statistics.median(v) / base} if base else {}),
        }
        for k, v in rates.items()
    }
    recover: list[float] = []
    for trial in range(ns.trials):
        where = root / f"trial{trial}"
        where.mkdir()
        step = 20 + 7 * trial
        faults = Faults(where).kill("worker", rank=1, step=step)
        run = train(root, f"kill-{trial}", "--train.steps=60", "--launch.max_restarts=1", env=faults.env())
        faults.assert_fired("worker", 1, step, "kill")
        killed_at = faults.record.stat().st_mtime
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        (restart,) = [r for r in records if r["kind"] == "restart"]
        recover.append(restart["unix_time"] - killed_at)
        print(f"kill at step {step}: training again after {recover[-1]:.2f}s", flush=True)
    p50 = statistics.median(recover)
    every_k = {k: v for k, v in cost.items() if k != "0"}
    summary = (
        "recovery points on the 5.4M-parameter MLP, 2 workers: "
        + ", ".join(f"every {k} step(s) {100 * v.get('cost', 0):.1f}% of steps/s" for k, v in every_k.items())
        + f" ({cost['0']['steps_per_s']:.2f} steps/s without); SIGKILL to training again p50 {p50:.2f}s "
        f"(max {max(recover):.2f}s, {len(recover)} trials)"
    )
    _harness.write(
        "recovery",
        {"config": CONFIG, "workers": 2, "steps": ns.steps, "cost": cost, "recover_s": recover, "recover_p50_s": p50},
        summary,
    )


if __name__ == "__main__":
    main()
