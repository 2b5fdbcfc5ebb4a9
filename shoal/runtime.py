"""The one owner of ranks, devices and process groups.

`init()` reads the environment that `shoal run` (or torchrun) sets; with no
launcher it is a world of one and nothing is initialized. Everything else asks
`current()` instead of reading environment variables or calling
torch.distributed for ranks itself.
"""

from __future__ import annotations

import datetime
import gc
import os
import sys
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from shoal import env, group_callbacks
from shoal.allocator import keep_freed_memory
from shoal.config import check_range, timeout_from_env
from shoal.errors import ShoalError, caused_by_peer
from shoal.supervised import die_with_launcher


@dataclass(frozen=True)
class Runtime:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    backend: str
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_current: Runtime | None = None


def choose_threads(environ: Mapping[str, str], world: int, local_world: int, cpus: int) -> int:
    """torch threads for this worker (0: leave torch's choice): SHOAL_THREADS, else none where the
    user set OMP_NUM_THREADS, else the cores divided among the local workers (not torchrun's 1)."""
    asked = int(environ.get(env.THREADS, "0"))
    if asked > 0 or world <= 1:
        return max(asked, 0)
    if env.OMP_NUM_THREADS in environ and not environ.get(env.THREADS_DEFAULTED):
        return 0
    return max(1, cpus // max(1, local_world))


def init(
    backend: str | None = None, device: str | None = None, timeout_s: float | None = None, threads: int | None = None
) -> Runtime:
    """Join the job's process group (if launched as one) and choose backend and device.

    Defaults come from the environment (SHOAL_BACKEND, SHOAL_DEVICE,
    SHOAL_THREADS, SHOAL_TIMEOUT_S, set by the launcher) and then "auto":
    NCCL and this rank's GPU where CUDA is available, gloo and the CPU otherwise.
    Threads: SHOAL_THREADS, else an OMP_NUM_THREADS the user set, else the
    machine's cores divided among its workers (replacing torchrun's default of 1).
    """
    global _current
    if _current is not None:
        return _current
    die_with_launcher()
    keep_freed_memory()
    environ = os.environ
    rank = int(environ.get("RANK", "0"))
    world = int(environ.get("WORLD_SIZE", "1"))
    local_rank = int(environ.get("LOCAL_RANK", "0"))
    local_world = int(environ.get("LOCAL_WORLD_SIZE", "1"))
    backend = backend or environ.get(env.BACKEND, "auto")
    device_kind = device or environ.get(env.DEVICE, "auto")
    if timeout_s is not None:
        check_range(timeout_s, "timeout_s", low=0, low_open=True)
    timeout = float(timeout_s) if timeout_s is not None else timeout_from_env(environ)

    cuda = torch.cuda.is_available() and torch.cuda.device_count() > 0
    if device_kind == "auto":
        device_kind = "cuda" if cuda else "cpu"
    if device_kind == "cuda":
        if not cuda:
            raise ShoalError("device 'cuda' was asked for but CUDA is not available here; use device = 'cpu' or 'auto'")
        dev = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(dev)
    elif device_kind == "cpu":
        dev = torch.device("cpu")
    else:
        raise ShoalError(f"unknown device {device_kind!r}; use 'auto', 'cpu' or 'cuda'")
    if backend == "auto":
        backend = "nccl" if dev.type == "cuda" else "gloo"
    if backend == "nccl" and dev.type != "cuda":
        raise ShoalError("backend 'nccl' needs CUDA devices; use backend = 'gloo' on the CPU")

    n_threads = threads or choose_threads(environ, world, local_world, os.cpu_count() or 1)
    if n_threads > 0:
        torch.set_num_threads(n_threads)

    if world > 1 and not dist.is_initialized():
        if "MASTER_ADDR" not in environ or "MASTER_PORT" not in environ:
            raise ShoalError(
                "WORLD_SIZE > 1 but MASTER_ADDR/MASTER_PORT are not set; "
                "start the script with `shoal run -n N script.py`"
            )
        kwargs = {}
        if dev.type == "cuda":
            kwargs["device_id"] = dev
        hook = sys.excepthook
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout), **kwargs)
        if environ.get(env.LAUNCHED):
            sys.excepthook = _exit_at_once(hook)  # the launcher prefixes every line with the rank already
    _current = Runtime(rank, world, local_rank, local_world, backend, dev)
    return _current


def _exit_at_once(hook: Callable[..., Any]) -> Callable[..., Any]:
    """`hook`, then, for an error that a dead or hung peer caused (a collective that timed out, a
    connection reset), the process ends at once: tearing down a group whose peer is gone can take
    tens of seconds, and the launcher restarts (or stops) the job only once this process has exited."""

    def excepthook(kind: type[BaseException], error: BaseException, tb: Any) -> None:
        hook(kind, error, tb)
        if caused_by_peer(str(error)):
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(1)

    return excepthook


def current() -> Runtime:
    """The runtime, initializing a single-process one if `init()` was not called."""
    return _current or init()


# Objects that hold the process group and must let go of it before it is
# destroyed: DDP's reducer, destroyed after the group (when the user's model
# goes, at interpreter exit), makes gloo abort the process ("terminate called
# without an active exception", about 1 run in 4 of examples/own_loop.py).
_group_holders: weakref.WeakKeyDictionary[Any, Callable[[Any], None]] = weakref.WeakKeyDictionary()


def release_before_shutdown(holder: Any, release: Callable[[Any], None]) -> None:
    """Have `shutdown()` call `release(holder)` before it destroys the group, if `holder` is still alive then."""
    _group_holders[holder] = release


def shutdown() -> None:
    """Leave the process group; safe to call twice."""
    global _current
    group_callbacks.wait_until_freed()  # the last step's, freed by the group's threads (`shoal.group_callbacks`)
    if dist.is_initialized():
        for holder, release in list(_group_holders.items()):
            release(holder)
        _group_holders.clear()
        gc.collect()  # what was released may sit in reference cycles
        dist.destroy_process_group()
    _current = None


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
