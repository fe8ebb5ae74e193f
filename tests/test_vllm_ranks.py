"""Rollouts on vLLM through the stages as runs use them (the environment with vLLM, as test_vllm.py): on 2 ranks
under ZeRO-2 and ZeRO-3 with full, LoRA and QLoRA policies every step's rollout, sampled by the engine, is scored by
the trainer with the same log-probs; PPO on vLLM raises the reward model's score on held-out prompts."""

from __future__ import annotations

import shutil

import pytest
import vllm  # noqa: F401  (this file's environment must have it)

from conftest import REPO
from test_ppo import run_stage
from test_vllm import GRPO, SYNCED, VLLM, history

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    runs = tmp_path_factory.mktemp("vllm_ranks") / "runs"
    run_stage("sft", runs, "train.max_steps=250", "train.batch_size=32")  # test_ppo's shorter SFT
    return runs


# ZeRO-2 with one engine over both ranks (tensor parallel 2: the ranks submit their prompts together); ZeRO-3
# LoRA with the loop's whole-model gathers off, so the sync gathers module by module (rl/weights.py)
@pytest.mark.parametrize("zero,method,gathers,tp", [("zero2", "none", "auto", 2), ("zero3", "lora", "off", 1),
                                                    ("zero3", "qlora", "auto", 1)])
def test_two_ranks_sample_with_the_weights_they_train(sft_run, tmp_path, zero, method, gathers, tp):
    from test_launch import launch

    shutil.copytree(sft_run / "demo" / "sft", tmp_path / "demo" / "sft")
    launch(["bash", str(REPO / "launch/grpo.sh"), "--num_gpus", "2", f"deepspeed={zero}", f"peft={method}",
            f"run.root={tmp_path}", "train.max_steps=2", "train.lr=3e-3", *GRPO, "train.batch_size=8",
            "stage.rollout_batch_size=4", f"stage.gather_for_step={gathers}", f"stage.gather_for_rollout={gathers}",
            f"rollout.tensor_parallel_size={tp}", *VLLM], REPO)
    steps = history(tmp_path / "demo" / "grpo")
    assert len(steps) == 2
    for h in steps:  # sampled on the engine, scored by the trainer: the same weights, before and after an update
        assert h["mismatch/abs_logp_diff_max"] < SYNCED, steps
        assert h["policy/approx_kl"] >= 0 and h["time/sync_s"] > 0


def test_ppo_on_vllm_raises_the_reward(sft_run, tmp_path):
    from test_ppo import PPO

    shutil.copytree(sft_run / "demo" / "sft", tmp_path / "demo" / "sft")
    run_stage("rm", tmp_path, "stage.init=base", "train.max_steps=250", "train.batch_size=32", "train.lr=2e-3")
    result = run_stage("ppo", tmp_path, *PPO[1:], *VLLM)
    m = result.metrics
    assert m["eval_reward_mean"] > m["eval_reward_mean_before"] + 0.1, m  # as test_ppo asks of the hf engine
    assert m["first_objective/kl"] == pytest.approx(0.0, abs=1e-4)  # step 1 samples from the reference itself
    assert max(h["mismatch/abs_logp_diff_max"] for h in history(result.out)) < SYNCED
