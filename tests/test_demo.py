"""The demo recipe as shipped (`recipe=demo`: SFT, DPO, RM + PPO, GRPO, eval) shows every way to align beating
the SFT model on the task checker (256 held-out prompts, greedy answers); the stages' own before/after evals are
left out (the eval stage measures every policy) and GRPO stops at 300 of its 800 steps.

In the default suite (about 5 minutes on 2 cores; `-m demo` selects it alone). The README's seed-42 row is this
run on an AVX-512 machine. Measured over seeds 42, 1, 2 (and 3, 4 for SFT) and with AVX2 kernels: SFT
0.61-0.66, DPO and GRPO +37 to +39 points, PPO +15 to +22 (README); the bounds sit below every one of them.
"""

from __future__ import annotations

import pytest

from conftest import compose

pytestmark = pytest.mark.demo  # a label to select it; not excluded by default

# GRPO 300 of the recipe's 800 steps (test_grpo's 250 steps already take the held-out accuracy from 0.59 to 1.00)
FAST = ["ppo.eval_prompts=0", "grpo.eval_prompts=0", "grpo.train.max_steps=300"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from align.run import handoff, orchestrate as pipeline
    runs = tmp_path_factory.mktemp("demo") / "runs"
    overrides = ["recipe=demo", f"run.root={runs}", *FAST]
    pipeline.run(compose(*overrides), overrides)
    return handoff.read_stage_json(runs / "demo" / "eval")["metrics"]


def test_dpo_and_ppo_beat_sft_on_the_checker(demo):
    sft, dpo, ppo = (demo[f"{p}/checker_accuracy"] for p in ("sft", "dpo", "ppo"))
    assert 0.5 < sft < 0.8, demo  # converged: the non-lazy words right, the lazy ones copied (about 0.62)
    assert dpo >= sft + 0.25, demo
    assert ppo >= sft + 0.10, demo
    # the run's RM agrees: both preference stages' answers win against SFT's more often than not
    assert demo["dpo/win_rate"] > 0.5 and demo["ppo/win_rate"] > 0.5, demo
    assert 0 < demo["ppo/kl"] < 2.0, demo  # the KL penalty kept PPO near its reference


def test_grpo_with_the_checker_beats_sft(demo):
    assert demo["grpo/checker_accuracy"] >= demo["sft/checker_accuracy"] + 0.25, demo  # issue 23's bar
