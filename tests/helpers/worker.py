"""One rank started by `tests.helpers.ranks`:

    python -m tests.helpers.worker MODULE:FUNCTION ARGS_JSON OUT_DIR TIMEOUT_S

Joins the job's process group (gloo on the CPU, one torch thread, from the
RANK/WORLD_SIZE/MASTER_* the starter set), calls FUNCTION(rank, world, *ARGS)
and writes {"ok": result} or {"error": traceback, "at": time} to
OUT_DIR/rank<R>.json; exits 0 or 1. The result must be JSON.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path


def resolve(target: str) -> Callable:
    """The function named `module:qualified.name`."""
    module, _, name = target.partition(":")
    obj = importlib.import_module(module)
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def main(argv: list[str]) -> int:
    target, args, out_dir, timeout_s = argv
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    import shoal

    try:
        shoal.init(backend="gloo", device="cpu", threads=1, timeout_s=float(timeout_s))
        result = {"ok": resolve(target)(rank, world, *json.loads(args))}
    except BaseException:
        result = {"error": traceback.format_exc(), "at": time.time()}
        print(result["error"], file=sys.stderr, flush=True)
    # written before the teardown: a rank whose peer failed may be stopped by the harness during it
    path = Path(out_dir) / f"rank{rank}.json"
    path.with_suffix(".tmp").write_text(json.dumps(result))
    path.with_suffix(".tmp").rename(path)
    shoal.shutdown()
    return 0 if "ok" in result else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
