"""The scoring contract on fixtures shaped like Qwen (ChatML), Llama 3, Mistral and a base model with no chat
template (tests/families.py): a response is scored at its end-of-turn token in RM training, PPO and eval alike;
BOS appears exactly once; with pad = EOS the end-of-turn EOS stays in the labels; LoRA stages chain into the RM."""

from __future__ import annotations

import json
from pathlib import Path

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


@pytest.mark.parametrize("family", FAMILIES)
def test_rm_accuracy_in_stage_json_is_measured_at_the_end_of_turn(family, family_dirs, runs):
    """Trained by align, then re-scored as another tool reads the folder: plain transformers, the saved config and
    tokenizer untouched, each held-out sequence alone (no padding) and then right-padded in one batch with the saved
    tokenizer's pad. Every score equals align's (1e-4), and so do the recorded means and accuracy. Before, with pad
    = EOS (llama3, mistral, base), transformers pooled at the token before the end of turn: rejected answers scored
    -2.72 there and -4.03 in align."""
    from transformers import AutoModelForSequenceClassification

    from align.data.chat import end_of_turn_ids
    from align.data.loader import preference_datasets
    from align.rl.rollout import score
    from align.rl.rollout import right_pad
    from align.stages.rm import run

    cfg = compose("stage=rm", f"run.root={runs}", f"model.name_or_path={family_dirs[family]}", "stage.init=base",
                  "train.max_steps=30", "data.max_rows=256", "train.lr=3e-3", "train.max_length=128")
    result = run(cfg)
    out = result.out
    info = json.loads((out / "stage.json").read_text())
    tok = tokenizer_of(out / "model")
    assert tok.pad_token_id not in end_of_turn_ids(tok)
    _, eval_ds, _ = preference_datasets(cfg.data, tok, cfg.train.max_length, cfg.train.seed)
    model = AutoModelForSequenceClassification.from_pretrained(out / "model").eval()
    assert model.config.pad_token_id == tok.pad_token_id
    seqs = list(eval_ds["chosen_ids"]) + list(eval_ds["rejected_ids"])
    with torch.no_grad():
        alone = torch.tensor([model(input_ids=torch.tensor([ids])).logits[0, 0].item() for ids in seqs])
        ids, mask = right_pad(seqs, tok.pad_token_id)
        batched = model(input_ids=ids, attention_mask=mask).logits[:, 0]
    for ids_ in seqs:
        assert ids_[-1] in end_of_turn_ids(tok)
    ours = score(result.model, seqs, tok.pad_token_id)
    torch.testing.assert_close(alone, ours, rtol=0, atol=1e-4)
    torch.testing.assert_close(batched, ours, rtol=0, atol=1e-4)
    n = len(eval_ds)
    m = info["metrics"]
    assert m["reward_chosen_mean"] == pytest.approx(alone[:n].mean().item(), abs=1e-4)
    assert m["reward_rejected_mean"] == pytest.approx(alone[n:].mean().item(), abs=1e-4)
    assert m["eval_accuracy"] == pytest.approx((alone[:n] > alone[n:]).float().mean().item(), abs=1e-6)
    assert m["eval_accuracy"] > 0.55  # it learned something, at the position it is read


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


def user_files(where):
    """The user's own data in common formats: Alpaca-style instructions, prompt/chosen/rejected pairs."""
    from align.tasks import demo
    sft = [json.loads(line)["messages"] for line in demo.path("sft").read_text().splitlines()[:48]]
    with open(where / "sft.jsonl", "w") as f:
        for m in sft:
            f.write(json.dumps({"instruction": m[0]["content"], "input": "", "output": m[1]["content"]}) + "\n")
    prefs = demo.path("prefs").read_text().splitlines()[:48]
    (where / "prefs.jsonl").write_text("\n".join(prefs) + "\n")


