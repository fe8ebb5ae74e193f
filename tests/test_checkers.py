"""Task checkers: exact values on hand-made responses, and the prompt/reference extraction they read."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from align.tasks import checkers
from align.data.prompts import prompt_text, to_prompt


def test_demo_checker_scores_the_letter_operations():
    demo = checkers.build("demo")
    assert demo("advance: azby", "bacz", None) == 1.0
    assert demo("advance: azby", " bacz\n", None) == 1.0  # surrounding whitespace is not an error
    assert demo("advance: azby", "azby", None) == 0.0  # the lazy copy
    assert demo("capital: abcd", "ABCd", None) == 0.0
    assert checkers.accuracy(demo, ["retreat: abcd", "capital: abcd"], ["zabc", "abcd"], [None, None]) == 0.5


def test_exact_regex_and_json_checkers():
    assert checkers.build("exact")("q", " 42 ", "42") == 1.0
    assert checkers.build("exact")("q", "41", "42") == 0.0
    regex = checkers.build("regex", r"\d+ apples")
    assert regex("q", "12 apples", None) == 1.0 and regex("q", "twelve apples", None) == 0.0
    js = checkers.build("json")
    want = '{"type": "bar", "x": "month", "y": "sales", "title": "Sales"}'
    assert js("q", '{"type": "bar", "x": "month", "y": "sales", "title": "Sales"}', want) == 1.0
    assert js("q", '{"type": "line", "x": "month", "y": "sales"}', want) == 0.5  # 2 of 4 fields
    assert js("q", '{"type": "bar", ', want) == 0.0  # not valid JSON


def test_checker_errors_say_what_to_set():
    with pytest.raises(ValueError, match="data.checker_pattern"):
        checkers.build("regex")
    with pytest.raises(ValueError, match="demo, exact, regex, json"):
        checkers.build("bleu")
    with pytest.raises(ValueError, match="reference answer"):
        checkers.build("exact")("q", "a", None)


def test_auto_picks_the_demo_checker_only_for_the_bundled_data():
    assert checkers.from_config(OmegaConf.create({"train": "demo", "checker": "auto"})) is checkers.demo
    assert checkers.from_config(OmegaConf.create({"train": "my.jsonl", "checker": "auto"})) is None
    assert checkers.from_config(OmegaConf.create({"train": "my.jsonl", "checker": "exact"})) is checkers.exact


def test_prompt_rows_carry_the_text_and_the_reference_answer():
    sft = to_prompt({"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"},
                                  {"role": "assistant", "content": "4"}]})
    assert prompt_text(sft["prompt"]) == "2+2?" and sft["reference"] == "4"
    pair = to_prompt({"prompt": "2+2?", "chosen": "4", "rejected": "5"})
    assert prompt_text(pair["prompt"]) == "2+2?" and pair["reference"] == "4"
    bare = to_prompt({"prompt": "2+2?"})
    assert bare["reference"] is None
