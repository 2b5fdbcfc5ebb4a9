"""`shoal train` and `shoal run` end to end, with real worker processes."""

from __future__ import annotations

import json

import torch

from tests.helpers.cli import finish, shoal, start_shoal
from tests.helpers.procs import Processes, free_port
from tests.helpers.runs import final_params


def test_default_job_reaches_accuracy(tmp_path):
    result = shoal("train", f"--logging.run_dir={tmp_path}", timeout=240)
    assert result.returncode == 0, result.stderr
    run_dir = next(tmp_path.iterdir())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["eval_accuracy"] >= 0.95 and summary["world_size"] == 2
    assert f"test accuracy {summary['eval_accuracy']:.4f}" in result.stdout
    assert str(run_dir) in result.stdout
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert train[-1]["step"] == 300 and {"loss", "samples_per_s", "time"} <= set(train[0])
    assert any(r["kind"] == "eval" for r in records)
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert (run_dir / "config.toml").exists() and (run_dir / "checkpoints" / "step-00000300" / "manifest.json").exists()


def test_stop_and_resume_equals_an_uninterrupted_run_and_a_damaged_checkpoint_is_a_clear_error(tmp_path):
    # dropout (RNG), a cosine schedule, momentum and accumulation all have to survive the restart
    common = [
        f"--logging.run_dir={tmp_path}",
        "--train.steps=20",
        "--checkpoint.every=4",
        "--model.dropout=0.2",
        "--optimizer.schedule=cosine",
        "--strategy.grad_accum=2",
        "--data.batch_size=16",
        "--logging.tensorboard=false",
    ]
    missing = shoal("train", *common, "--logging.name=split", "--resume", timeout=60)
    assert missing.returncode == 2 and "no checkpoint found" in missing.stderr and "Traceback" not in missing.stderr
    whole = shoal("train", *common, "--logging.name=whole")
    assert whole.returncode == 0, whole.stderr
    first = shoal("train", *common, "--logging.name=split", "--train.stop_at=10")
    assert first.returncode == 0, first.stderr
    assert "stopped at step 10" in first.stdout
    second = shoal("train", *common, "--logging.name=split", "--resume")
    assert second.returncode == 0, second.stderr
    assert "resuming from" in second.stdout and "step-00000010" in second.stdout
    (want, want_opt), (got, got_opt) = final_params(tmp_path / "whole"), final_params(tmp_path / "split")
    assert want.keys() == got.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=0, rtol=0)
    for key in want_opt["state"]:
        torch.testing.assert_close(got_opt["state"][key], want_opt["state"][key], atol=0, rtol=0)

    # every kept checkpoint damaged: --resume names the newest one's file and starts no worker
    for ckpt in (tmp_path / "whole" / "checkpoints").iterdir():
        data_file = next(ckpt.glob("*.distcp"))
        raw = bytearray(data_file.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        data_file.write_bytes(bytes(raw))
    newest = next((tmp_path / "whole" / "checkpoints" / "step-00000020").glob("*.distcp"))
    attempts = sorted((tmp_path / "whole" / "logs").iterdir())
    damaged = shoal("train", *common, "--logging.name=whole", "--resume", timeout=60)
    assert damaged.returncode == 2
    assert str(newest) in damaged.stderr and "does not match its checksum" in damaged.stderr
    assert "Traceback" not in damaged.stderr
    assert sorted((tmp_path / "whole" / "logs").iterdir()) == attempts, "no worker may start"


def test_two_machines_on_loopback_train_together(tmp_path):
    endpoint = f"127.0.0.1:{free_port()}"
    args = ["run", "--nnodes", "2", "--rdzv-endpoint", endpoint, "-n", "1", "tests/workers/world.py"]
    with Processes() as procs:
        other = start_shoal(procs, *args[:1], "--node-rank", "1", *args[1:], timeout=180)
        mine = finish(start_shoal(procs, *args[:1], "--node-rank", "0", *args[1:], timeout=120))
        other = finish(other)
    assert mine.returncode == 0 and other.returncode == 0, mine.stderr + other.stderr
    assert "rank 0 of 2 sum 3" in mine.stdout
    assert "rank 1 of 2 sum 3" in other.stdout
