"""A data-parallel `shoal train` job survives a SIGKILLed worker: torch's agent restarts every worker
(`--launch.max_restarts`), they resume from the newest recovery point all ranks have, and the run ends
exactly where the fault-free run ends."""

from __future__ import annotations

import json
import re

import torch

from tests.helpers.cli import shoal
from tests.helpers.faults import Faults
from tests.helpers.runs import final_params

COMMON = [
    "--train.steps=12",
    "--checkpoint.every=4",
    "--model.dropout=0.2",
    "--optimizer.schedule=cosine",
    "--data.batch_size=16",
    "--logging.tensorboard=false",
    "--logging.progress=false",
]


def test_a_worker_killed_mid_run_is_restarted_and_the_run_ends_bit_identical(tmp_path):
    whole = shoal("train", *COMMON, f"--logging.run_dir={tmp_path}", "--logging.name=whole", timeout=60)
    assert whole.returncode == 0, whole.stderr[-3000:]
    faults = Faults(tmp_path).kill("worker", rank=1, step=7)
    args = [*COMMON, f"--logging.run_dir={tmp_path}", "--logging.name=killed", "--launch.max_restarts=1"]
    killed = shoal("train", *args, timeout=60, env=faults.env())
    assert killed.returncode == 0, killed.stderr[-3000:]
    faults.assert_fired("worker", 1, 7, "kill")  # once: the redone step 7 does not fire it again
    assert not killed.survivors
    # the agent restarted the workers once; they resumed at the recovery point of step 5 (checkpoints: 4, 8, 12)
    assert re.search(r"\[rank0\]: shoal: restart 1: resuming at step 5 from recovery point 5", killed.stdout)
    records = [json.loads(line) for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["restart"] for r in records if r["kind"] == "restart"] == [1]
    (want, want_opt), (got, got_opt) = final_params(tmp_path / "whole"), final_params(tmp_path / "killed")
    assert want.keys() == got.keys() and want_opt["state"].keys() == got_opt["state"].keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=0, rtol=0)
    for key in want_opt["state"]:
        torch.testing.assert_close(got_opt["state"][key], want_opt["state"][key], atol=0, rtol=0)


def test_exhausted_restarts_stop_the_job_with_one_sentence_naming_the_checkpoint(tmp_path):
    faults = Faults(tmp_path).kill("worker", rank=1, step=3).kill("worker", rank=0, step=6)
    args = [*COMMON, f"--logging.run_dir={tmp_path}", "--logging.name=r", "--launch.max_restarts=1"]
    result = shoal("train", *args, timeout=60, env=faults.env())
    assert result.returncode == 1, result.stderr[-3000:]
    faults.assert_fired("worker", 1, 3, "kill")
    faults.assert_fired("worker", 0, 6, "kill")
    assert not result.survivors, f"processes outlived the job: {result.survivors}"
    last = result.stderr.strip().splitlines()[-1]
    ckpt = tmp_path / "r" / "checkpoints" / "step-00000004"
    assert re.fullmatch(
        r"shoal: worker rank 0 was killed by SIGKILL.*; the workers were restarted 1 time\(s\), all that "
        rf"--max-restarts allows; resume from its newest checkpoint '{re.escape(str(ckpt))}' with --resume "
        r"--logging.name=r",
        last,
    ), last
