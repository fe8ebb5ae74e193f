"""The engine/trainer mismatch and its correction (align/rl/mismatch.py) against hand-computed values, the weighted
clipped surrogate, and the policy's weights as one dense checkpoint (align/rl/weights.py) for full, LoRA and QLoRA
models: loaded into a plain transformers model they give the PEFT model's own logits."""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf

from align.rl.losses import clipped_surrogate
from align.rl.mismatch import correction, is_weights, mismatch_stats

L = math.log
# row 0: ratios pi_train / pi_engine of 2 and 1/2 (sequence ratio 1); row 1: 4 and 1 (sequence ratio 4)
TRAIN = torch.tensor([[L(0.5), L(0.2), 0.0], [L(0.8), L(0.3), L(0.9)]])
ENGINE = torch.tensor([[L(0.25), L(0.4), -5.0], [L(0.2), L(0.3), L(0.1)]])
MASK = torch.tensor([[1, 1, 0], [1, 1, 0]])


def test_mismatch_stats_by_hand():
    s = mismatch_stats(TRAIN[:1], ENGINE[:1], MASK[:1])
    assert s["mismatch/ratio_mean"] == pytest.approx(1.25)
    assert s["mismatch/ratio_min"] == pytest.approx(0.5) and s["mismatch/ratio_max"] == pytest.approx(2.0)
    # k3 = r - 1 - log r: (2 - 1 - ln 2 + 0.5 - 1 + ln 2) / 2 = 0.25
    assert s["mismatch/kl"] == pytest.approx(0.25)
    assert s["mismatch/abs_logp_diff_max"] == pytest.approx(L(2))
    same = mismatch_stats(TRAIN, TRAIN, MASK)
    assert same["mismatch/kl"] == 0 and same["mismatch/abs_logp_diff_max"] == 0  # the padded position is not read


def test_token_tis_truncates_each_token_at_the_cap():
    w = is_weights(TRAIN, ENGINE, MASK, "token_tis", token_cap=1.5, seq_bound=2.0)
    torch.testing.assert_close(w, torch.tensor([[1.5, 0.5, 0.0], [1.5, 1.0, 0.0]]))
    assert is_weights(TRAIN, ENGINE, MASK, "none", 1.5, 2.0) is None
    with pytest.raises(ValueError, match="rollout.is_correction must be one of none, token_tis, seq_mask"):
        is_weights(TRAIN, ENGINE, MASK, "tis", 1.5, 2.0)


def test_seq_mask_leaves_out_answers_past_the_bound():
    w = is_weights(TRAIN, ENGINE, MASK, "seq_mask", token_cap=1.5, seq_bound=2.0)
    # row 0: prod of ratios = 1, inside [1/2, 2]: weight 1 on its tokens; row 1: 4 > 2: left out
    torch.testing.assert_close(w, torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]]))
    wide = is_weights(TRAIN, ENGINE, MASK, "seq_mask", token_cap=1.5, seq_bound=5.0)
    torch.testing.assert_close(wide[1], torch.tensor([4.0, 4.0, 0.0]))
    cfg = OmegaConf.create({"is_correction": "seq_mask", "is_token_cap": 1.5, "is_seq_bound": 2.0})
    _, kept, stats = correction(TRAIN, ENGINE, MASK, cfg)
    assert kept.tolist() == [True, False] and stats["mismatch/masked_share"] == pytest.approx(0.5)
    cfg.is_correction = "token_tis"
    _, kept, stats = correction(TRAIN, ENGINE, MASK, cfg)
    assert kept.tolist() == [True, True] and stats["mismatch/masked_share"] == 0.0


def test_weights_scale_each_tokens_term_of_the_clipped_surrogate():
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    adv, mask = torch.tensor([[1.0, -1.0]]), torch.ones(1, 2)
    plain, _ = clipped_surrogate(logp, logp.detach(), adv, mask, 0.2, 0.2)
    assert float(plain) == pytest.approx(0.0)  # ratio 1: -(1) + -(-1) over 2 tokens
    weighted, _ = clipped_surrogate(logp, logp.detach(), adv, mask, 0.2, 0.2, weights=torch.tensor([[2.0, 0.0]]))
    assert float(weighted) == pytest.approx(-1.0)  # (-1 * 2 + 1 * 0) / 2
    weighted.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-1.0, 0.0]]))  # the weight is not differentiated


@pytest.mark.parametrize("method", ["none", "lora", "qlora"])
def test_full_weights_load_into_plain_transformers_with_the_same_logits(method, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    from align.models.loading import load_causal_lm
    from align.models.tiny import tiny_model_dir
    from align.rl.weights import full_weights
    from conftest import compose

    cfg = compose("stage=grpo", f"peft={method}")
    model = load_causal_lm(str(tiny_model_dir()), cfg.model, cfg.peft)
    if method != "none":  # a trained adapter: B is zero at the start
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn_like(p) * 0.05)
    model.eval()
    plain = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir()), dtype=torch.float32)
    with torch.no_grad():
        for p in plain.parameters():
            p.zero_()
    weights = dict(full_weights(model, torch.float32))
    assert all("lora" not in k and "base_layer" not in k for k in weights)
    missing, unexpected = plain.load_state_dict(weights, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)  # tied to the embedding
    ids = torch.tensor([tiny_tokenizer("the quick brown fox", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        want, got = model(input_ids=ids).logits.float(), plain(input_ids=ids).logits.float()
    # QLoRA: the engine serves the dequantised weights; the 4-bit kernels compute with the same numbers
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4 if method == "qlora" else 1e-5)


def test_auto_samples_with_transformers_without_a_gpu_and_vllm_is_refused_where_it_is_missing(monkeypatch):
    from align.config.rules import problems
    from align.rl import vllm_engine
    from conftest import compose

    monkeypatch.setattr(vllm_engine, "installed", lambda: False)
    assert vllm_engine.resolve("auto") == "hf" and vllm_engine.resolve("vllm") == "vllm"
    assert not any("vLLM" in p for p in problems(compose("stage=grpo")))  # the default, auto: hf here
    found = problems(compose("stage=grpo", "rollout.engine=vllm"))
    assert any("rollout.engine=vllm needs vLLM: pip install 'align[vllm]'" in p and "rollout.engine=hf" in p
               for p in found), found
    monkeypatch.setattr(vllm_engine, "installed", lambda: True)
    monkeypatch.setenv("WORLD_SIZE", "3")
    found = problems(compose("stage=ppo", "rollout.engine=vllm", "rollout.tensor_parallel_size=2"))
    assert any("rollout.tensor_parallel_size=2 must divide the number of ranks (3)" in p for p in found), found
    assert problems(compose("stage=dpo", "rollout.engine=vllm")) == []  # an offline stage does not read the group


def test_the_rollout_group_counts_in_the_identity_of_the_stages_that_sample_only():
    from align.run.handoff import config_hash
    from conftest import compose

    for stage, counts in (("grpo", True), ("ppo", True), ("dpo", False), ("sft", False)):
        a = config_hash(compose(f"stage={stage}"))
        b = config_hash(compose(f"stage={stage}", "rollout.is_token_cap=3"))
        assert (a != b) is counts, stage
