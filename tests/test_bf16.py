"""bf16, the dtype of every GPU run (`model.dtype=auto` there), on the CPU: every stage with full, LoRA and QLoRA
weights trains a few steps in bf16 over parents trained the same way, its losses and RL statistics finite and its
output saved in bf16; log-probs, losses and RL statistics are float32 (issue 32: a QLoRA reward model crashed in
bf16 — "expected m1 and m2 to have the same dtype" in the score head — and the suite had only ever run fp32)."""

from __future__ import annotations

import math
import shutil

import pytest
import torch

from test_ppo import run_stage

BF16 = ("model.dtype=bf16", "train.batch_size=8", "data.max_rows=64", "train.logging_steps=1", "train.lr=1e-3")
ONLINE = ("train.max_steps=2", "stage.max_new_tokens=6", "stage.eval_prompts=8")
STAGE_ARGS = {
    "dpo": ("train.max_steps=2",),
    "ppo": (*ONLINE, "stage.rollout_batch_size=8", "stage.ppo_epochs=1"),
    "grpo": (*ONLINE, "stage.rollout_batch_size=4", "stage.group_size=2", "stage.beta=0.05", "reward=python",
             "reward.fn=tests.rewards_for_tests:length"),
    "eval": ("stage.prompts=8", "stage.max_new_tokens=6", "stage.batch_size=8"),
}


def finite(metrics: dict, *keys: str) -> None:
    for key in keys:
        assert key in metrics and math.isfinite(metrics[key]), (key, metrics.get(key))


def saved_dtypes(out) -> set:
    from safetensors.torch import load_file

    model = out / "model"
    path = model / ("adapter_model.safetensors" if (model / "adapter_config.json").is_file() else "model.safetensors")
    return {t.dtype for t in load_file(str(path)).values()}


@pytest.fixture(scope="module", params=["none", "lora", "qlora"])
def bf16_run(request, tmp_path_factory):
    """(peft, runs, sft result, rm result): sft and rm trained in bf16 with that kind of weights."""
    peft = request.param
    runs = tmp_path_factory.mktemp(f"bf16-{peft}") / "runs"
    sft = run_stage("sft", runs, *BF16, f"peft={peft}", "train.max_steps=3")
    rm = run_stage("rm", runs, *BF16, f"peft={peft}", "train.max_steps=3")
    return peft, runs, sft, rm


def test_sft_and_rm_train_and_save_in_bf16(bf16_run):
    peft, runs, sft, rm = bf16_run
    for result in (sft, rm):
        finite(result.metrics, "first_loss", "last_loss")
    finite(rm.metrics, "eval_accuracy", "reward_mean", "reward_std")
    if peft == "none":  # full weights in the dtype they trained in
        assert saved_dtypes(sft.out) == {torch.bfloat16} and saved_dtypes(rm.out) == {torch.bfloat16}
    elif peft == "qlora":  # adapters and the RM's score head in float32, as the 4-bit base's norms hand them float32
        assert saved_dtypes(rm.out) == {torch.float32}


@pytest.mark.parametrize("stage", ["dpo", "ppo", "grpo", "eval"])
def test_every_stage_over_bf16_parents_runs_in_bf16(bf16_run, stage, tmp_path):
    peft, runs, _, _ = bf16_run
    mine = tmp_path / "runs"
    shutil.copytree(runs, mine)
    result = run_stage(stage, mine, *BF16, f"peft={peft}", *STAGE_ARGS[stage])
    m = result.metrics
    if stage == "dpo":
        finite(m, "first_loss", "last_loss")
    elif stage == "ppo":
        finite(m, "loss/policy", "loss/value", "objective/kl", "reward/score_mean", "eval_reward_mean")
    elif stage == "grpo":
        finite(m, "loss/policy", "objective/kl", "reward/total_mean", "eval_greedy_logratio")
    else:
        finite(m, "sft/checker_accuracy", "sft/kl", "sft/win_rate", "sft/reward_mean")
    if stage in ("dpo", "ppo", "grpo") and peft == "none":
        assert saved_dtypes(result.out) == {torch.bfloat16}


def test_log_probs_of_a_bf16_model_are_float32_and_match_the_float32_computation():
    """The policy runs in bf16; its log-probs (and so the ratios, KL and losses built on them) come out float32:
    the logits are cast before the log-softmax. Equal within bf16 rounding of the logits to the same model's
    float32 forward (measured: 0.04 nats at most on the tiny model)."""
    from transformers import AutoModelForCausalLM

    from align.models.tiny import tiny_model_dir
    from align.rl.rollout import Batch, response_logprobs

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir(), dtype=torch.bfloat16).eval()
    g = torch.Generator().manual_seed(0)
    queries, responses = torch.randint(5, 200, (3, 6), generator=g), torch.randint(5, 200, (3, 5), generator=g)
    batch = Batch(queries, torch.ones_like(queries), responses, torch.ones_like(responses), torch.ones(3, dtype=torch.bool))
    with torch.no_grad():
        logp, entropy = response_logprobs(model, batch, with_entropy=True)
        ref, _ = response_logprobs(model.float(), batch, with_entropy=True)
    assert logp.dtype == torch.float32 and entropy.dtype == torch.float32
    torch.testing.assert_close(logp, ref, rtol=0, atol=0.1)
