"""Parameter-server jobs on real processes: servers started as the launcher
starts them, workers running `tests.workers.ps_tasks.run` on each rank."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from tests.helpers.cli import shoal
from tests.helpers.faults import Faults
from tests.helpers.ps import run_ps_job, server_stats
from tests.helpers.runs import final_params, first_checkpoint_params
from tests.workers import ps_tasks
from tests.workers.ps_tasks import equiv_batch, equiv_model, make_optimizer, schedule, single_process


def _ok(result):
    assert result.codes == [0] * len(result.codes), "\n----\n".join(result.logs)
    assert all(c is None for c in result.server_codes), f"a server exited early: {result.server_codes}"


def run_job(workers: int, servers: int, args: dict, **kw):
    return run_ps_job(workers, servers, ps_tasks.run, args, **kw)


def test_bsp_equals_single_process_with_combined_batch():
    """SGD here; Adam's state on the servers: test_ps_user's BSP test (the same split, against one process)."""
    optim, steps = "sgd", 6
    # 0.weight is 64x16 floats = 4 KiB: with 1 KiB chunks it is split in 4 over both servers
    args = {
        "task": "equiv",
        "optim": optim,
        "steps": steps,
        "params": True,
        "strategy": {"consistency": "bsp", "servers": 2, "chunk_bytes": 1024},
    }
    result = run_job(2, 2, args, before_stop=server_stats)
    _ok(result)
    holders = {s: {k.split("#")[0] for k in h["keys"]} for s, (h, _) in enumerate(result.stats)}
    assert "0.weight" in holders[0] and "0.weight" in holders[1], holders  # the largest tensor is split across servers
    for h, _ in result.stats:
        assert h["bsp_done"] == steps and h["max_gap"] == 0 and not h["dropped"]
        assert set(h["steps"].values()) == {steps}  # one optimizer step per clock, not one per worker
    got = result.arrays()
    want = single_process(optim, steps, world=2)
    moved = max(float(np.abs(want[n] - equiv_model().state_dict()[n].numpy()).max()) for n in want)
    assert moved > 1e-2  # the comparison is not between two untrained models
    for name, value in want.items():
        np.testing.assert_allclose(got[name], value, atol=1e-5, rtol=0, err_msg=name)


@pytest.mark.parametrize("s", [0, 3])  # the bound at 0, and above it
def test_ssp_bounds_how_far_a_worker_runs_ahead(s, tmp_path):
    steps = 12
    args = {
        "task": "linear",
        "steps": steps,
        "strategy": {"consistency": "ssp", "staleness": s, "servers": 1},
    }
    slow = Faults(tmp_path).sleep("worker", rank=1, step="*", seconds=0.15)  # a straggler
    result = run_job(2, 1, args, before_stop=server_stats, env=slow.env())
    _ok(result)
    assert [(f["rank"], f["step"]) for f in slow.fired()] == [(1, step) for step in range(1, steps + 1)]
    ((h, _),) = result.stats
    assert h["pushed"] == [steps, steps]
    gaps = {int(k): v for k, v in h["gaps"].items()}
    # the server's own record: no pull was answered with the asker more than s clocks ahead of the slowest ...
    assert h["max_gap"] <= s, gaps
    # ... and the fast worker did run ahead as far as allowed (rank 1 sleeps 0.15 s per step)
    assert h["max_gap"] == s, gaps


def test_hybrid_asp_group_applies_every_push_bsp_group_averages():
    """With loss = sum of all weights every gradient is 1: a bsp parameter moves lr per
    clock (the workers' average), an asp one lr per push (each worker's own)."""
    steps = 5
    args = {
        "task": "linear",
        "steps": steps,
        "params": True,
        "strategy": {"consistency": "bsp", "overrides": {"1.*": "asp"}, "servers": 1},
    }
    result = run_job(2, 1, args, before_stop=server_stats)
    _ok(result)
    ((h, _),) = result.stats
    assert h["steps"] == {"0.weight": steps, "1.weight": 2 * steps}
    got = result.arrays()
    start = {n: p.detach().numpy() for n, p in ps_tasks.linear_model().named_parameters()}
    np.testing.assert_allclose(start["0.weight"] - got["0.weight"], 0.01 * steps, atol=1e-6)
    np.testing.assert_allclose(start["1.weight"] - got["1.weight"], 0.01 * 2 * steps, atol=1e-6)


def test_shoal_train_starts_and_stops_the_servers(tmp_path):
    result = shoal(
        "train",
        "--strategy.name=parameter_server",
        "--strategy.consistency=ssp",
        "--strategy.staleness=1",
        "--strategy.servers=2",
        "--train.steps=150",
        "--logging.progress=false",
        f"--logging.run_dir={tmp_path}",
        "--model.hidden=[64]",
        timeout=150,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert not result.survivors, "server or worker processes outlived the job"
    (run,) = tmp_path.iterdir()
    assert sorted(p.name for p in (run / "logs").glob("server*.log")) == ["server0.log", "server1.log"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["eval_accuracy"] >= 0.9
    assert "ps_wait_s" in (run / "metrics.jsonl").read_text()
    # the launcher's subscriber recorded the servers' events and the workers' live rows
    events = [json.loads(line) for line in (run / "ps_events.jsonl").read_text().splitlines()]
    assert sum(e["topic"] == "event" and "pieces" in e["message"] for e in events) == 2
    rows = [e for e in events if e["topic"] == "metrics"]
    assert {e["rank"] for e in rows} == {0, 1} and all(e["samples_per_s"] > 0 for e in rows)


def test_stop_and_resume_equals_an_uninterrupted_run_and_loads_as_data_parallel(tmp_path):
    """The servers' values and Adam state, and the workers' top-k error-feedback
    residuals, go into the checkpoint and come back: a stopped and resumed BSP run
    ends bit for bit where an uninterrupted one does, on 2 servers with a split
    tensor. An uncompressed run's checkpoint resumes as data_parallel (no servers)
    and ends where the parameter-server run does."""
    common = [
        f"--logging.run_dir={tmp_path}",
        "--train.steps=12",
        "--checkpoint.every=3",
        "--optimizer.name=adam",
        "--optimizer.lr=0.01",
        "--optimizer.weight_decay=0.01",
        "--optimizer.schedule=cosine",
        "--data.batch_size=16",
        "--model.hidden=[64]",
        "--logging.tensorboard=false",
        "--logging.progress=false",
    ]
    ps = [
        "--strategy.name=parameter_server",
        "--strategy.servers=2",
        "--strategy.chunk_bytes=4096",  # 64x64 floats: split in 4
    ]
    topk = [*ps, "--strategy.compression=topk:0.3"]
    whole = shoal("train", *common, *topk, "--logging.name=whole", timeout=150)
    assert whole.returncode == 0, whole.stderr[-3000:]
    first = shoal("train", *common, *topk, "--logging.name=split", "--train.stop_at=6", timeout=150)
    assert first.returncode == 0, first.stderr[-3000:]
    second = shoal("train", *common, *topk, "--logging.name=split", "--resume", timeout=150)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "step-00000006" in second.stdout

    (want, want_opt), (got, got_opt) = final_params(tmp_path / "whole"), final_params(tmp_path / "split")
    earlier = first_checkpoint_params(tmp_path / "split")
    assert max(float((want[k] - earlier[k]).abs().max()) for k in want) > 1e-2  # it trained
    assert want.keys() == got.keys() and want_opt["state"].keys() == got_opt["state"].keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=0, rtol=0)
    for key in want_opt["state"]:
        assert set(want_opt["state"][key]) == {"step", "exp_avg", "exp_avg_sq"}
        torch.testing.assert_close(got_opt["state"][key], want_opt["state"][key], atol=0, rtol=0)

    plain = shoal("train", *common, *ps, "--logging.name=plain", timeout=150)
    assert plain.returncode == 0, plain.stderr[-3000:]
    as_dp = shoal(
        "train",
        *common,
        "--strategy.name=data_parallel",
        "--logging.name=as-dp",
        f"--checkpoint.resume_from={tmp_path / 'plain' / 'checkpoints' / 'step-00000006'}",
        timeout=150,
    )
    assert as_dp.returncode == 0, as_dp.stderr[-3000:]
    (ps_end, _), (dp_end, _) = final_params(tmp_path / "plain"), final_params(tmp_path / "as-dp")
    for key in ps_end:
        torch.testing.assert_close(dp_end[key], ps_end[key], atol=1e-5, rtol=0)


# One spec per compressor class (bf16 and qsgd:levels=N share fp16's and int8's code;
# benchmarks/compression.py trains every spec on PS-BSP), across the three modes; PowerSGD's
# pushes and pulls equal one process exactly below (its training: the benchmark).
@pytest.mark.parametrize(
    "spec,mode",
    [("fp16", "bsp"), ("int8", "ssp"), ("topk:0.01", "asp"), ("randomk:0.1", "bsp")],
)
def test_compressed_pushes_train_digits(spec, mode):
    """Each compressor class, on pushes and (following them) pulls, trains digits under BSP and
    the asynchronous modes."""
    # random-k's error feedback returns each coordinate in bursts ~1/ratio steps apart,
    # which heavy momentum amplifies: plain SGD, as in the DP test and benchmark
    sgd = {"lr": 0.2, "momentum": 0.0} if spec.startswith("randomk") else {"lr": 0.05, "momentum": 0.9}
    overflow_at = 5 if spec == "fp16" else None  # that step's loss x 1e9: every worker skips it
    args = {
        "task": "digits",
        # top-k at 1% in both directions delays each coordinate twice (two error feedbacks):
        # it reaches the bound later, not lower (docs/benchmarks.md: +0.84 points at 600 steps)
        "steps": 600 if spec.startswith("topk") else 300,
        "params": True,
        "sgd": sgd,
        "overflow_at": overflow_at,
        "strategy": {"consistency": mode, "staleness": 2, "servers": 2, "compression": spec},
    }
    result = run_job(2, 2, args, timeout=150, before_stop=server_stats)
    _ok(result)
    got = result.arrays()
    assert float(got["eval_accuracy"]) >= 0.95, (spec, mode, float(got["eval_accuracy"]))
    assert (
        float(got["m_ps_compression_ratio"])
        >= {
            "fp16": 1.9,
            "bf16": 1.9,
            "int8": 3.5,
            "qsgd:levels=4": 6,
            "topk:0.01": 20,
            "randomk:0.1": 5,
            "powersgd:rank=4": 3,
        }[spec]
    )
    assert float(got["m_ps_pull_compression_ratio"]) >= {"fp16": 1.9, "int8": 3.5, "topk:0.01": 20}.get(spec, 3)
    assert float(got["m_ps_skipped_steps"]) == (1 if overflow_at else 0)
    for h, _ in result.stats:
        assert not h["dropped"] and h["pushed"] == [args["steps"]] * 2 and h["skipped"] == (2 if overflow_at else 0)
        # pulls followed the push spec; evaluate() pulled exact values, the same for both workers
        assert h["pull_encodes"] >= args["steps"] and h["pull_copies"] == 1, h


def single_process_compressed(spec: str, steps: int, world: int, pull: str = "none") -> dict[str, np.ndarray]:
    """One process playing every worker and the server: each worker's gradient goes
    through its own compressor (seeded as the strategy seeds it), is decoded, and the
    decoded gradients are averaged, as the server does before torch's optimizer.
    With `pull`, the workers compute on their own copy of the parameters, which follows
    the server's values by decode(encode(server - copy)) after each step (one encoder,
    used without residuals: the difference is the residual); it returns that copy."""
    from shoal.compress import parse

    model = equiv_model()  # the server's values
    held = equiv_model()  # what every worker holds (all the same under BSP)
    opt = make_optimizer("sgd", model.parameters())
    sched = schedule(opt)
    loss_fn = nn.CrossEntropyLoss()
    coders = [parse(spec) for _ in range(world)]
    for r, c in enumerate(coders):
        c.reseed(1_000 + r)
    puller = parse(pull)
    for step in range(steps):
        total: dict[str, torch.Tensor] = {}
        for r in range(world):
            x, y = equiv_batch(step, r, world)
            held.zero_grad()
            loss_fn(held(x), y).backward()
            for n, p in held.named_parameters():
                payload = coders[r].encode(n, p.grad.detach().clone())
                decoded = coders[r].decode(payload, tuple(p.shape), p.dtype).reshape(-1)
                total[n] = decoded.clone() if n not in total else total[n].add_(decoded)
        for n, p in model.named_parameters():
            p.grad = total[n].div_(world).view_as(p)
        opt.step()
        opt.zero_grad()
        sched.step()
        with torch.no_grad():
            for (n, p), h in zip(model.named_parameters(), held.parameters(), strict=True):
                if pull == "none":
                    h.copy_(p)
                    continue
                payload = puller.encode(n, p - h)
                getattr(puller, "residuals", {}).pop(n, None)
                h.add_(puller.decode(payload, tuple(p.shape), p.dtype))
    return {n: p.detach().numpy() for n, p in held.named_parameters()}


# int8 pushes with whole pulls: stochastic rounding per worker; top-k both ways: error
# feedback on the workers and on the servers; PowerSGD both ways: each worker's low-rank
# gradient, and a low-rank delta with its warm start
@pytest.mark.parametrize(
    "spec,pull", [("int8", "none"), ("topk:0.25", "topk:0.25"), ("powersgd:rank=2", "powersgd:rank=2")]
)
def test_compressed_bsp_equals_one_process_that_compresses_each_workers_gradient(spec, pull):
    """PS-BSP with compression is exactly: encode each worker's gradient, decode, average,
    step; with compressed pulls the workers then add decode(encode(server - their copy)).
    The reference differs from the uncompressed run, so the compressors mattered. Under
    lossy pulls the workers hold bit-identical parameters after every step, and each
    server keeps one copy of what they hold and encodes once per clock."""
    steps = 6
    args = {
        "task": "equiv",
        "optim": "sgd",
        "steps": steps,
        "params": True,
        "digests": True,
        "strategy": {"consistency": "bsp", "servers": 2, "compression": spec, "pull_compression": pull},
    }
    result = run_job(2, 2, args, before_stop=server_stats)
    _ok(result)
    for h, _ in result.stats:
        assert h["bsp_done"] == steps and not h["dropped"] and set(h["steps"].values()) == {steps}
        copies = 0 if pull == "none" else 1
        assert (h["pull_copies"], h["pull_encodes"], h["pull_whole"]) == (copies, steps * copies, 0), h
    assert result.results[0]["digests"] == result.results[1]["digests"] and len(result.results[0]["digests"]) == steps
    got = result.arrays()
    want = single_process_compressed(spec, steps, world=2, pull=pull)
    plain = single_process("sgd", steps, world=2)
    assert max(float(np.abs(want[n] - plain[n]).max()) for n in want) > 1e-6  # compression changed the result
    if pull != "none":
        whole = single_process_compressed(spec, steps, world=2)
        assert max(float(np.abs(want[n] - whole[n]).max()) for n in want) > 1e-6  # so did the pulls'
    for name, value in want.items():
        np.testing.assert_allclose(got[name], value, atol=1e-6, rtol=0, err_msg=name)
