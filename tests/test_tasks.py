"""The task zoo (align/tasks/zoo.py): files regenerate byte for byte from their seeds, every chosen answer
passes the task's checker and every rejected one fails it, the SFT split carries its error pattern, and
`data=task/<name>` reads each stage's split with the task's checker."""

from __future__ import annotations

import json

import pytest

from conftest import compose

TASKS = ("arith", "sort", "json", "recall", "calc")


def read(task: str, split: str) -> list[dict]:
    from align.tasks.zoo import path

    return [json.loads(line) for line in path(task, split).read_text().splitlines()]


# sha256 (first 16 hex digits) of every file the tasks generate: the files the demo's and the zoo's measured numbers
# (README, docs/quality.md) were trained on. A change here changes every fingerprint and every number.
GENERATED = {
    "demo": {"sft": "8b03801d59acd6c7", "sft_eval": "098fef10b71261b9", "prefs": "77ed2aec831c64d2",
             "prefs_eval": "a91a25f7777f563d"},
    "arith": {"sft": "7571f74273c4e9cf", "prefs": "390ecd694078091a", "sft_eval": "f9d758d87504fa87",
              "prefs_eval": "efe0663547eb621c"},
    "sort": {"sft": "12036efdccb6c626", "prefs": "a9685c6a068567ff", "sft_eval": "3692e4039a267e53",
             "prefs_eval": "0fd1c8714d8f8cd8"},
    "json": {"sft": "20e19cc390fe87a9", "prefs": "2c4487cf73ee240a", "sft_eval": "e8530a5e54b605a0",
             "prefs_eval": "9e80523841f59b55"},
    "recall": {"sft": "e3c37f02d41ac136", "prefs": "e5e32288434c6d1d", "sft_eval": "0dedb41495153246",
               "prefs_eval": "41f3d6f5f44f7a3a"},
    "calc": {"sft": "0db26f1d7c30382f", "prefs": "15e0a4ac690bdbbc", "sft_eval": "880438c3dbe35695",
             "prefs_eval": "708e095d57843b7a"},
}


def _digests(folder) -> dict[str, str]:
    import hashlib

    return {f.stem: hashlib.sha256(f.read_bytes()).hexdigest()[:16] for f in sorted(folder.glob("*.jsonl"))}


def test_files_generate_byte_for_byte_into_the_cache_on_first_use(tmp_path, monkeypatch):
    """No task file ships in the package: each is written on first use into ALIGN_CACHE, the same bytes as the
    files every measured number was trained on, and a second use reads the same folder."""
    from align.tasks import demo, zoo

    monkeypatch.setenv("ALIGN_CACHE", str(tmp_path / "cache"))
    first = demo.path("sft")
    assert first.is_relative_to(tmp_path / "cache") and demo.path("sft") == first
    assert _digests(first.parent) == GENERATED["demo"]
    for t in TASKS:
        assert _digests(zoo.path(t, "sft").parent) == GENERATED[t], t
    zoo.write("sort", tmp_path / "direct")  # the generator alone, outside the cache: the same bytes
    assert _digests(tmp_path / "direct") == GENERATED["sort"]
    assert not [p for p in (tmp_path / "cache" / "tasks").iterdir() if p.name.startswith(".")]  # no half-written folder


@pytest.mark.parametrize("task", TASKS)
def test_held_out_prompts_are_in_no_training_split(task):
    from align.tasks.zoo import prompt_turns

    def prompts(split):
        return [json.dumps(prompt_turns(r), sort_keys=True) for r in read(task, split)]

    seen = set(prompts("sft")) | set(prompts("prefs"))
    held_out = prompts("sft_eval") + prompts("prefs_eval")
    assert len(held_out) == 600 and not [p for p in held_out if p in seen]


@pytest.mark.parametrize("task", TASKS)
def test_pairs_are_right_against_near_miss_and_sft_carries_the_error(task):
    from align.tasks import checkers
    from align.tasks.zoo import CHECKERS, ERROR_SHARE

    check = checkers.build(CHECKERS[task])
    for row in read(task, "prefs")[:500]:  # a transcript's answer is its last turn (calc's: after the tool's)
        chosen, rejected = row["chosen"][-1]["content"], row["rejected"][-1]["content"]
        prompt = row["prompt"][-1]["content"]
        assert check(prompt, chosen, chosen) == 1.0
        assert check(prompt, rejected, chosen) < 1.0, row
    for row in read(task, "sft_eval"):
        assert row["messages"][-1]["role"] == "assistant"
    # the SFT split: answers the checker marks wrong against an independent solver's answer to the same prompt
    wrong = 0
    for row in read(task, "sft"):
        prompt_turns, answer = zoo_prompt(row), row["messages"][-1]["content"]
        right = _solve(task, prompt_turns)
        wrong += check(prompt_turns[-1]["content"], answer, right) < 1.0
    share = wrong / len(read(task, "sft"))
    # the error applies to about half of the inputs (a carry, a duplicate, an age under 50, a reversal: one in
    # 3, a first number below 500), ERROR_SHARE of those carry it
    assert 0.1 < share < ERROR_SHARE, (task, share)


