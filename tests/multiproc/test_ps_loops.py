"""Real scripts' loops under the parameter server (issue 10): mnist's Adadelta runs
on the servers and equals one process under BSP, with `grad_accum` (Adam and SGD on
the servers: test_ps_user, test_ps_jobs); minGPT's own snapshot/resume through `optimizer.state_dict()`, and
`strategy.full_state_dict`/`load_full_state_dict`, equal the run that was never
interrupted; `torch.save(model)` works; a hand-written
update (word_language_model) stops the job in one sentence."""

from __future__ import annotations

import numpy as np
import torch

from tests.helpers.ps import run_ps_job
from tests.workers import ps_loops

STRATEGY = {"consistency": "bsp", "servers": 2, "chunk_bytes": 1024}  # parameters split over both servers


def _ok(job):
    assert job.codes == [0] * len(job.codes), "\n----\n".join(job.logs)


def _same(got: dict, want: dict, atol: float, what: str = "", rtol: float = 0.0):
    assert got.keys() == want.keys(), what
    for name in want:
        got_, want_ = np.asarray(got[name]), np.asarray(want[name])
        np.testing.assert_allclose(got_, want_, atol=atol, rtol=rtol, err_msg=what + name)


def test_torch_optimizers_run_on_the_servers_and_equal_one_process():
    optim, accum, steps = "adadelta", 2, 4
    job = run_ps_job(2, 2, ps_loops.train, {"optim": optim, "steps": steps, "grad_accum": accum, "strategy": STRATEGY})
    _ok(job)
    model, opt = ps_loops.reference(optim, steps, world=2, accum=accum)
    want = {n: p.detach().numpy() for n, p in model.named_parameters()}
    names = {id(p): n for n, p in model.named_parameters()}
    want_state = {names[id(p)]: {k: v.numpy() for k, v in s.items()} for p, s in opt.state.items()}
    for rank, out in enumerate(job.results):
        _same(out["params"], want, 1e-5, f"rank {rank} params ")
        _same(out["full_model"], want, 1e-5, f"rank {rank} full_state_dict model ")
        assert out["full_state"].keys() == want_state.keys()
        for name, state in want_state.items():
            _same(out["full_state"][name], state, 1e-5, f"rank {rank} optimizer state of {name}: ", rtol=1e-4)
        assert out["full_groups"] == [list(want)]


def test_mingpt_snapshot_resume_equals_the_uninterrupted_run(tmp_path):
    steps, save_at = 6, 3
    path, whole, full = str(tmp_path / "snapshot.pt"), str(tmp_path / "model.pt"), str(tmp_path / "full.pt")
    args = {"steps": steps, "save_at": save_at, "path": path, "full_path": full, "strategy": STRATEGY}
    args["whole_model"] = whole
    straight = run_ps_job(2, 2, ps_loops.snapshot, args)
    _ok(straight)
    assert straight.results[0]["saved_moments"] == 3 * 4  # step, exp_avg, exp_avg_sq of 4 parameters
    assert straight.results[0]["whole_model_same"] is True
    saved = torch.load(path)
    model, opt = ps_loops.reference("adamw", save_at, world=2)
    for i, p in enumerate(model.parameters()):  # what the servers held at the snapshot, in torch's format
        for key, value in opt.state[p].items():
            np.testing.assert_allclose(saved["OPTIMIZER_STATE"]["state"][i][key], value, atol=1e-6, err_msg=key)
    model, _ = ps_loops.reference("adamw", steps, world=2, start=save_at, model=model, opt=opt)
    want = {n: p.detach().numpy() for n, p in model.named_parameters()}
    _same(straight.results[0]["params"], want, 1e-5, "uninterrupted vs one process: ")

    for how in ({"resume": path}, {"resume_full": full, "start": save_at}):
        resumed = run_ps_job(2, 2, ps_loops.snapshot, {"steps": steps, **how, "strategy": STRATEGY})
        _ok(resumed)
        for rank in (0, 1):
            _same(resumed.results[rank]["params"], straight.results[0]["params"], 1e-6, f"rank {rank} {how}: ")


def test_a_hand_written_update_stops_the_job_in_one_sentence():
    job = run_ps_job(2, 1, ps_loops.hand_update, {"steps": 3, "strategy": {"servers": 1}})
    assert job.codes[0] != 0 and job.codes[1] != 0, "\n----\n".join(job.logs)
    for log in job.logs:
        assert "the model's parameters changed outside optimizer.step()" in log, log[-3000:]
