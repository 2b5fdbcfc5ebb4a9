"""Entry point of each `shoal train` worker process: `python -m shoal.train.worker RUN_DIR`."""

from __future__ import annotations

import sys
from pathlib import Path

from shoal import logs, runtime
from shoal.errors import ShoalError
from shoal.train import jobconfig as config
from shoal.train.trainer import Trainer


def main(argv: list[str] | None = None) -> int:
    run_dir = Path((argv or sys.argv[1:])[0])
    try:
        logs.setup()
        cfg = config.load(run_dir / "config.toml")
        launch = cfg.launch
        runtime.init(
            backend=launch.backend, device=launch.device, timeout_s=launch.timeout_s, threads=launch.threads or None
        )
        Trainer(cfg, run_dir).run()
    except ShoalError as err:
        print(f"shoal: {err}", file=sys.stderr, flush=True)
        return 1
    finally:
        runtime.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
