"""Where a machine's workers write their output: torch's folders, none of them deleted.

torch's agent writes each worker's output to `<log_dir>/<run>/attempt_<n>/<local
rank>/` and, on every start of the workers, deletes that attempt's folder first.
It starts them again under the same `n` when the job's membership changes (a
machine joins late or comes back, or a parameter-server job's healthy workers
follow a restarted peer): the first group's logs were deleted with the folder.
Here that folder is moved aside to `attempt_<n>.<k>` (k = 1, 2, ... in start
order) before torch makes the new one.
"""

from __future__ import annotations

import os
from typing import Any


def logs_specs(log_dir: str, quiet: bool) -> Any:
    """torch's `DefaultLogsSpecs` (output redirected to files, teed to the console unless `quiet`),
    keeping an earlier start's folder of the same attempt."""
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, Std

    class KeptLogsSpecs(DefaultLogsSpecs):
        def reify(self, envs: dict[int, dict[str, str]]) -> Any:
            run_dir = getattr(self, "_run_log_dir", None)  # set at the first start (torch 2.13)
            if run_dir and envs:
                keep_aside(os.path.join(run_dir, f"attempt_{envs[0].get('TORCHELASTIC_RESTART_COUNT', '0')}"))
            return super().reify(envs)

    return KeptLogsSpecs(log_dir=log_dir, redirects=Std.ALL, tee=Std.NONE if quiet else Std.ALL)


def keep_aside(folder: str) -> None:
    """Move `folder`, if it exists, to the first free `folder.<k>`."""
    if not os.path.isdir(folder):
        return
    k = 1
    while os.path.exists(f"{folder}.{k}"):
        k += 1
    os.rename(folder, f"{folder}.{k}")
