"""An unmodified torchrun script under `shoal run` and under `torchrun`, side by side.

Both launchers start the same 2-worker DDP script (benchmarks/scripts/torchrun_ddp.py,
which never imports shoal), alternating trials so that machine noise hits both;
a third launch shows what `shoal run` cost before it set torchrun's
OMP_NUM_THREADS=1 (each worker then takes every core). Reports the median steps/s
of each and the ratio shoal run / torchrun (goal >= 0.97).

    PYTHONPATH=. python benchmarks/launcher.py [--trials 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness

from tests.helpers.cli import start_shoal
from tests.helpers.procs import Processes

SCRIPT = Path(__file__).resolve().parent / "scripts" / "torchrun_ddp.py"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


def trial(launcher: str, out: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "SHOAL_THREADS")}
    if launcher == "shoal_run_all_cores":
        env["OMP_NUM_THREADS"] = str(os.cpu_count() or 1)
    with Processes() as procs:
        if launcher == "torchrun":
            proc = procs.start([*TORCHRUN, str(SCRIPT), str(out)], timeout=600, env=env)
        else:
            proc = start_shoal(procs, "run", "-n", 2, SCRIPT, out, timeout=600, env=env)
        done = proc.wait()
    if done.returncode != 0 or done.timed_out:
        sys.exit(f"{done.stderr[-3000:]}{launcher} failed: {' '.join(done.args)}")
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=5)
    args = parser.parse_args()
    launchers = ("torchrun", "shoal_run", "shoal_run_all_cores")
    runs: dict[str, list[dict]] = {k: [] for k in launchers}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.trials):
            for launcher in launchers:
                runs[launcher].append(trial(launcher, Path(tmp) / f"{launcher}{i}.json"))
    median = {k: statistics.median(r["steps_per_s"] for r in v) for k, v in runs.items()}
    ratio = median["shoal_run"] / median["torchrun"]
    before = median["shoal_run_all_cores"] / median["torchrun"]
    summary = (
        f"unmodified torchrun script, 2 workers, 6.3M MLP: shoal run / torchrun = {ratio:.3f} "
        f"(goal >= 0.97); with every worker on all {os.cpu_count()} cores, as before: {before:.2f}"
    )
    result = {"trials": args.trials, "median_steps_per_s": median, "ratio": ratio, "before_ratio": before, "runs": runs}
    _harness.write("launcher", result, summary)


if __name__ == "__main__":
    main()
