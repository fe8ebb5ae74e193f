"""reasoning-gym's tasks as data and reward (align/tasks/gym.py): `data=gym:<task>` writes the zoo's four splits from
fixed seeds (the same bytes on every machine), held-out questions appear in no training split, every chosen answer
scores 1 with the task's own score_answer and every rejected one less, the checker is that score_answer, and a bad
task or option stops before anything loads with the names that exist."""

from __future__ import annotations

import json
import random

import pytest
import torch

from conftest import compose, run_cli
from families import FAMILIES, build

CHAIN = ["data=gym", "data.train=gym:chain_sum", "++data.gym.max_terms=2", "++data.gym.max_digits=2"]
OPTS = {"max_terms": 2, "max_digits": 2}


def read(split: str) -> list[dict]:
    from align.tasks import gym

    return [json.loads(line) for line in gym.path("chain_sum", OPTS, split).read_text().splitlines()]


def question(row: dict) -> str:
    return (row["messages"] if "messages" in row else row["prompt"])[0]["content"]


def test_the_command_line_forms_select_the_gym_group_and_add_the_task_options():
    from align.__main__ import implicit_data_group

    assert implicit_data_group(["stage=sft", "data=gym:lcm", "data.gym.max_value=30", "+data.gym.min_value=2"]) == \
        ["stage=sft", "data=gym", "data.train=gym:lcm", "++data.gym.max_value=30", "+data.gym.min_value=2"]
    assert implicit_data_group(["data.train=gym:lcm"]) == ["data=gym", "data.train=gym:lcm"]
    cfg = compose(*CHAIN)
    assert cfg.data.train == "gym:chain_sum" and dict(cfg.data.gym) == OPTS and cfg.train.max_length == 160


def test_splits_regenerate_byte_for_byte_and_held_out_questions_are_never_trained_on(tmp_path, monkeypatch):
    from align.tasks import gym

    first = gym.path("chain_sum", OPTS, "sft").parent
    monkeypatch.setenv("ALIGN_CACHE", str(tmp_path))
    again = gym.path("chain_sum", OPTS, "sft").parent
    assert again != first and again.name == first.name
    for split, n in gym.SPLITS.items():
        assert (again / f"{split}.jsonl").read_bytes() == (first / f"{split}.jsonl").read_bytes()
        assert len((first / f"{split}.jsonl").read_text().splitlines()) == n
    held_out = {question(r) for s in ("sft_eval", "prefs_eval") for r in read(s)}
    trained = {question(r) for s in ("sft", "prefs") for r in read(s)}
    assert len(held_out) > 250 and not held_out & trained
    # each split its own stream: no two splits' generators share a question seed (reasoning-gym seeds question k
    # with seed + k), so the prefs split is not the sft split's questions shifted by one, as it was once
    ranges = sorted((gym.split_seed(s), gym.split_seed(s) + 2 * n) for s, n in gym.SPLITS.items())
    assert all(end <= start for (_, end), (start, _) in zip(ranges, ranges[1:]))
    sft = {question(r) for r in read("sft")}
    prefs = [question(r) for r in read("prefs")]
    assert sum(p in sft for p in prefs) < 0.6 * len(prefs)  # 51%: the questions both draw by chance (all, shifted)
    assert gym.path("chain_sum", {"max_terms": 2, "max_digits": 1}, "sft").parent != first  # options key the folder


def test_chosen_answers_score_one_and_rejected_near_misses_less_with_the_tasks_own_scoring():
    pairs = read("prefs") + read("prefs_eval")
    from align.tasks import gym

    ds, by_question = gym._scorer("chain_sum", json.dumps(OPTS, sort_keys=True))  # every split's entries
    off_by = []
    for p in pairs:
        entry = by_question[question(p)]
        chosen, rejected = p["chosen"][0]["content"], p["rejected"][0]["content"]
        assert chosen == entry["answer"] and ds.score_answer(chosen, entry) == 1.0
        assert ds.score_answer(rejected, entry) < 1.0
        off_by.append(abs(int(rejected) - int(chosen)))
    assert set(off_by) <= {1, 10} and off_by.count(1) > 0.9 * len(off_by)  # off by one first


def test_near_misses_of_a_count_stay_non_negative():
    from align.tasks.gym import _near_misses

    assert sorted(_near_misses("0", random.Random(0))[:2]) == ["1", "10"]
    assert sorted(_near_misses("5", random.Random(0))[:3]) == ["15", "4", "6"]
    assert _near_misses("ab", random.Random(0)) == ["ba"]


def test_the_checker_is_the_tasks_score_answer_and_the_online_stages_take_the_pairs_prompts(tiny_tokenizer):
    from align.data.loader import prompt_datasets
    from align.tasks import checkers

    cfg = compose(*CHAIN)
    check = checkers.from_config(cfg.data)
    row = read("prefs_eval")[0]
    q, right = question(row), row["chosen"][0]["content"]
    assert check(q, right, None) == 1.0 and check(q, f" {right} ", None) == 1.0
    assert check(q, str(int(right) + 1), None) == 0.0 and check(q, "no idea", None) == 0.0
    assert check("What is 2 + 2?", "4", "4") == 1.0  # not one of the task's questions: against the reference
    with pytest.raises(ValueError, match="neither one of gym:chain_sum's questions nor has a reference"):
        check("What is 2 + 2?", "4", None)
    train, held_out, report = prompt_datasets(cfg.data, tiny_tokenizer, 128, 42)
    assert report.train_rows == 2000 and report.eval_rows == 300 and not report.errors.skipped
    assert all(check(p, r, None) == 1.0 for p, r in zip(held_out["prompt_text"], held_out["reference"]))


