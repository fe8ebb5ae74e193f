"""Reliability with real ranks: DeepSpeed's launcher, 2 processes over gloo, ZeRO-2 (issue 9)."""

from __future__ import annotations

import subprocess

import torch

from conftest import REPO
from test_launch import deepspeed_bin, launch, launch_env, stage_record, with_own_port


SFT_2_RANKS = ["--num_gpus", "2", "deepspeed=zero2", "train.logging_steps=1", "data.max_rows=128",
               "train.batch_size=8"]


def test_two_ranks_zero2_nan_on_one_rank_skips_the_step_on_both(tmp_path):
    """NaN loss on rank 1 only, steps 3 and 4: DeepSpeed skips those updates on both ranks (its overflow
    flag is all-reduced), align counts them, the weights stay finite; NaN from step 3 on with
    train.max_bad_steps=2 stops the run with exit 3 naming the last good checkpoint."""
    from transformers import AutoModelForCausalLM

    runs = tmp_path / "runs"
    cmd = [deepspeed_bin(), *SFT_2_RANKS[:2], str(REPO / "tests/rank_with_nan_loss.py"), "stage=sft",
           *SFT_2_RANKS[2:], f"run.root={runs}", "train.max_steps=6"]
    launch(cmd, cwd=tmp_path, ALIGN_TEST_NAN_STEPS="3,4", ALIGN_TEST_NAN_RANK="1")
    record = stage_record(runs, stage="sft")
    assert record["distributed"] == {"world_size": 2, "zero_stage": 2}
    assert record["metrics"]["nonfinite_steps_skipped"] == 2
    model = AutoModelForCausalLM.from_pretrained(runs / "demo" / "sft" / "model")
    assert all(torch.isfinite(p).all() for p in model.parameters())

    out = launch([*cmd, "run.name=diverges", "train.max_bad_steps=2", "train.save_steps=2"], cwd=tmp_path,
                 returncode=3, ALIGN_TEST_NAN_STEPS="3+", ALIGN_TEST_NAN_RANK="1")
    assert "2 non-finite steps in a row (train.max_bad_steps=2) at step 4; stopped." in out.stderr
    assert "The last good checkpoint is" in out.stderr and "checkpoint-4" in out.stderr
    assert not (runs / "diverges" / "sft" / "stage.json").exists()


def test_two_ranks_sigterm_on_one_rank_saves_on_both_and_the_same_command_resumes(tmp_path):
    """SIGTERM to rank 1 only: both ranks stop at the same step (the flag is all-reduced), the checkpoint
    is committed, the launcher exits 143; the same command resumes from it and finishes."""
    import signal
    import time

    import psutil

    from align.run import checkpointing
    runs = tmp_path / "runs"
    cmd = ["bash", str(REPO / "launch/sft.sh"), *SFT_2_RANKS, f"run.root={runs}", "train.max_steps=80",
           "train.save_steps=5"]
    proc = subprocess.Popen(with_own_port(cmd), cwd=tmp_path, env=launch_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    checkpoints = runs / "demo" / "sft" / "checkpoints"
    deadline = time.time() + 300
    while checkpointing.latest(checkpoints) is None and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    rank1 = [p for p in psutil.Process(proc.pid).children(recursive=True)
             if any(a.startswith("--local_rank=1") for a in p.cmdline())]
    assert len(rank1) == 1, [p.cmdline() for p in psutil.Process(proc.pid).children(recursive=True)]
    rank1[0].send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 143, stderr[-4000:]
    assert stderr.count("stopped by SIGTERM at step") == 2  # rank 0 stopped too, at the same step
    step = checkpointing.step_of(checkpointing.latest(checkpoints))
    assert 5 < step < 80 and f"stopped by SIGTERM at step {step};" in stderr
    assert not (runs / "demo" / "sft" / "stage.json").exists()

    again = launch(cmd, cwd=tmp_path)
    assert f"checkpoint-{step}" in again.stdout + again.stderr and "resuming from" in again.stdout + again.stderr
    assert stage_record(runs, stage="sft")["metrics"]["global_step"] == 80