TINY_RUN = ["train.max_length=128", "data.eval_fraction=0.15", "sft.train.max_steps=2"]
RECIPES = {
    "rlhf_ppo": ["sft.data.train=sft.jsonl", "rm.data.train=prefs.jsonl", "ppo.data.train=sft.jsonl",
                 "rm.train.max_steps=2", "ppo.train.max_steps=1", "ppo.rollout_batch_size=8", "ppo.train.batch_size=4",
                 "ppo.max_new_tokens=8", "ppo.eval_prompts=4", "ppo.max_prompt_length=64"],
    "rlhf_dpo": ["sft.data.train=sft.jsonl", "dpo.data.train=prefs.jsonl", "dpo.train.max_steps=2"],
    # GRPO from a LoRA SFT parent, the demo's checker as the reward (the user's rows are demo prompts)
    "rlvr": ["sft.data.train=sft.jsonl", "grpo.data.train=sft.jsonl", "grpo.data.checker=demo",
             "grpo.train.max_steps=1", "grpo.rollout_batch_size=2", "grpo.group_size=4", "grpo.train.batch_size=4",
             "grpo.train.grad_accum=1", "grpo.max_new_tokens=8", "grpo.eval_prompts=4", "grpo.max_prompt_length=64",
             "eval.data.train=sft.jsonl", "eval.data.checker=demo", "eval.prompts=4", "eval.max_new_tokens=8"],
}
POLICY = {"rlhf_ppo": "ppo", "rlhf_dpo": "dpo", "rlvr": "grpo"}
LORA = {"rlvr": ["peft=lora"]}  # the rlhf recipes choose LoRA themselves; rlvr (the demo's) does not


