"""The GRPO family's math (align/rl/advantages.py, losses.aggregate/clipped_surrogate, the reward group and
the over-optimisation watch) against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from align.rl.advantages import group_advantages, overlong_penalty, token_advantages, zero_variance
from align.rl.losses import aggregate, clipped_surrogate, policy_loss


def close(got, want, tol=1e-5):
    torch.testing.assert_close(torch.as_tensor(got, dtype=torch.float32), torch.tensor(want, dtype=torch.float32),
                               rtol=0, atol=tol)


SCORES = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])  # two groups of 4; the second all right


def test_group_advantages_by_hand():
    # group 1: mean 0.5, unbiased std sqrt(4 * 0.25 / 3) = 0.57735; group 2: no spread -> 0
    a = 0.5 / math.sqrt(1 / 3)
    close(group_advantages(SCORES, 4, "grpo"), [a, -a, -a, a, 0, 0, 0, 0], 1e-4)
    close(group_advantages(SCORES, 4, "dr_grpo"), [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0])
    # leave-one-out: 1 - (0 + 0 + 1) / 3 = 2/3; 0 - (1 + 0 + 1) / 3 = -2/3
    close(group_advantages(SCORES, 4, "rloo"), [2 / 3, -2 / 3, -2 / 3, 2 / 3, 0, 0, 0, 0])
    close(group_advantages(SCORES, 4, "reinforce_pp"), [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0])
    with pytest.raises(ValueError, match="stage.advantage must be one of"):
        group_advantages(SCORES, 4, "ppo")
    with pytest.raises(ValueError, match="do not split into groups of 3"):
        group_advantages(SCORES, 3, "grpo")


def test_zero_variance_and_overlong_penalty_by_hand():
    assert zero_variance(SCORES, 4).tolist() == [False] * 4 + [True] * 4
    # max 16 tokens, buffer 4: free up to 12, then -1/4 per token
    close(overlong_penalty(torch.tensor([10, 12, 14, 16]), 16, 4, 1.0), [0, 0, -0.5, -1.0])
    close(overlong_penalty(torch.tensor([10, 16]), 16, 0), [0, 0])  # buffer 0: off


def test_token_advantages_by_hand():
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    close(token_advantages(torch.tensor([0.5, -1.0]), mask, "grpo"), [[0.5, 0.5, 0], [-1, -1, -1]])
    # reinforce_pp, beta 0.5: rewards row 0 [-0.05, -0.1 + 1, 0], row 1 [-0.05, 0, -0.15 - 1]; to go:
    # [0.85, 0.9, -] and [-1.2, -1.15, -1.15]; whitened over the 5 tokens: mean -0.35, unbiased std
    # sqrt(5.005 / 4) = 1.118593
    kl = torch.tensor([[0.1, 0.2, 0.0], [0.1, 0.0, 0.3]])
    std = math.sqrt(5.005 / 4)
    want = [[1.2 / std, 1.25 / std, 0], [-0.85 / std, -0.8 / std, -0.8 / std]]
    close(token_advantages(torch.tensor([1.0, -1.0]), mask, "reinforce_pp", kl, 0.5), want, 1e-4)


def test_aggregations_and_asymmetric_clip_by_hand():
    x = torch.tensor([[1.0, 2.0, 5.0], [3.0, 7.0, 7.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    close(aggregate(x, mask, "token_mean"), 2.0)  # (1 + 2 + 3) / 3
    close(aggregate(x, mask, "seq_mean"), 2.25)  # mean(1.5, 3)
    close(aggregate(x, mask, "seq_sum", 4), 0.75)  # mean(3, 3) / 4
    # ratio 1.5 with A = 1 is clipped at 1 + 0.28; ratio 0.5 with A = -1 at 1 - 0.2
    logp, old = torch.log(torch.tensor([[1.5, 0.5]])), torch.zeros(1, 2)
    loss, stats = clipped_surrogate(logp, old, torch.tensor([[1.0, -1.0]]), torch.ones(1, 2), 0.2, 0.28)
    close(loss, (-1.28 + 0.8) / 2)
    close(stats["policy/clipfrac"], 1.0)
    # PPO's symmetric loss is the same function with clip_low = clip_high
    sym, _ = policy_loss(logp, old, torch.tensor([[1.0, -1.0]]), torch.ones(1, 2), 0.2)
    close(sym, (-1.2 + 0.8) / 2)


def test_overoptimisation_watch_by_hand():
    from align.rl.watch import overoptimisation

    rm = [0.0, 0.1, 0.2, 0.3, 0.6, 0.7, 0.8, 0.9]
    falling, steady = [0.8, 0.8, 0.7, 0.7, 0.5, 0.5, 0.4, 0.4], [0.5] * 8
    message = overoptimisation(rm, falling, window=4)
    assert "rose by 0.600" in message and "fell by 0.300" in message
    assert overoptimisation(rm, steady, window=4) is None
    assert overoptimisation(rm[:7], falling[:7], window=4) is None  # fewer than two windows


def _reward(tmp_path, monkeypatch, body: str, on_error="raise", **extra):
    from omegaconf import OmegaConf

    from align import rewards

    (tmp_path / "my_rewards.py").write_text(body)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(__import__("sys").modules, "my_rewards", raising=False)
    cfg = OmegaConf.create({"kind": "python", "fn": "my_rewards:score", "model": None, "weights": {}, **extra})
    data = OmegaConf.create({"train": "mine.jsonl", "checker": "exact", "checker_pattern": None, "on_error": on_error})
    return rewards.build(cfg, data)


ITEMS = [{"prompt_text": "2+2?", "reference": "4", "fields": '{"level": 1}'},
         {"prompt_text": "3+3?", "reference": "6", "fields": '{"level": 2}'}]


def test_python_reward_gets_prompts_completions_and_row_fields(tmp_path, monkeypatch):
    reward = _reward(tmp_path, monkeypatch,
                     "def score(prompts, completions, reference, level):\n"
                     "    return [float(c.strip() == r) + 0.1 * l for c, r, l in zip(completions, reference, level)]\n")
    out = reward(None, ["4", "7"], ITEMS)
    close(out.total, [1.1, 0.2])
    close(out.components["checker"], [1.0, 0.0])  # the data's checker is logged beside it
    assert out.valid.all() and out.errors == 0


def test_weighted_reward_sums_its_components(tmp_path, monkeypatch):
    reward = _reward(tmp_path, monkeypatch, "def score(prompts, completions, **fields):\n    return [2.0, 4.0]\n",
                     kind="weighted", weights={"checker": 1.0, "python": 0.5})
    close(reward(None, ["4", "7"], ITEMS).total, [1.0 + 1.0, 0.0 + 2.0])


@pytest.mark.parametrize("body,message", [
    ("def score(prompts, completions, **f):\n    raise KeyError('x')\n",
     r"reward function my_rewards:score raised KeyError.*first prompt is '2\+2\?'.*data.on_error=skip"),
    ("def score(prompts, completions, **f):\n    return [1.0]\n", r"returned 1 values for 2 completions"),
    ("def score(prompts, completions, **f):\n    return [1.0, float('nan')]\n",
     r"my_rewards:score returned nan for the prompt '3\+3\?'"),
])
def test_a_bad_reward_function_stops_the_run_naming_it_and_the_prompt(tmp_path, monkeypatch, body, message):
    from align.rewards import RewardError

    reward = _reward(tmp_path, monkeypatch, body)
    with pytest.raises(RewardError, match=message):
        reward(None, ["4", "7"], ITEMS)


def test_a_bad_reward_value_is_skipped_and_counted_with_on_error_skip(tmp_path, monkeypatch):
    reward = _reward(tmp_path, monkeypatch,
                     "def score(prompts, completions, **f):\n"
                     "    if len(prompts) > 1 or prompts[0] == '3+3?':\n        raise ValueError('no')\n    return [1.0]\n",
                     on_error="skip")
    out = reward(None, ["4", "7"], ITEMS)
    assert out.valid.tolist() == [True, False] and out.errors == 1
    close(out.total, [1.0, 0.0])


def test_reward_config_errors_name_the_fix():
    from omegaconf import OmegaConf

    from align import rewards

    data = OmegaConf.create({"train": "mine.jsonl", "checker": "auto", "checker_pattern": None, "on_error": "raise"})
    with pytest.raises(rewards.RewardError, match="reward=checker needs a task checker.*set data.checker"):
        rewards.build(OmegaConf.create({"kind": "checker", "fn": None, "model": None, "weights": {}}), data)
    with pytest.raises(rewards.RewardError, match="reward.fn must be module:function"):
        rewards.build(OmegaConf.create({"kind": "python", "fn": "nocolon", "model": None, "weights": {}}), data)
    with pytest.raises(rewards.RewardError, match="reward=weighted needs reward.weights"):
        rewards.build(OmegaConf.create({"kind": "weighted", "fn": None, "model": None, "weights": {"judge": 1}}), data)
