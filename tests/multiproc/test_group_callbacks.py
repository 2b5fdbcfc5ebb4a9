"""`shoal.group_callbacks`: a process that ends while a collective's callback is still running on the
group's thread (or still to be freed there) lets it finish first, through `shoal.shutdown()` or, for a
script that never calls it, at its exit; and exits 0."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.helpers.ranks import run_workers

# A world of one; the callback sleeps on gloo's thread (the GIL let go) while the main thread goes on to
# the end, then says so and needs the GIL again. The group is held (torch holds it once a DDP model was
# made), so that destroying it does not wait for its threads. Not waited for, the callback would wake
# during the interpreter's finalization (made slow here), where taking the GIL ends its thread: it never
# says so, and often the process aborts ("terminate called without an active exception").
LATE = """
import sys, time
import torch, torch.distributed as dist
import shoal
from shoal import group_callbacks
dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
group = dist.group.WORLD
def callback():
    held = [(torch.ones(3),)]  # what a hook's closure holds: freed with it, on gloo's thread
    def late(fut):
        time.sleep(0.3)
        print("callback done", flush=True)
        return held[0][0] + fut.value()[0]
    return late
late = callback()
group_callbacks.after(dist.all_reduce(torch.ones(3), async_op=True), late)
del late
class Slow:  # the interpreter's finalization takes a second (a module's object that is slow to go)
    def __del__(self):
        time.sleep(1.0)
slow = Slow()
if sys.argv[1] == "shutdown":
    shoal.shutdown()
else:
    dist.destroy_process_group()
print("main done", flush=True)
"""


@pytest.mark.parametrize(
    ("how", "said"), [("shutdown", ["callback done", "main done"]), ("exit", ["main done", "callback done"])]
)
def test_a_late_callback_on_the_groups_thread_is_waited_for_and_the_exit_is_clean(how, said):
    done = subprocess.run([sys.executable, "-c", LATE, how], capture_output=True, text=True, timeout=60)
    assert done.stdout.split("\n")[:-1] == said, (done.stdout, done.stderr[-2000:])
    assert done.returncode == 0, done.stderr[-2000:]


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
