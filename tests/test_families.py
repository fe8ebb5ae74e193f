"""The scoring contract on fixtures shaped like Qwen (ChatML), Llama 3, Mistral and a base model with no chat
template (tests/families.py): a response is scored at its end-of-turn token in RM training, PPO and eval alike;
BOS appears exactly once; with pad = EOS the end-of-turn EOS stays in the labels; LoRA stages chain into the RM."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import compose
from families import FAMILIES, build

ROW = {"messages": [{"role": "user", "content": "reverse: abc"}, {"role": "assistant", "content": "cba"}]}
PAIR = {"prompt": [{"role": "user", "content": "upper: abc"}],
        "chosen": [{"role": "assistant", "content": "ABC"}], "rejected": [{"role": "assistant", "content": "ABc"}]}


@pytest.fixture(scope="session")
def family_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {f: build(f, root / f) for f in FAMILIES}


def tokenizer_of(path):
    from align.models.loading import load_tokenizer

    return load_tokenizer(str(path), compose().model)


@pytest.mark.parametrize("family", FAMILIES)
def test_encoded_rows_end_at_the_turn_end_with_one_bos(family, family_dirs):
    from align.data.chat import encode_chat, encode_pair, encode_prompt, encode_prompt_completions, end_of_turn_ids
    from align.rl.rollout import stop_token_ids

    tok = tokenizer_of(family_dirs[family])
    turn_end = end_of_turn_ids(tok)
    expected_end = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>", "mistral": "</s>", "base": "</s>"}[family]
    assert tok.convert_tokens_to_ids(expected_end) in turn_end
    assert set(turn_end) <= set(stop_token_ids(tok, []))  # PPO and eval stop where the RM scores

    pair = encode_pair(tok, PAIR, 256)
    for key in ("chosen_ids", "rejected_ids"):
        assert tok.convert_ids_to_tokens(pair[key][-1]) == expected_end, (family, tok.decode(pair[key][-3:]))
    chat = encode_chat(tok, ROW["messages"], 256)
    supervised = [i for i, lab in zip(chat["input_ids"], chat["labels"]) if lab != -100]
    assert tok.convert_ids_to_tokens(supervised[-1]) == expected_end  # the end of turn is learned, pad = EOS or not

    dpo = encode_prompt_completions(tok, PAIR, 256)
    sequences = [chat["input_ids"], pair["chosen_ids"], encode_prompt(tok, PAIR["prompt"]), dpo["prompt_ids"] + dpo["chosen_ids"]]
    bos = tok.bos_token_id
    for ids in sequences:
        assert ids.count(bos) == (1 if family in ("llama3", "mistral", "base") else 0), (family, tok.decode(ids))
        if bos is not None:
            assert ids[0] == bos


def test_pad_equal_to_eos_keeps_the_final_eos_in_the_batch_labels(family_dirs):
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from align.data.chat import encode_chat

    tok = tokenizer_of(family_dirs["llama3"])
    assert tok.pad_token_id == tok.eos_token_id  # the family ships no pad token
    short = encode_chat(tok, ROW["messages"], 256)
    longer = encode_chat(tok, [ROW["messages"][0], {"role": "assistant", "content": "cba cba cba"}], 256)
    batch = DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id)([short, longer])
    n = len(short["input_ids"])
    assert batch["labels"][0, n - 1].item() == tok.eos_token_id  # the turn's EOS: learned
    assert (batch["labels"][0, n:] == -100).all()  # the padding after it: not


@pytest.mark.parametrize("family", ["chatml", "llama3"])
def test_rm_accuracy_in_stage_json_is_measured_at_the_end_of_turn(family, family_dirs, runs):
    """Trained by align, then re-scored independently: each held-out sequence alone (no padding), the plain
    transformers classifier reading its last token, which is the end-of-turn token."""
    from transformers import AutoModelForSequenceClassification

    from align.data.loader import preference_datasets
    from align.stages.rm import run

    cfg = compose("stage=rm", f"run.root={runs}", f"model.name_or_path={family_dirs[family]}", "stage.init=base",
                  "train.max_steps=30", "data.max_rows=256", "train.lr=3e-3", "train.max_length=128")
    out = run(cfg).out
    info = json.loads((out / "stage.json").read_text())
    tok = tokenizer_of(out / "model")
    _, eval_ds, _ = preference_datasets(cfg.data, tok, cfg.train.max_length, cfg.train.seed)
    model = AutoModelForSequenceClassification.from_pretrained(out / "model").eval()
    model.config.pad_token_id = None  # one unpadded sequence at a time: the last token is scored
    right = 0
    with torch.no_grad():
        for chosen, rejected in zip(eval_ds["chosen_ids"], eval_ds["rejected_ids"]):
            assert tok.convert_ids_to_tokens(chosen[-1]) == tok.eos_token
            r = [model(input_ids=torch.tensor([ids])).logits[0, 0].item() for ids in (chosen, rejected)]
            right += r[0] > r[1]
    assert info["metrics"]["eval_accuracy"] == pytest.approx(right / len(eval_ds), abs=1e-6)
    assert info["metrics"]["eval_accuracy"] > 0.55  # it learned something, at the position it is read


def test_lora_sft_then_lora_rm_builds_the_rm_on_the_merged_sft(family_dirs, runs):
    """The real recipes' path: a LoRA reward model on a LoRA SFT (used to fail loading the causal-LM adapter
    onto the classifier). The RM starts from exactly the SFT's merged weights."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from align.models.loading import load_merged
    from align.stages import rm, sft

    common = [f"run.root={runs}", f"model.name_or_path={family_dirs['llama3']}", "peft=lora", "train.max_steps=3",
              "data.max_rows=64", "train.max_length=128", "train.lr=1e-2"]
    sft_out = sft.run(compose("stage=sft", *common)).out
    rm_out = rm.run(compose("stage=rm", *common)).out
    info = json.loads((rm_out / "stage.json").read_text())
    assert info["parents"][0]["stage"] == "sft" and info["adapter"] is True
    merged_sft = load_merged(AutoModelForCausalLM, str(sft_out / "model"))
    rm_base = load_merged(AutoModelForSequenceClassification, str(sft_out / "model"), num_labels=1)
    key = "model.layers.0.self_attn.q_proj.weight"
    sft_w, rm_w = merged_sft.state_dict()[key], rm_base.state_dict()[key]
    base_w = AutoModelForCausalLM.from_pretrained(family_dirs["llama3"]).state_dict()[key]
    assert torch.equal(sft_w, rm_w) and not torch.equal(sft_w, base_w)  # the SFT's LoRA delta is in the RM