@pytest.mark.parametrize("args,says", [
    (["data=gym:chain_summ"], ["reasoning-gym has no task 'chain_summ'", "similar: chain_sum"]),
    (["data=gym:chain_sum", "data.gym.max_terms=1"], ["max_terms must be >= min_terms",
                                                       "options are min_terms, max_terms, min_digits"]),
    (["data=gym:chain_sum", "data.gym.seed=3"], ["data.gym.seed is set by align", "remove data.gym.seed"]),
    (["data=demo", "data.checker=gym"], ["data.checker=gym scores a reasoning-gym task", "data=gym:<task>"]),
])
def test_a_bad_task_or_option_stops_before_loading_with_the_fix(args, says, monkeypatch, caplog, tmp_path):
    code = run_cli(["stage=grpo", f"run.root={tmp_path}", *args], monkeypatch)
    assert code == 2
    for text in says:
        assert text in caplog.text
    assert not (tmp_path / "demo").exists() or not any((tmp_path / "demo").rglob("*.safetensors"))


def test_the_eval_stages_accuracy_on_a_gym_task_is_reasoning_gyms_own_score(tmp_path):
    """A short SFT on gym:spell_backward (partial credit: a half-reversed word scores between 0 and 1), then the eval
    stage: its checker accuracy equals the mean of reasoning-gym's own score_answer over the same greedy answers,
    decoded here one prompt at a time with plain transformers from the saved model."""
    from transformers import AutoModelForCausalLM

    from align.data.chat import end_of_turn_ids
    from align.data.loader import eval_prompts
    from align.models.loading import load_tokenizer
    from align.run import handoff, orchestrate
    from align.tasks import gym

    opts = {"max_word_len": 6}
    overrides = ["data=gym", "data.train=gym:spell_backward", "++data.gym.max_word_len=6", f"run.root={tmp_path}",
                 "run.name=g", "pipeline.stages=[sft,eval]", "sft.train.max_steps=150", "eval.prompts=24",
                 "eval.max_new_tokens=12", "recipe=rlvr", "pipeline.objective=null"]
    orchestrate.run(compose(*overrides), overrides)
    metrics = handoff.read_stage_json(tmp_path / "g" / "eval")["metrics"]
    cfg = compose("stage=eval", *overrides[:3])
    model_dir = tmp_path / "g" / "sft" / "model"
    tok = load_tokenizer(str(model_dir), cfg.model)
    rows, _ = eval_prompts(cfg.data, tok, cfg.stage.max_prompt_length, cfg.train.max_length, cfg.train.seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ds, by_question = gym._scorer("spell_backward", json.dumps(opts, sort_keys=True))  # every split's entries
    scores = []
    with torch.no_grad():
        for row in rows[:24]:
            ids = torch.tensor([row["prompt_ids"]])
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                                 do_sample=False, eos_token_id=end_of_turn_ids(tok), pad_token_id=tok.pad_token_id)
            answer = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
            scores.append(ds.score_answer(answer, by_question[row["prompt_text"]]))
    assert 0.0 < sum(scores) / len(scores) < 1.0, scores  # partly learned: the comparison is not 0 == 0
    assert metrics["sft/checker_accuracy"] == pytest.approx(sum(scores) / len(scores), abs=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_gym_prompts_and_answers_survive_each_familys_template_and_tokenizer(family, tmp_path):
    """On fixtures shaped like Qwen (ChatML), Llama 3, Mistral and a base model with no chat template (real BPE
    merges and special tokens: tests/families.py): the held-out prompts the online stages encode still name one of
    the task's questions (the checker finds its entry without a reference), and each pair's chosen answer, encoded
    as an SFT row and decoded back from its supervised tokens, scores 1 with reasoning-gym's own scoring and the
    near miss less."""
    from align.data.chat import encode_chat
    from align.data.loader import prompt_datasets
    from align.models.loading import load_tokenizer
    from align.tasks import checkers

    cfg = compose(*CHAIN)
    tok = load_tokenizer(str(build(family, tmp_path / family)), cfg.model)
    check = checkers.from_config(cfg.data)
    _, held_out, _ = prompt_datasets(cfg.data, tok, 256, 42)
    pairs = {question(r): r for r in read("prefs_eval")}
    for prompt_text in held_out["prompt_text"][:40]:
        pair = pairs[prompt_text]
        scores = []
        for side in ("chosen", "rejected"):
            enc = encode_chat(tok, pair["prompt"] + pair[side], 256)
            answer = tok.decode([i for i, label in zip(enc["input_ids"], enc["labels"]) if label != -100],
                                skip_special_tokens=True)
            scores.append(check(prompt_text, answer, None))
        assert scores[0] == 1.0 and scores[1] < 1.0, (family, prompt_text, scores)
