"""The demo, shortened: `recipe=demo` with fewer DPO, RM and PPO steps still shows both ways to align
beating the SFT model on the task checker (held-out prompts, greedy answers).

Opt-in (`python -m pytest -m demo`, about 5 minutes): it trains the demo's SFT, DPO, RM and PPO on one
core, and the default suite is at its 20-minute CI budget."""

from __future__ import annotations

import pytest

from conftest import compose

pytestmark = pytest.mark.demo

# the demo recipe's own settings, fewer steps: SFT as in the demo (it is the baseline), then
# DPO 150 of 500 steps, the RM 250 of 500, PPO 30 of 100, GRPO 250 of 800; checker on 128 held-out prompts
SHORT = ["dpo.train.max_steps=150", "rm.train.max_steps=250", "ppo.train.max_steps=30", "ppo.eval_prompts=128",
         "grpo.train.max_steps=250", "grpo.eval_prompts=128", "eval.prompts=128"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from align import handoff, pipeline

    runs = tmp_path_factory.mktemp("demo") / "runs"
    overrides = ["recipe=demo", f"run.root={runs}", *SHORT]
    pipeline.run(compose(*overrides), overrides)
    return handoff.read_stage_json(runs / "demo" / "eval")["metrics"]


def test_dpo_and_ppo_beat_sft_on_the_checker(demo):
    sft, dpo, ppo = (demo[f"{p}/checker_accuracy"] for p in ("sft", "dpo", "ppo"))
    assert 0.5 < sft < 0.8, demo  # the SFT model copies many lazy words: room to improve, not broken
    assert dpo >= sft + 0.15, demo
    assert ppo >= sft + 0.05, demo
    # the run's RM agrees: both preference stages' answers win against SFT's more often than not
    assert demo["dpo/win_rate"] > 0.5 and demo["ppo/win_rate"] > 0.5, demo
    assert 0 < demo["ppo/kl"] < 2.0, demo  # the KL penalty kept PPO near its reference


def test_grpo_with_the_checker_beats_sft(demo):
    assert demo["grpo/checker_accuracy"] >= demo["sft/checker_accuracy"] + 0.15, demo
