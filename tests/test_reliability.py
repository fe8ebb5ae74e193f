"""Reliability and security: one writer per stage directory; secrets never reach the files a run writes."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from conftest import REPO, compose, child_env

FAST = ["train.max_steps=2", "data.max_rows=64", "train.save_steps=1000"]


def test_a_second_run_on_the_same_stage_is_refused_and_changes_nothing(runs):
    from align.run.handoff import HandoffError
    from align.stages.sft import run

    out = run(compose(f"run.root={runs}", *FAST)).out
    before = json.loads((out / "stage.json").read_text())
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from align.run.lock import StageLock; "
         f"StageLock(Path({str(out)!r})).acquire(); print('held', flush=True); time.sleep(120)"],
        cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(HandoffError, match=rf"being written by another run \(pid {holder.pid} on .*use another run.name"):
            run(compose(f"run.root={runs}", *FAST, "train.lr=1e-3"))
        assert json.loads((out / "stage.json").read_text()) == before  # nothing overwritten
    finally:
        holder.kill()  # SIGKILL: the kernel drops the lock with the process
        holder.wait()
    again = run(compose(f"run.root={runs}", *FAST, "train.lr=1e-3"))
    assert json.loads((again.out / "stage.json").read_text())["output_id"] != before["output_id"]


def test_secrets_never_reach_the_files_a_run_writes(runs, monkeypatch):
    from align.stages.sft import run

    secrets = {"WANDB_API_KEY": "0123456789abcdef0123456789abcdef01234567", "HF_TOKEN": "hf_NotARealTokenButSecret42"}
    for k, v in secrets.items():
        monkeypatch.setenv(k, v)
    out = run(compose(f"run.root={runs}", *FAST, "logger=wandb", "logger.mode=offline")).out
    files = [p for p in runs.rglob("*") if p.is_file()]
    assert any(p.suffix == ".wandb" for p in files) and any(p.name == "stage.json" for p in files)
    for path in files:
        data = path.read_bytes()
        for name, value in secrets.items():
            assert value.encode() not in data, f"{name} leaked into {path}"
    assert json.loads((out / "stage.json").read_text())["metrics"]
    model_files = sorted(p.name for p in (out / "model").iterdir())
    assert "model.safetensors" in model_files and not [n for n in model_files if n.endswith((".bin", ".pt", ".pth"))]


def test_no_unsafe_loading_in_the_code():
    """Pickle-free loading: every torch.load passes weights_only=True; remote code stays off by default."""
    import re

    for path in (REPO / "align").rglob("*.py"):
        for call in re.findall(r"torch\.load\([^)]*\)", path.read_text()):
            assert "weights_only=True" in call, f"{path}: {call}"
    assert compose().model.trust_remote_code is False
    assert all(compose(f"model={m.stem}").model.trust_remote_code is False for m in (REPO / "conf/model").glob("*.yaml"))


# ---- resume, preemption, committed checkpoints, the non-finite guard ----------------------------------

RESUME = ["train.max_steps=6", "train.logging_steps=1", "train.save_steps=2", "data.max_rows=64",
          "train.batch_size=8", "train.keep_checkpoints=2"]
STAGE_KEYS = {"sft": [], "rm": ["stage.init=base"], "dpo": ["stage.init=base"]}


def run_stage(name, runs, *overrides):
    import importlib

    return importlib.import_module(f"align.stages.{name}").run(compose(f"stage={name}", f"run.root={runs}", *overrides))


def losses(out) -> dict:
    from align.run.handoff import read_history

    return {h["step"]: h["loss"] for h in read_history(out) if "loss" in h}


def sigterm_at(monkeypatch, step: int):
    """Deliver a real SIGTERM to this process at the end of `step` (the handler only sets a flag)."""
    import os
    import signal

    from align.run import guards

    original = guards.StopOnSignal.on_step_end

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == step:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, args, state, control, **kwargs)

    monkeypatch.setattr(guards.StopOnSignal, "on_step_end", on_step_end)


@pytest.mark.parametrize("stage", ["sft", "rm", "dpo"])
def test_preempted_then_resumed_run_equals_the_uninterrupted_one(stage, tmp_path, monkeypatch, caplog):
    from align.run import checkpointing
    from align.run.preemption import Preempted

    keys = [*RESUME, *STAGE_KEYS[stage]]
    whole = losses(run_stage(stage, tmp_path / "a", *keys).out)
    assert sorted(whole) == [1, 2, 3, 4, 5, 6]

    runs = tmp_path / "b"
    with monkeypatch.context() as m:
        sigterm_at(m, 3)
        with pytest.raises(Preempted, match=rf"{stage}: stopped by SIGTERM at step 3; checkpoint saved in .*checkpoint-3\. Re-run"):
            run_stage(stage, runs, *keys)
    out = runs / "demo" / stage
    assert not (out / "stage.json").exists()  # an interrupted stage is never handed on
    assert checkpointing.latest(out / "checkpoints").name == "checkpoint-3"
    # a crash in the middle of the next save: a folder without its commit marker, half a file in it
    partial = out / "checkpoints" / "checkpoint-5"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"\x00" * 100)

    with caplog.at_level("INFO", logger="align"):
        resumed = run_stage(stage, runs, *keys)
    assert f"resuming from {out / 'checkpoints' / 'checkpoint-3'}" in caplog.text  # not a start-over
    got = losses(resumed.out)
    assert sorted(got) == [1, 2, 3, 4, 5, 6]
    for step in range(1, 7):
        assert got[step] == pytest.approx(whole[step], rel=1e-5, abs=1e-7), (stage, step)
    kept = [p.name for p in checkpointing.checkpoints(out / "checkpoints")]
    assert kept == ["checkpoint-4", "checkpoint-6"]  # two newest committed; the partial one cleared


def test_checkpoint_commit_and_rotation_rules(tmp_path):
    from align.run import checkpointing
    for step in (2, 4, 6, 8):
        (tmp_path / f"checkpoint-{step}").mkdir()
    for step in (2, 4, 6):
        checkpointing.commit(tmp_path / f"checkpoint-{step}")
    assert checkpointing.latest(tmp_path).name == "checkpoint-6"  # 8 is being written: not yet
    deleted = checkpointing.rotate(tmp_path, keep=1)
    assert sorted(p.name for p in deleted) == ["checkpoint-2", "checkpoint-4"]
    assert [p.name for p in checkpointing.checkpoints(tmp_path)] == ["checkpoint-6", "checkpoint-8"]
    assert json.loads((tmp_path / "checkpoint-6" / checkpointing.COMMITTED).read_text())["step"] == 6


def nan_loss_on(monkeypatch, spec: str):
    """Make the training loss NaN on the optimizer steps `spec` names ("3,4", or "3+": every step from 3)."""
    from trl import SFTTrainer

    from rank_with_nan_loss import nan_compute_loss

    monkeypatch.setattr(SFTTrainer, "compute_loss", nan_compute_loss(spec))


def test_nonfinite_steps_are_skipped_counted_and_stop_the_run_when_in_a_row(runs, monkeypatch):
    from transformers import AutoModelForCausalLM

    from align.run.preemption import TrainingDiverged

    with monkeypatch.context() as m:
        nan_loss_on(m, "3,4")
        out = run_stage("sft", runs, *RESUME).out
    record = json.loads((out / "stage.json").read_text())
    assert record["metrics"]["nonfinite_steps_skipped"] == 2
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    assert all(torch.isfinite(p).all() for p in model.parameters())  # the NaN steps never reached the weights
    assert math.isfinite(losses(out)[5]) and math.isfinite(losses(out)[6])

    with monkeypatch.context() as m:
        nan_loss_on(m, "3+")
        with pytest.raises(TrainingDiverged, match=r"2 non-finite steps in a row \(train.max_bad_steps=2\) at step 4; "
                                                   r"stopped\. Lower train.lr .*checkpoint-4"):
            run_stage("sft", runs, *RESUME, "train.max_bad_steps=2", "train.lr=1e-3")


def test_sigterm_saves_exits_nonzero_and_the_same_command_resumes(tmp_path):
    import signal
    import time

    cmd = [sys.executable, "-m", "align", "stage=sft", "train.max_steps=400", "train.save_steps=1000",
           "data.max_rows=640", "train.logging_steps=50"]
    env = child_env()
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    marker = tmp_path / "runs/demo/sft/checkpoints/.config_hash"
    deadline = time.time() + 120
    while not marker.exists() and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(3)  # into the training loop
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr[-3000:]
    assert "stopped by SIGTERM at step" in stderr and "Re-run the same command to continue" in stderr
    from align.run import checkpointing
    ckpt = checkpointing.latest(tmp_path / "runs/demo/sft/checkpoints")
    assert ckpt is not None and 0 < checkpointing.step_of(ckpt) < 400
    again = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming from runs/demo/sft/checkpoints/{ckpt.name}" in again.stderr
    record = json.loads((tmp_path / "runs/demo/sft/stage.json").read_text())
    assert record["metrics"]["global_step"] == 400


@pytest.fixture(scope="module")
def ppo_parents(tmp_path_factory):
    runs = tmp_path_factory.mktemp("ppo_parents") / "runs"
    sft = run_stage("sft", runs, "train.max_steps=20", "train.batch_size=32").out
    rm = run_stage("rm", runs, "train.max_steps=10", "train.batch_size=32").out
    return [f"stage.actor={sft}", f"stage.reward={rm}"]


PPO_KEYS = ["train.max_steps=4", "train.save_steps=2", "train.batch_size=8", "stage.rollout_batch_size=8",
            "stage.ppo_epochs=2", "stage.eval_prompts=8", "stage.max_new_tokens=8", "train.logging_steps=1"]
PPO_EXACT = ("reward/score_mean", "objective/kl", "loss/policy", "loss/value", "policy/entropy", "response/length")


def test_ppo_preempted_then_resumed_equals_the_uninterrupted_run(ppo_parents, tmp_path, monkeypatch, caplog):
    import os
    import signal

    from align.run import checkpointing
    from align.run.handoff import read_history, read_stage_json
    from align.run.preemption import Preempted
    from align.stages import ppo

    keys = [*PPO_KEYS, *ppo_parents]
    whole_out = run_stage("ppo", tmp_path / "a", *keys).out
    whole = read_history(whole_out)

    runs = tmp_path / "b"
    original, calls = ppo.PPOLoop.step, {"n": 0}

    def step(self, prompts):
        out = original(self, prompts)
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives during step 3: the loop stops after it
        return out

    with monkeypatch.context() as m:
        m.setattr(ppo.PPOLoop, "step", step)
        with pytest.raises(Preempted, match=r"ppo: stopped by SIGTERM at step 3; checkpoint saved in .*checkpoint-3"):
            run_stage("ppo", runs, *keys)
    out = runs / "demo" / "ppo"
    assert not (out / "stage.json").exists()
    assert checkpointing.latest(out / "checkpoints").name == "checkpoint-3"
    with caplog.at_level("INFO", logger="align"):
        resumed = run_stage("ppo", runs, *keys)
    assert "resuming from" in caplog.text and "checkpoint-3 (step 3 of 4)" in caplog.text
    got = read_history(resumed.out)
    assert [h["step"] for h in got] == [1, 2, 3, 4]
    for a, b in zip(whole, got):
        for k in PPO_EXACT:
            assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-6), (a["step"], k)
    m_whole, m_got = read_stage_json(whole_out)["metrics"], read_stage_json(resumed.out)["metrics"]
    for k in ("eval_reward_mean_before", "eval_reward_mean", "eval_greedy_logratio"):
        assert m_got[k] == pytest.approx(m_whole[k], rel=1e-5, abs=1e-6), k


def test_ppo_drops_nonfinite_updates_and_stops_when_they_repeat(ppo_parents, runs, monkeypatch):
    from transformers import AutoModelForCausalLM

    from align.run.preemption import TrainingDiverged
    from align.stages import ppo

    original, calls = ppo.policy_loss, {"n": 0}

    def nan_on(which):
        def policy_loss(*args, **kwargs):
            loss, stats = original(*args, **kwargs)
            calls["n"] += 1
            return (loss * float("nan") if which(calls["n"]) else loss), stats
        return policy_loss

    keys = [*PPO_KEYS, "train.max_steps=2", *ppo_parents]
    with monkeypatch.context() as m:
        m.setattr(ppo, "policy_loss", nan_on(lambda n: n in (2, 3)))
        out = run_stage("ppo", runs, *keys).out
    assert json.loads((out / "stage.json").read_text())["metrics"]["nonfinite_updates_skipped"] == 2
    actor = AutoModelForCausalLM.from_pretrained(out / "model")
    assert all(torch.isfinite(p).all() for p in actor.parameters())

    calls["n"] = 0
    with monkeypatch.context() as m:
        m.setattr(ppo, "policy_loss", nan_on(lambda n: n >= 2))
        with pytest.raises(TrainingDiverged, match=r"ppo: 3 non-finite updates in a row \(train.max_bad_steps=3\)"):
            run_stage("ppo", runs, *keys, "train.max_bad_steps=3")


def test_sigkill_at_any_moment_leaves_a_committed_checkpoint_to_resume_from(tmp_path):
    """kill -9 while the run saves a checkpoint every 5 steps: whatever was being written, the same
    command resumes from the newest committed checkpoint and finishes."""
    import signal
    import time

    from align.run import checkpointing
    cmd = [sys.executable, "-m", "align", "stage=sft", "train.max_steps=200", "train.save_steps=5",
           "train.keep_checkpoints=2", "data.max_rows=640", "train.logging_steps=50"]
    env = child_env()
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    folder = tmp_path / "runs/demo/sft/checkpoints"
    deadline = time.time() + 180
    while (checkpointing.latest(folder) is None or checkpointing.step_of(checkpointing.latest(folder)) < 20) \
            and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.13)  # somewhere in the next steps or saves
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    latest = checkpointing.latest(folder)
    assert latest is not None and checkpointing.step_of(latest) >= 20
    assert not (tmp_path / "runs/demo/sft/stage.json").exists()
    again = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from runs/demo/sft/checkpoints/checkpoint-" in again.stderr
    assert json.loads((tmp_path / "runs/demo/sft/stage.json").read_text())["metrics"]["global_step"] == 200