def zoo_prompt(row: dict) -> list[dict]:
    from align.tasks.zoo import prompt_turns

    return prompt_turns(row)


def _solve(task: str, turns: list[dict]) -> str:
    """The right answer from the prompt alone (an independent solver, not the generator)."""
    text = turns[-1]["content"]
    if task == "calc":
        a, b = text.removeprefix("subtract: ").split("-")
        return str(int(a) - int(b))
    if task == "arith":
        a, b = text.removeprefix("add: ").split("+")
        return str(int(a) + int(b))
    if task == "sort":
        return " ".join(sorted(set(text.removeprefix("sort: ").split())))
    if task == "json":
        words = text.removeprefix("extract: ").rstrip(".").split()
        name, age, city = words[0], next(w for w in words if w.isdigit()), words[words.index("in") + 1]
        return json.dumps({"name": name, "age": int(age), "city": city})
    word = turns[0]["content"].removeprefix("remember: ")
    return {"reverse it": word[::-1], "repeat it": word, "capitalise it": word.upper()}[text]


@pytest.mark.parametrize("task", TASKS)
def test_data_task_group_reads_each_stage_split_with_the_task_checker(task, tiny_tokenizer):
    from align.tasks import checkers
    from align.data.loader import dpo_datasets, prompt_datasets, resolve_sources
    from align.tasks.zoo import CHECKERS, SIZES, path

    cfg = compose(f"data=task/{task}")
    assert cfg.data.train == f"task:{task}" and cfg.train.max_length == 128
    assert resolve_sources(cfg.data, "sft") == (str(path(task, "sft")), str(path(task, "sft_eval")))
    assert resolve_sources(cfg.data, "preference") == (str(path(task, "prefs")), str(path(task, "prefs_eval")))
    assert checkers.from_config(cfg.data) is checkers.build(CHECKERS[task])
    # the online stages (PPO, GRPO) take the preference split's prompts: their reference, which the checker
    # rewards, is the right answer; the SFT split's carries the task's error in a share of its rows
    train, held_out, report = prompt_datasets(cfg.data, tiny_tokenizer, 128, 42)
    assert report.train_rows == SIZES["prefs"] and report.eval_rows == 300 and not report.errors.skipped
    pref_rows = [json.loads(line) for line in path(task, "prefs").read_text().splitlines()]
    assert sorted(train["reference"]) == sorted(_solve(task, r["prompt"]) for r in pref_rows)
    assert held_out[0]["reference"] == _solve(task, _turns(task, held_out[0]))
    pairs, _, pair_report = dpo_datasets(cfg.data, tiny_tokenizer, 128, 42)
    assert pair_report.train_rows == 2000 and not pair_report.errors.skipped  # every pair fits 128 tokens


def _turns(task: str, row) -> list[dict]:
    """A held-out prompt's turns, found in the task's prefs_eval file by its text (recall's prompt text is its
    last turn, so there the answer picks the row too)."""
    from align.tasks.zoo import path

    for line in path(task, "prefs_eval").read_text().splitlines():
        r = json.loads(line)
        if r["prompt"][-1]["content"] == row["prompt_text"] and (task != "recall" or
                                                                r["chosen"][-1]["content"] == row["reference"]):
            return r["prompt"]
    raise AssertionError(row)


def test_data_train_task_selects_its_group():
    from align.__main__ import implicit_data_group

    assert implicit_data_group(["stage=sft", "data.train=task:sort"]) == ["data=task/sort", "stage=sft",
                                                                         "data.train=task:sort"]


def test_bench_heldout_holds_every_arith_prompt_no_training_split_asks():
    """bench/heldout.py's file (docs/quality.md, "Sparse reward signal"): the whole unseen population, right answers."""
    import sys

    from align.tasks.zoo import prompt_turns
    from conftest import REPO

    sys.path.insert(0, str(REPO / "bench"))
    import heldout

    rows = heldout.arith_unseen()
    prompts = [r["messages"][0]["content"] for r in rows]
    trained = {prompt_turns(r)[-1]["content"] for split in ("sft", "prefs") for r in read("arith", split)}
    assert len(prompts) == len(set(prompts)) == 8100 - len(trained) == 1859
    assert not set(prompts) & trained
    assert {r["messages"][0]["content"] for r in read("arith", "sft_eval")} <= set(prompts)
    for r in rows:
        a, b = r["messages"][0]["content"].removeprefix("add: ").split("+")
        assert r["messages"][1]["content"] == str(int(a) + int(b))
    # McNemar's exact p, by hand: 5 against 0 is 2 * (1/2)^5; 17 against 12 is 2 * P(X <= 12), X ~ Bin(29, 1/2)
    assert heldout.mcnemar(5, 0) == pytest.approx(0.0625)
    assert heldout.mcnemar(17, 12) == pytest.approx(0.4583, abs=1e-4)
    assert heldout.mcnemar(0, 0) == 1.0 and heldout.mcnemar(3, 3) == 1.0