@pytest.mark.parametrize("recipe", list(RECIPES))
@pytest.mark.parametrize("family", FAMILIES)
def test_the_real_recipes_run_end_to_end_on_each_family(family, recipe, family_dirs, tmp_path, monkeypatch):
    """recipe=rlhf_ppo / rlhf_dpo with their own settings (the Qwen model group, LoRA at every stage) and rlvr
    with LoRA, pointed at the fixture with model.name_or_path and at the user's files, then the eval stage and
    export: every LoRA -> LoRA handoff (sft -> rm, sft -> dpo, sft + rm -> ppo, sft -> grpo) on the family's
    template and special tokens."""
    from transformers import AutoModelForCausalLM

    from align.models.loading import load_merged
    from conftest import run_cli

    user_files(tmp_path)
    monkeypatch.chdir(tmp_path)
    common = [f"model.name_or_path={family_dirs[family]}", "run.root=runs", f"run.name={family}"]
    assert run_cli([f"recipe={recipe}", *common, *LORA.get(recipe, []), *TINY_RUN, *RECIPES[recipe]], monkeypatch) == 0
    run = tmp_path / "runs" / family
    policy = POLICY[recipe]
    info = {s: json.loads((run / s / "stage.json").read_text()) for s in ("sft", policy)}
    assert all(i["weights"] == "lora" and i["adapter"] for i in info.values())
    assert info[policy]["parents"][0]["output_id"] == info["sft"]["output_id"]
    assert {"eval_accuracy", "eval_reward_mean", "eval_checker_accuracy"} & set(info[policy]["metrics"])

    evaluate = ["stage=eval", *common, "data.train=sft.jsonl", "data.eval_fraction=0.15", "stage.prompts=4",
                "stage.max_new_tokens=8", "train.max_length=128"]
    assert run_cli(evaluate, monkeypatch) == 0
    metrics = json.loads((run / "eval" / "stage.json").read_text())["metrics"]
    assert metrics["sft/kl"] == pytest.approx(0.0, abs=1e-6) and metrics[f"{policy}/perplexity"] > 1.0
    assert run_cli(["export", f"stage={policy}", *common], monkeypatch) == 0
    merged = AutoModelForCausalLM.from_pretrained(run / policy / "merged")
    chain = load_merged(AutoModelForCausalLM, str(run / policy / "model"))  # adapter on the SFT adapter on the base
    probe = torch.tensor([[5, 17, 40, 99, 120]])
    with torch.no_grad():
        torch.testing.assert_close(merged(probe).logits, chain(probe).logits, rtol=0, atol=1e-4)


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_qlora_at_every_stage_hands_off_through_merged_parents(recipe, family_dirs, tmp_path, monkeypatch):
    """peft=qlora at every stage of the real recipes (Llama 3 shape, pad = EOS): each QLoRA stage starts from its
    LoRA parent merged into the base and quantized again (used to be refused)."""
    from conftest import run_cli

    user_files(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ALIGN_CACHE", str(tmp_path / "cache"))
    args = [f"recipe={recipe}", f"model.name_or_path={family_dirs['llama3']}", "run.root=runs", "run.name=q",
            "peft=qlora", *TINY_RUN, *RECIPES[recipe]]
    assert run_cli(args, monkeypatch) == 0
    stages = ("sft", "rm", "ppo") if recipe == "rlhf_ppo" else ("sft", POLICY[recipe])
    for stage in stages:
        info = json.loads((tmp_path / "runs" / "q" / stage / "stage.json").read_text())
        assert info["weights"] == "qlora", stage
        if stage != "sft":
            assert info["parents"][0]["stage"] == "sft"
    assert not list((tmp_path / "cache" / "merged-parents").iterdir())  # the merged copies are gone


QWEN_VOCAB = 151_936


def test_a_151936_token_vocabulary_runs_every_stage_without_full_vocabulary_logprob_tensors(tmp_path, monkeypatch):
    """Qwen 2.5's vocabulary size: one step of sft, rm, dpo, ppo and eval. During DPO (reference precompute
    included), PPO and eval no output of the output layer holds more than one chunk of logits
    (align/rl/logprobs.py; TRL's fused head for DPO), where a full [B, T, V] pass over PPO's rollout would be
    16 x 40 x 151,936."""
    from align.rl.logprobs import CHUNK_ELEMENTS
    from conftest import run_cli

    model = build("chatml", tmp_path / "qwen-vocab", vocab_size=QWEN_VOCAB)
    user_files(tmp_path)
    monkeypatch.chdir(tmp_path)
    common = [f"model.name_or_path={model}", "run.root=runs", "run.name=v", "data.eval_fraction=0.1",
              "train.batch_size=4", "train.grad_accum=1", "train.max_length=96", "train.max_steps=1"]
    for stage, data in (("sft", "sft.jsonl"), ("rm", "prefs.jsonl")):
        assert run_cli([f"stage={stage}", *common, f"data.train={data}"], monkeypatch) == 0, stage

    widest = []

    def watch(module, args, output):
        if isinstance(output, torch.Tensor) and output.shape[-1] == QWEN_VOCAB:
            widest.append(output.numel())

    handle = torch.nn.modules.module.register_module_forward_hook(watch)
    try:  # DPO: TRL's own tiled output layer, for the loss and the reference precompute
        assert run_cli(["stage=dpo", *common, "data.train=prefs.jsonl", "stage.precompute_ref_logps=true"],
                       monkeypatch) == 0
        common.append("data.train=sft.jsonl")
        assert run_cli(["stage=ppo", *common, "stage.rollout_batch_size=16", "stage.max_new_tokens=8",
                        "stage.eval_prompts=4", "stage.max_prompt_length=96", "train.batch_size=16"], monkeypatch) == 0
        assert run_cli(["stage=eval", *common, "stage.prompts=4", "stage.max_new_tokens=8",
                        "stage.max_prompt_length=96"], monkeypatch) == 0
    finally:
        handle.remove()
    assert widest and max(widest) <= CHUNK_ELEMENTS, max(widest)
    info = json.loads((tmp_path / "runs" / "v" / "ppo" / "stage.json").read_text())
    assert info["metrics"]["global_step"] == 1


def test_editing_a_data_file_in_place_retrains_that_stage_and_its_children_in_the_recipe(family_dirs, tmp_path,
                                                                                        monkeypatch, caplog):
    from conftest import run_cli

    user_files(tmp_path)
    monkeypatch.chdir(tmp_path)
    args = ["recipe=rlhf_dpo", f"model.name_or_path={family_dirs['chatml']}", "run.root=runs", "run.name=e",
            *TINY_RUN, *RECIPES["rlhf_dpo"]]
    assert run_cli(args, monkeypatch) == 0
    ids = {s: json.loads((tmp_path / "runs" / "e" / s / "stage.json").read_text())["output_id"] for s in ("sft", "dpo")}
    prefs = tmp_path / "prefs.jsonl"
    rows = prefs.read_text().splitlines()
    prefs.write_text("\n".join(rows[1:] + rows[:1]) + "\n")  # same rows, another order: other bytes
    with caplog.at_level("INFO", logger="align"):
        assert run_cli(args, monkeypatch) == 0
    assert "sft: up to date" in caplog.text and "dpo: running (changed: data.train content changed)" in caplog.text
    again = {s: json.loads((tmp_path / "runs" / "e" / s / "stage.json").read_text())["output_id"] for s in ("sft", "dpo")}
    assert again["sft"] == ids["sft"] and again["dpo"] != ids["dpo"]


@pytest.mark.parametrize("family", FAMILIES)
def test_iterative_dpo_over_a_lora_sft_pairs_sampled_ids_that_end_at_the_turn_end(family, family_dirs, tmp_path,
                                                                                 monkeypatch):
    """stage=iterative_dpo on each family's template and special tokens, LoRA over a LoRA SFT, judged by a Python
    reward (longer is better): every pair's chosen answer is the longer one, its token ids are the sampled ones
    (they decode to the texts and end at the family's end of turn, or at max_new_tokens), the prompt carries BOS
    once where the family has one, and the output adapter chains through round 1 to the SFT's and loads."""
    from transformers import AutoModelForCausalLM

    from align.data.chat import end_of_turn_ids
    from align.models.loading import adapter_base, load_merged
    from conftest import run_cli

    user_files(tmp_path)
    monkeypatch.chdir(tmp_path)
    common = [f"model.name_or_path={family_dirs[family]}", "run.root=runs", f"run.name={family}", "peft=lora",
              "train.max_length=128", "data.train=sft.jsonl", "data.eval_fraction=0.15"]
    assert run_cli(["stage=sft", *common, "train.max_steps=2"], monkeypatch) == 0
    assert run_cli(["stage=iterative_dpo", *common, "reward=python", "reward.fn=tests.rewards_for_tests:length",
                    "stage.rounds=2", "stage.prompts_per_round=6", "stage.samples_per_prompt=4",
                    "stage.max_new_tokens=8", "stage.max_prompt_length=64", "train.max_steps=2",
                    "train.batch_size=4", "train.grad_accum=1"], monkeypatch) == 0
    out = tmp_path / "runs" / family / "iterative_dpo"
    tok = tokenizer_of(family_dirs[family])
    turn_end = set(end_of_turn_ids(tok))
    for r in (1, 2):
        pairs = [json.loads(line) for line in (out / "pairs" / f"round-{r}.jsonl").read_text().splitlines()]
        assert pairs, r
        for p in pairs:
            assert len(p["chosen"]) > len(p["rejected"]) and p["chosen_score"] > p["rejected_score"]
            for side in ("chosen", "rejected"):
                ids = p[f"{side}_ids"]
                assert ids[-1] in turn_end or len(ids) == 8, (family, tok.decode(ids))
                assert tok.decode(ids, skip_special_tokens=True) == p[side]
            if tok.bos_token_id is not None:
                assert p["prompt_ids"].count(tok.bos_token_id) == 1 and p["prompt_ids"][0] == tok.bos_token_id
    info = json.loads((out / "stage.json").read_text())
    assert info["weights"] == "lora" and info["parents"][0]["stage"] == "sft"
    round_1 = Path(adapter_base(out / "model"))  # absolute: run.root=runs was relative to where the run started
    assert round_1.is_absolute() and round_1.parent.name == "round-1" and round_1.parent.parent.parent == out / "rounds"
    assert Path(adapter_base(round_1)) == tmp_path / "runs" / family / "sft" / "model"
    monkeypatch.chdir(tmp_path.parent)  # a serving script elsewhere loads the chain
    model = load_merged(AutoModelForCausalLM, str(out / "model"))
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([pairs[0]["prompt_ids"] + pairs[0]["chosen_ids"]])).logits).all()
