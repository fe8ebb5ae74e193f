"""Multi-turn episodes (align/rl/episodes.py) against the fixture families' chat templates: the episode's tokens are
the template's rendering of the final conversation, the trained mask is exactly the model's turns (as SFT labels
them), episodes advance together and drop out when done, and a misbehaving environment stops the run naming the
env, the row and the turn, or is dropped and counted."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from align.data.chat import IGNORE_INDEX, cut_after_turn_end, encode_chat, end_of_turn_ids, ensure_chat_template
from align.data.chat import render, tokenize
from align.data.prompts import Prompt
from align.envs import EnvError
from align.rl.episodes import EpisodeRunner
from align.rl.rollout import Batch, left_pad, right_pad
from families import FAMILIES, build_tokenizer


def family_tokenizer(family: str):
    tok = build_tokenizer(family)
    ensure_chat_template(tok)
    return tok


def prompt(question: str, answer: str, n: int = 0) -> Prompt:
    messages = [{"role": "user", "content": question}]
    return Prompt([1], question, answer, "{}", json.dumps(messages), f"data.jsonl row {n + 1}")


class Script:
    """A sampler that writes, for each context, the next of its episode's scripted turns (canonical tokens and the end
    of turn), and records how many contexts each call got."""

    def __init__(self, tok, turns_by_question: dict[str, list[str]]):
        self.tok, self.turns, self.calls = tok, turns_by_question, []
        self.stop, self.asked = tok.eos_token_id, dict.fromkeys(turns_by_question, 0)

    def __call__(self, contexts, greedy, max_new_tokens, turns=None):
        self.calls.append(len(contexts))
        outs = []
        for ctx in contexts:
            text = self.tok.decode(ctx)
            question = next(q for q in self.turns if q in text)
            turn = self.turns[question][min(self.asked[question], len(self.turns[question]) - 1)]
            self.asked[question] += 1
            outs.append((self.tok(turn, add_special_tokens=False)["input_ids"] + [self.stop])[:max_new_tokens])
        responses, mask = right_pad(outs, self.tok.pad_token_id or 0)
        queries, qmask = left_pad(contexts, self.tok.pad_token_id or 0, None)
        ended = torch.tensor([o[-1] == self.stop for o in outs])
        return Batch(queries, qmask, responses, mask, ended)


def runner(tok, tmp_env="envs_for_tests:Adder", skip=False, timeout=5.0, max_turns=4, budget=200, **kwargs):
    cfg = SimpleNamespace(cls=tmp_env, kwargs=kwargs, timeout_s=timeout)
    return EpisodeRunner(cfg, tok, max_turns=max_turns, max_episode_tokens=budget, max_new_tokens=40,
                         max_prompt_length=200, skip_errors=skip)


@pytest.mark.parametrize("family", FAMILIES)
def test_episode_tokens_are_the_templates_rendering_and_only_the_models_turns_train(family):
    tok = family_tokenizer(family)
    script = Script(tok, {"Add 12 and 30.": ["CALL 12+30", "42"], "Say hi.": ["hi"]})
    out = runner(tok).run(script, [prompt("Add 12 and 30.", "42"), prompt("Say hi.", "hi", 1)])
    for row, e in enumerate(out.items):
        ids = e.prompt_ids + e.ids
        rendered = cut_after_turn_end(tokenize(tok, render(tok, e.messages))["input_ids"], end_of_turn_ids(tok))
        assert ids == rendered, (family, tok.decode(ids), tok.decode(rendered))
        labels = encode_chat(tok, e.messages, 10_000)["labels"]
        trained = [0] * len(e.prompt_ids) + e.mask
        assert trained == [int(label != IGNORE_INDEX) for label in labels][: len(ids)], family  # SFT's own mask
        # each model turn (a run of trained tokens) ends with its end-of-turn token, trained
        ends = [i for i in range(len(ids)) if trained[i] and (i + 1 == len(ids) or not trained[i + 1])]
        assert len(ends) == e.turns and all(ids[i] == tok.eos_token_id for i in ends), family
        n = len(e.ids)
        assert out.batch.present[row, :n].tolist() == [1] * n and out.batch.mask[row, :n].tolist() == e.mask
    first, second = out.items
    assert (first.turns, first.tool_calls, first.reward) == (2, 1, 1.0)
    assert first.messages[-2] == {"role": "tool", "content": "42"} and first.messages[-1]["content"] == "42"
    assert 0 in first.mask and (second.turns, second.tool_calls, second.reward) == (1, 0, 1.0)
    assert out.answers == ["42", "hi"] and out.rewards.tolist() == [1.0, 1.0]
    assert script.calls == [2, 1]  # one generation per turn, the finished episode dropped out


def test_episodes_stop_at_the_turn_and_token_limits():
    tok = family_tokenizer("chatml")
    loop_forever = {"Add 1 and 1.": ["CALL 1+1"]}
    out = runner(tok, max_turns=3).run(Script(tok, loop_forever), [prompt("Add 1 and 1.", "2")])
    assert out.items[0].turns == 3 and out.items[0].tool_calls == 2 and out.rewards.tolist() == [0.0]
    assert out.batch.ended.tolist() == [True]
    short = runner(tok, budget=12).run(Script(tok, loop_forever), [prompt("Add 1 and 1.", "2")])
    e = short.items[0]
    assert len(e.ids) <= 12 and e.finished and e.turns == 1  # the tool turn would leave no room for another turn


MISBEHAVIOURS = {
    "raises": "raised KeyError: 'no such register'",
    "hangs": "no answer within env.timeout_s=1 s",
    "not_a_dict": "step() returned list, expected a dict",
    "nan_reward": "step() returned reward nan; a reward is a finite number or None",
    "unknown_role": "step()['messages'][0] has role 'oracle'",
}


@pytest.mark.parametrize("how", MISBEHAVIOURS)
def test_a_misbehaving_environment_is_named_with_its_row_and_turn_or_skipped_and_counted(how):
    tok = family_tokenizer("chatml")
    turns = {"Add 12 and 30.": ["CALL 12+30", "42"], "Add 2 and 3.": ["CALL 2+3", "5"]}
    prompts = [prompt("Add 12 and 30.", "42", 6), prompt("Add 2 and 3.", "5", 1)]
    env = "envs_for_tests:Misbehaving"
    with pytest.raises(EnvError) as err:
        runner(tok, env, timeout=1, how=how, when="12").run(Script(tok, turns), prompts)
    message = str(err.value)
    assert f"env {env}, data.jsonl row 7, turn 2: {MISBEHAVIOURS[how]}" in message, message
    assert "data.on_error=skip" in message
    out = runner(tok, env, skip=True, timeout=1, how=how, when="12").run(Script(tok, turns), prompts)
    assert out.valid.tolist() == [False, True] and out.rewards.tolist() == [0.0, 1.0]
    assert out.stats()["env/errors"] == 1.0 and MISBEHAVIOURS[how] in out.items[0].error


def test_an_environment_class_that_cannot_be_loaded_is_refused_with_the_fix():
    tok = family_tokenizer("chatml")
    for spec, says in (("envs_for_tests", "env.cls=module:Class"), ("no_such_module:Env", "cannot import"),
                       ("envs_for_tests:Nothing", "has no class 'Nothing'"), ("json:dumps", "no reset or step")):
        with pytest.raises(EnvError, match=says):
            runner(tok, spec)


CALL = {"type": "function", "function": {"name": "calc", "arguments": {"expression": "12+30"}}}


def test_tool_use_sft_trains_the_calls_and_the_answer_not_the_tool_turns(tmp_path):
    from conftest import compose, write_jsonl

    from align.data.loader import sft_datasets

    user = {"role": "user", "content": "Add 12 and 30."}
    good = {"messages": [user, {"role": "assistant", "content": "", "tool_calls": [CALL]},
                         {"role": "tool", "content": "42", "tool_call_id": "c1"}, {"role": "assistant", "content": "42"}]}
    text_args = json.loads(json.dumps(good))  # arguments as JSON text, as OpenAI-style logs carry them
    text_args["messages"][1]["tool_calls"][0]["function"]["arguments"] = '{"expression": "12+30"}'
    broken = json.loads(json.dumps(good))
    broken["messages"][1]["tool_calls"][0]["function"]["arguments"] = '{"expression": 12+'
    path = write_jsonl(tmp_path / "tools.jsonl", [good, text_args, broken])
    cfg = compose("data.train=" + str(path), "data.on_error=skip", "data.dedup=false")
    tok = family_tokenizer("chatml")
    train, _, report = sft_datasets(cfg.data, tok, 512, 0)
    assert len(train) == 2 and train[0]["input_ids"] == train[1]["input_ids"]
    ids, labels = train[0]["input_ids"], train[0]["labels"]
    trained = tok.decode([i for i, label in zip(ids, labels) if label != IGNORE_INDEX])
    call = '<tool_call>\n{"name": "calc", "arguments": {"expression": "12+30"}}\n</tool_call><|im_end|>'
    assert trained == call + "42<|im_end|>", trained  # the call and the answer, each with its end of turn
    assert "<tool_response>" in tok.decode(ids) and "<tool_response>" not in trained
    ((source, row, why),) = report.errors.skipped
    assert (source, row) == (str(path), 3) and "tool_calls[0].function.arguments' is not JSON" in why, why


def test_an_episodes_prompt_ends_where_the_model_first_speaks():
    from align.data.prompts import to_prompt

    user, system = {"role": "user", "content": "subtract: 12-30"}, {"role": "system", "content": "use calc"}
    transcript = [system, user, {"role": "assistant", "content": "calc(12-30)"}, {"role": "tool", "content": "-18"},
                  {"role": "assistant", "content": "-18"}]
    row = to_prompt({"messages": transcript})
    assert row["prompt"] == [system, user] and row["answer"] == transcript[2:] and row["reference"] == "-18"
    chat = [user, {"role": "assistant", "content": "ok"}, {"role": "user", "content": "again"},
            {"role": "assistant", "content": "ok"}]
    assert to_prompt({"messages": chat})["prompt"] == chat[:3]  # a plain multi-turn chat: its last answer only
