"""The job's secret key, readable without importing torch.

The control-plane members and the launcher need the key but no tensors, so it
lives apart from the tensor codec (`shoal.comm.wire`).
"""

from __future__ import annotations

import os

from shoal import env
from shoal.errors import ShoalError

__all__ = ["job_key"]


def job_key(given: str | bytes | None = None) -> bytes:
    """The job's secret: `given`, else SHOAL_JOB_KEY (set by `shoal run`/`shoal train`)."""
    key = given if given is not None else os.environ.get(env.JOB_KEY, "")
    if isinstance(key, str):
        key = key.encode()
    if len(key) < 16:
        raise ShoalError(
            f"the parameter server needs a job key of at least 16 characters: `shoal run`/`shoal train` set "
            f"{env.JOB_KEY}; for processes you start yourself, set {env.JOB_KEY} to the same secret everywhere"
        )
    return key
