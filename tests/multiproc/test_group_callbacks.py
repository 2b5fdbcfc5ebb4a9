"""`shoal.group_callbacks`: a process that ends while a collective's callback is still running (or still to be
freed) on the group's thread exits 0, through `shoal.shutdown()` or without it, instead of aborting."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.helpers.ranks import run_workers

# A world of one; the callback sleeps on gloo's thread (the GIL let go) while the main thread goes on to
# the end, and then needs the GIL again; the group is held (as a hook's closure holds it), so that
# destroying it does not wait for its threads.
LATE = """
import sys, time
import torch, torch.distributed as dist
import shoal
from shoal import group_callbacks
dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
if sys.argv[1] != "shutdown":
    import atexit; atexit.register(group_callbacks.wait_until_freed)  # what shoal.init() registers
group = dist.group.WORLD
def callback():
    held = [(torch.ones(3),)]  # what a hook's closure holds: freed with it, on gloo's thread
    def late(fut):
        time.sleep(0.3)
        return held[0][0] + fut.value()[0]
    return late
work = dist.all_reduce(torch.ones(3), async_op=True)
late = callback()
future = work.get_future().then(late) if sys.argv[1] == "uncounted" else group_callbacks.after(work, late)
del late, work
class Slow:  # the interpreter's finalization takes a second (a module's object that is slow to go)
    def __del__(self):
        time.sleep(1.0)
slow = Slow()
if sys.argv[1] == "shutdown":
    shoal.shutdown()
else:
    dist.destroy_process_group()
print("done", flush=True)
"""


@pytest.mark.parametrize(("how", "ends_well"), [("shutdown", True), ("exit", True), ("uncounted", False)])
def test_a_late_callback_on_the_groups_thread_does_not_abort_the_exit(how, ends_well):
    """The case "uncounted" (torch's `.then` alone) shows the crash this prevents: SIGABRT, "terminate
    called without an active exception" (torch 2.13, Python 3.11), or now and then SIGSEGV."""
    done = subprocess.run([sys.executable, "-c", LATE, how], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "done", done.stderr[-2000:]
    assert (done.returncode == 0) if ends_well else (done.returncode < 0), (done.returncode, done.stderr[-2000:])


SPECS = ["powersgd:rank=2", "fp16", "topk:0.3", "int8"]  # each of the hooks' exchanges


def last_steps_then_shutdown(rank, world):
    """Per spec, three steps (PowerSGD compresses from its third on), the model and strategy still held:
    the last step's works are kept; `group_callbacks.wait_until_freed` (the first thing `shoal.shutdown()`
    does) finds every callback freed, and frees the works. Then `shoal.shutdown()` itself."""
    import torch

    import shoal
    from shoal import group_callbacks
    from shoal.data.digits import Digits
    from shoal.models.mlp import MLP

    split = Digits().load(seed=0)
    x, y = split.train.tensors[0][:8], split.train.tensors[1][:8]
    out = {}
    held = []
    for spec in SPECS:
        torch.manual_seed(0)
        strategy = shoal.DataParallel(compression=spec)
        model = MLP().build(split.input_shape, split.num_classes)
        model, opt = strategy.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
        for _ in range(3):
            strategy.train_step(model, opt, torch.nn.functional.cross_entropy, (x, y))
        held.append((strategy, model, opt))
        kept = len(group_callbacks._recent)
        freed = group_callbacks.wait_until_freed()
        out[spec] = {
            "kept": kept > 0,
            "freed": freed,
            "alive": group_callbacks.alive(),
            "left": len(group_callbacks._recent),
        }
    shoal.shutdown()
    return out


def test_shutdown_waits_for_the_last_steps_callbacks_and_frees_its_works():
    for res in run_workers(last_steps_then_shutdown, world=2, timeout_s=90):
        assert res == {spec: {"kept": True, "freed": True, "alive": 0, "left": 0} for spec in SPECS}, res
