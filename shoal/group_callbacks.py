"""Collectives whose futures run callbacks on the process group's own thread, let go of before exit.

Why: a `.then(fn)` on a gloo (or NCCL) work's future runs `fn` on one of the
group's C++ threads, and that thread then frees `fn`, what it holds and the
work with its tensors, which takes the GIL. A thread that takes the GIL once
the interpreter is finalizing is ended (pthread_exit) from inside C++ code
that may not be unwound, and the process aborts: "terminate called without
an active exception", exit code 134, after a job that had finished well. It
happened to the last step's PowerSGD callbacks on a loaded machine (that
thread waited for a core). `destroy_process_group` waits for the group's
threads only when the group goes, and torch itself holds the group after a
DDP model was made. So every such collective goes through `after`: each
callback is counted until the thread has freed it and what it held, the
recent works are kept here, and `shoal.shutdown()` (and, for a script that
never calls it, the exit) waits for the count and then frees the works on
the main thread.
"""

from __future__ import annotations

import atexit
import collections
import gc
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

_alive = 0
_lock = threading.Lock()
_recent: collections.deque[dist.Work] = collections.deque(maxlen=1024)
"""Works not yet seen completed: freed here, on the thread that started them, not by the group's."""


def counted(fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """A callback that calls `fn`, counted as alive until the future that ran it lets it go (a new one
    per call: `fn` itself may live on, as a module's function does)."""
    global _alive

    held = [fn]

    def callback(future: Any) -> Any:
        try:
            return held[0](future)
        finally:
            held.clear()  # `fn` and what it holds go here, while still counted: not after the count is down

    with _lock:
        _alive += 1
    # not run at exit by weakref's own exit hook, which may come before `wait_until_freed`'s
    weakref.finalize(callback, _freed).atexit = False
    return callback


def future_of(work: dist.Work | None) -> torch.futures.Future:
    """The future of a collective started with `async_op=True` (torch types its handle as optional)."""
    assert work is not None, "an async collective returns its handle"
    return work.get_future()


def after(work: dist.Work | None, *steps: Callable) -> torch.futures.Future:
    """The future of a collective started with `async_op=True`, continued by each of `steps` in turn
    (each `counted`)."""
    future = future_of(work)
    while _recent and _recent[0].is_completed():
        _recent.popleft()
    _recent.append(work)  # pyright: ignore[reportArgumentType]  # not None: `future_of` checked
    for step in steps:
        future = future.then(counted(step))
    return future


def _freed() -> None:
    global _alive
    with _lock:
        _alive -= 1


def alive() -> int:
    return _alive


def wait_until_freed(timeout_s: float = 5.0) -> bool:
    """Wait, with the GIL let go, until every counted callback has been freed, then free the recent
    works; False if a callback still lives after `timeout_s` (a collective that never completes: the
    caller goes on regardless, and the works are kept)."""
    start = time.monotonic()
    collected = False
    while _alive > 0:
        waited = time.monotonic() - start
        if waited > timeout_s:
            return False
        if waited > 0.05 and not collected:  # one held only by a reference cycle
            gc.collect()
            collected = True
        time.sleep(0.001)
    _recent.clear()
    return True


atexit.register(wait_until_freed)  # for a script that never calls `shoal.shutdown()`
