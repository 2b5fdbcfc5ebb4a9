"""Pushing gradients during backward (`ParameterServer(overlap=True)`, the default on GPUs) stays right as
users write their loops: parts go out early only when nothing changes the gradients before
`step()`; a loop that clips at every step, or accumulates by hand, pushes at `step()` instead;
one that starts changing gradients after parts went out is stopped in one sentence."""

from __future__ import annotations

import pytest
import torch

from shoal.strategies.parameter_server.overlap import CHANGED
from tests.helpers.ps import run_ps_job
from tests.workers import ps_overlap

STEPS = 4
# 256-byte buckets: the model's 4 KiB weight goes out in parts during backward
STRATEGY = {"consistency": "bsp", "servers": 2, "chunk_bytes": 1024, "overlap": True, "overlap_bytes": 256}


@pytest.mark.parametrize(
    ("loop", "state"), [("plain", "on"), ("no_sync", "on"), ("clip", "off"), ("by_hand", "off"), ("clip_late", None)]
)
def test_loops_that_touch_gradients_equal_one_process_or_stop(loop, state):
    job = run_ps_job(2, 2, ps_overlap.train, {"loop": loop, "steps": STEPS, "strategy": STRATEGY})
    assert job.codes == [0, 0], "\n----\n".join(job.logs)
    if state is None:  # clipping began after parts of step 2 had gone out
        assert [r["step"] for r in job.results] == [2, 2] and all(r["error"] == CHANGED for r in job.results)
        return
    want = ps_overlap.reference(loop, STEPS, world=2)
    for out in job.results:
        assert out["state"] == state
        assert (out["parts"] > 0) == (state == "on"), out["parts"]
        for name, value in want.items():
            torch.testing.assert_close(torch.tensor(out["params"][name]), value, atol=1e-6, rtol=0, msg=name)
